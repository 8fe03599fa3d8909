#!/usr/bin/env bash
# The GPU check (docs/gpu_check.md): on a machine with one NVIDIA GPU, its driver, Python 3.10+
# and access to PyPI, and nothing else installed, in under 8 minutes:
#   1. a venv with the CUDA build of torch, the project with its train extra, and onnxruntime-gpu
#      in place of onnxruntime;
#   2. bench/gpu_check.py: phantoms; the `gpu` training preset for a few epochs with mixed
#      precision, balancers none and cggm (loss, s/step, peak GPU memory); ONNX export; one
#      240x240x155 case end to end with ONNX Runtime's CUDA provider and with torch.
# Figures: OUT/gpu_check.json. --dry-run walks every step on the CPU with tiny sizes in the
# existing environment (no venv, no installs): tests/test_gpu_check.py runs it.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: bench/gpu_check.sh [--dry-run] [--out DIR] [--python PY] [--venv DIR]
                          [--find-links DIR] [--system-site-packages] [--epochs N] [--rounds N]

  --dry-run               every step on the CPU, tiny sizes, in the environment of --python
                          (default: .venv/bin/python, else python3); nothing is installed
  --out DIR               where gpu_check.json (and work/) go (default: runs/gpu_check, or
                          runs/gpu_check_dry with --dry-run)
  --python PY             the Python that makes the venv (or, with --dry-run, runs the check)
  --venv DIR              the venv to create (default: OUT/venv)
  --find-links DIR        install from the wheels in DIR only (a machine without PyPI)
  --system-site-packages  let the venv see the system's packages (e.g. a preinstalled torch)
  --epochs N, --rounds N  training epochs per balancer (3), timed inference calls (3)
EOF
}

die() { echo "gpu_check.sh: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=0 OUT="" PY="" VENV="" FIND_LINKS="" SYSTEM_SITE=0 PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --system-site-packages) SYSTEM_SITE=1 ;;
        --out|--python|--venv|--find-links|--epochs|--rounds)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"
            case "$1" in
                --out) OUT=$2 ;;
                --python) PY=$2 ;;
                --venv) VENV=$2 ;;
                --find-links) [ -d "$2" ] || die "--find-links $2: no such folder"; FIND_LINKS=$2 ;;
                *) [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number of at least 1, not '$2'"
                   PASS+=("$1" "$2") ;;
            esac
            shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$REPO/runs/gpu_check_dry}
    if [ -z "$PY" ]; then
        if [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
    fi
    # found, not imported: importing MONAI here would add seconds that gpu_check.py spends again
    (cd "$REPO" && "$PY" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('torch', 'monai', 'onnxruntime', 'onnxscript', 'brats_cggm')))" 2>/dev/null) \
        || die "$PY lacks one of torch, monai, onnxruntime, onnxscript and brats_cggm: run 'make install', or pass --python"
    exec "$PY" "$REPO/bench/gpu_check.py" --dry-run --out "$OUT" "${PASS[@]}"
fi

OUT=${OUT:-$REPO/runs/gpu_check}
VENV=${VENV:-$OUT/venv}
PY=${PY:-python3}
command -v nvidia-smi >/dev/null \
    || die "nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver (--dry-run runs every step on the CPU)"
GPUS=$(nvidia-smi -L 2>/dev/null) && [ -n "$GPUS" ] || die "nvidia-smi lists no GPU (is the driver loaded?)"
command -v "$PY" >/dev/null || die "$PY not found: pass --python PY (Python 3.10+)"
echo "$GPUS"
mkdir -p "$OUT" || die "cannot create $OUT"

step() {  # step NAME COMMAND...: run it, or stop with its name
    echo "== $1"; shift
    "$@" || die "install step failed: $*"
}
START=$(date +%s)
PIP=("$VENV/bin/python" -m pip install --progress-bar off --disable-pip-version-check)
[ -n "$FIND_LINKS" ] && PIP+=(--no-index --find-links "$FIND_LINKS")
VENV_OPTIONS=()
[ "$SYSTEM_SITE" = 1 ] && VENV_OPTIONS+=(--system-site-packages)
step venv "$PY" -m venv "${VENV_OPTIONS[@]}" "$VENV"
# torch first, alone: PyPI's Linux wheels are CUDA builds (the range is pyproject.toml's)
step torch "${PIP[@]}" "torch>=2.6,<2.14"
step project "${PIP[@]}" -e "$REPO[train]"
# onnxruntime-gpu provides the same module as onnxruntime: never both (docs/inference.md)
step "onnxruntime-gpu" bash -c '"$1" -m pip uninstall -y onnxruntime && shift && "$@" "onnxruntime-gpu>=1.18"' \
    _ "$VENV/bin/python" "${PIP[@]}"
INSTALL_S=$(( $(date +%s) - START ))
echo "installed in ${INSTALL_S} s"
# a hung step must not hold the GPU forever: the whole check is meant to take under 8 minutes
timeout 1200 "$VENV/bin/python" "$REPO/bench/gpu_check.py" --out "$OUT" --install-seconds "$INSTALL_S" "${PASS[@]}"
