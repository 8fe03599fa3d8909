"""What does segmenting a full BraTS case cost on a CPU? ONNX Runtime next to torch eager,
through the segmenter, measured side by side in one run::

    python bench/inference_speed.py                      # a 240 x 240 x 155 phantom, 2 configurations (~7.5 min)
    python bench/inference_speed.py --quick              # a 64^3 phantom, tiny settings (~1.5 min, mostly start-ups)
    python bench/inference_speed.py --configs a --rounds 9
    python bench/inference_speed.py --backends torch,onnxruntime,onnxruntime-nospin

One phantom case (:func:`write_phantoms`, ``--case-size``, 1 mm at 240 x 240 x 155) goes
through :meth:`Segmenter.predict_case`, the whole chain of ``brats-cggm predict`` (read the
four NIfTI files, the card's preprocessing, MONAI sliding-window inference with Gaussian
blending, inversion to the input grid, labels), with each backend (``--backends``):

* ``torch``: :class:`TorchBackend`, the torch network in eval mode (``Segmenter.load(RUN)``);
* ``onnxruntime``: :class:`OnnxBackend` on ONNX Runtime's CPU provider
  (``Segmenter.load(FILE.onnx, threads=N)``), as the library builds it;
* ``onnxruntime-nospin`` (optional): the same with ``session.intra_op.allow_spinning = 0``,
  which the library does not set.

Configurations (``--configs``):

* ``a``: the trained ``cpu-small`` run (``--run``, default ``runs/diag_lam0``: the
  ``small`` network, 3 mm spacing, 48^3 windows), exported with :func:`export_run` as
  ``brats-cggm export`` does (or ``--onnx FILE``, an export of that run). Without a run
  (``--run none``, and in ``--quick``): the ``small`` network with random weights at
  3 mm and ``--small-patch`` windows.
* ``b``: the ``default`` network (``--large-preset``) with random weights (seed 0), at
  ``--large-spacing`` mm (1) with ``--large-patch`` windows (128^3), overlap 0.5, its card
  written by hand, exported with the exporter of :func:`export_run` (``_to_onnx``). Its
  labels mean nothing (untrained), so its label agreement is left out of the table (it is
  in the JSON); the probabilities' difference is shown.

``--exporter legacy`` (``--quick``) exports with torch's TorchScript exporter instead
(2-3 s instead of ~40 s per network; the same operators), for quick runs only.

**Time.** The backends share the machine's load of the moment: per configuration, after
one untimed call of each backend on a batch of windows (thread pools, ONNX Runtime's arena,
weight packing) and ``--warmup`` untimed cases, ``--rounds`` rounds each predict the case
once with every backend and time one matrix product, in an order rotated every round.
*case s* is the wall time of ``predict_case``; *backend s* the time inside the backend's
calls (the windows through the network; the sliding window, blending, preprocessing,
inversion and file reading are the rest). Ratios to torch are medians over rounds of the
ratio within the round (paired). Threads: ``torch.set_num_threads(--threads)`` and ONNX
Runtime's ``intra_op_num_threads = --threads`` (the pre- and post-processing run on torch's
threads in both cases).

**Convolution throughput.** Forward hooks on every ``Conv3d`` / ``ConvTranspose3d`` of the
torch network count one window's multiply-adds x 2: ``2 * out_elements * in_channels /
groups * prod(kernel)`` for a convolution, ``2 * in_elements * out_channels / groups *
prod(kernel)`` for a transposed one (each input voxel is scattered through the kernel;
bias adds are not counted). ``torch.utils.flop_counter`` checks the total. Times the
windows the backend saw, over *backend s* -> achieved GFLOP/s (and over *case s*, for the
whole case). The machine's matrix-multiply throughput is measured in every round of the
same run (``torch.matmul`` of two float32 ``--matmul-size`` square matrices, same threads,
median of ``--matmul-reps``); the fraction is the median over rounds of achieved / matmul
of the same round. Norms, activations, the fusion means and the Gaussian blending do work
that is not counted, so the fraction is a lower bound of the convolutions' own efficiency.

**Parity.** The label maps of the last round of each backend against torch's: the
fraction of all voxels with the same label, the same within the voxels that either calls
tumour, and the largest absolute difference of the probabilities (on the input grid).

**Memory.** Each backend also runs one case in a fresh process (this script with
``--one``), after the timing, one at a time. It reads its resident set after the imports
(``VmRSS``: interpreter, torch, MONAI, ONNX Runtime), loads the model, reads the
high-water mark (``VmHWM``), resets it (``/proc/self/clear_refs``), predicts the case
(cold: first call) and reads it again. *peak RSS MiB*: the process's high-water mark;
*over imports MiB*: that minus the resident set after the imports (model, session, case,
activations, allocator slack). ``getrusage().ru_maxrss`` is not used: Linux carries it over
``fork`` + ``exec``, so a child would report this process's peak (see
``bench/training_speed.py``). psutil is not installed.

The segmenter does not tune glibc's allocator (``--malloc default``, the default here);
``--malloc tuned`` measures with :func:`keep_freed_memory`, as the trainer runs. Set
``OMP_WAIT_POLICY=PASSIVE`` before torch starts (this script does, unless it is set): on a
busy 2-core machine spinning OpenMP threads make CPU times erratic (``brats_cggm/cli.py``).
The tables (Markdown) go to stdout and to ``--out`` with the suffix ``.md``; everything,
with the provenance and load averages, to ``--out`` (JSON); both written atomically.
"""

from __future__ import annotations

import os

# Before torch starts OpenMP (libgomp reads it when torch is imported): idle threads sleep
# instead of spinning, as `brats-cggm` sets it in brats_cggm/cli.py:main.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from brats_cggm import MODALITIES, models
from brats_cggm.data.labels import REGIONS
from brats_cggm.data.layouts import discover
from brats_cggm.data.phantom import write_phantoms
from brats_cggm.data.transforms import PreprocessConfig
from brats_cggm.export import InferenceGraph, _to_onnx, export_run
from brats_cggm.inference import monai_chain, numpy_chain
from brats_cggm.inference import segmenter as segmenter_module
from brats_cggm.inference.backends import OnnxBackend, TorchBackend
from brats_cggm.inference.card import CARD_FORMAT, model_card, read_onnx
from brats_cggm.inference.grid import Geometry
from brats_cggm.inference.segmenter import Segmenter
from brats_cggm.network.presets import build_network
from brats_cggm.training.trained import load_run
from multimodal_general.io import atomic_write_text
from multimodal_general.runs.provenance import provenance
from multimodal_general.runs.runtime import (
    RESULT_TAG,
    keep_freed_memory,
    memory_kib,
    print_result,
    reset_peak_memory,
    run_fresh,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "diag_lam0"
BACKENDS = {
    "torch": "torch eager (TorchBackend), MONAI chain",
    "onnxruntime": "ONNX Runtime CPU (OnnxBackend), MONAI chain (the path before the numpy chain)",
    "onnxruntime-numpy": "ONNX Runtime CPU (OnnxBackend), numpy chain (an .onnx file's default)",
    "onnxruntime-spin": "ONNX Runtime CPU, MONAI chain, intra-op threads spinning (ONNX Runtime's own default)",
}
BASELINE = "torch"
#: the reference of a configuration without torch (s: the shipped model has no run here)
ONNX_BASELINE = "onnxruntime"
CONFIGS = ("a", "b", "s")
SHIPPED = models.default().path
FULL = {"case_size": "240,240,155", "rounds": "5,3,5", "large_spacing": 1.0, "large_patch": 128,
        "small_patch": 48, "exporter": "project", "matmul_size": 2048}
QUICK = {"case_size": "64,64,64", "rounds": "1,1,1", "large_spacing": 4.0, "large_patch": 32,
         "small_patch": 32, "exporter": "legacy", "matmul_size": 512, "run": "none"}
SMALL_SPACING = 3.0  # the cpu-small preset's spacing, for configuration a without a run
OVERLAP = 0.5
SEED = 0
MEMORY_TAG = RESULT_TAG  # the tests read the memory processes' output by it
OMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    """The benchmark's options (those left None take their value from FULL or QUICK)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated, from a, b, s (s: the shipped model, no torch backend; default all)")
    parser.add_argument("--backends", default="torch,onnxruntime,onnxruntime-numpy",
                        help=f"comma-separated, from {', '.join(BACKENDS)}; torch and onnxruntime are required "
                             "(default torch,onnxruntime,onnxruntime-numpy)")
    parser.add_argument("--run", help=f"the trained run of configuration a (default {DEFAULT_RUN.relative_to(REPO)}); "
                                      "'none': the small network with random weights")
    parser.add_argument("--checkpoint", default="best", help="checkpoint of --run (default best)")
    parser.add_argument("--onnx", type=Path, help="an export of --run to use instead of exporting it here")
    parser.add_argument("--case-size", help=f"phantom grid (default {FULL['case_size']}: BraTS's 1 mm grid)")
    parser.add_argument("--rounds", help=f"timed rounds of a,b,s (default {FULL['rounds']})")
    parser.add_argument("--warmup", type=int, default=0, help="untimed whole cases per backend first (default 0; "
                        "one untimed batch of windows per backend always runs)")
    parser.add_argument("--large-preset", default="default", help="network preset of configuration b (default default)")
    parser.add_argument("--large-spacing", type=float, help=f"spacing of b in mm (default {FULL['large_spacing']})")
    parser.add_argument("--large-patch", type=int, help=f"cubic window of b (default {FULL['large_patch']})")
    parser.add_argument("--small-patch", type=int, help=f"cubic window of a without a run (default {FULL['small_patch']})")
    parser.add_argument("--exporter", choices=("project", "legacy"),
                        help="project: export_run / _to_onnx (torch.onnx dynamo, as brats-cggm export; default); "
                             "legacy: torch's TorchScript exporter (fast, for --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per backend call (default 2, as the segmenter)")
    parser.add_argument("--matmul-size", type=int, help=f"square matrix side of the matmul reference (default {FULL['matmul_size']})")
    parser.add_argument("--matmul-reps", type=int, default=3, help="matrix products per round (default 3)")
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default",
                        help="default (as the segmenter): glibc's own thresholds; tuned: keep_freed_memory()")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-backend memory processes")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--keep", type=Path, help="keep the phantom, the models and spec.json in this folder "
                                                  "(default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "inference_speed.json",
                        help="JSON output; the Markdown tables go beside it (.md)")
    parser.add_argument("--one", metavar="CONFIG:BACKEND", help=argparse.SUPPRESS)  # the memory child
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)  # the memory child's models and case
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in {**FULL, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.one:
        if args.spec is None:
            parser.error("--one needs --spec")
        return args
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the options of a whole benchmark and turn them into values (lists, paths, rounds
    per configuration); a wrong one is the parser's error."""
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.configs or set(args.configs) - set(CONFIGS) or len(set(args.configs)) != len(args.configs):
        parser.error(f"--configs: distinct entries from {', '.join(CONFIGS)}")
    if (set(args.backends) - set(BACKENDS) or len(set(args.backends)) != len(args.backends)
            or not {BASELINE, ONNX_BASELINE} <= set(args.backends)):
        parser.error(f"--backends: distinct entries from {', '.join(BACKENDS)}, torch and onnxruntime among them")
    try:
        args.case_size = _ints(args.case_size)
        rounds = _ints(args.rounds)
    except ValueError:
        parser.error("--case-size and --rounds take comma-separated whole numbers")
    if len(args.case_size) != 3 or min(args.case_size) < 16:
        parser.error("--case-size: three sizes of at least 16")
    if len(rounds) == 1:
        rounds *= 3
    if len(rounds) != 3 or min(rounds) < 1:
        parser.error("--rounds: one or three numbers (a,b,s) of at least 1")
    args.rounds = dict(zip(CONFIGS, rounds))
    args.run = DEFAULT_RUN if args.run is None else None if args.run.lower() == "none" else Path(args.run)
    if args.run is not None and not args.run.is_dir():
        parser.error(f"--run {args.run}: not a folder (pass --run none for random weights)")
    if args.onnx is not None and (args.run is None or not args.onnx.is_file()):
        parser.error("--onnx needs an existing file and --run")
    for key in ("large_patch", "small_patch"):
        if getattr(args, key) < 16 or getattr(args, key) % 16:
            parser.error(f"--{key.replace('_', '-')} must be a multiple of 16")
    for key in ("threads", "sw_batch_size", "matmul_size", "matmul_reps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.large_spacing <= 0:
        parser.error("--warmup must be >= 0 and --large-spacing > 0")


# ------------------------------------------------------------------------ building
def hand_card(preset: str, spacing: float, patch: int, divisor: int) -> dict[str, Any]:
    """A model card for a network with random weights (what
    :func:`brats_cggm.inference.card.model_card` writes, less the training record)."""
    return {
        "format": CARD_FORMAT,
        "description": f"{preset} network, random weights (seed {SEED}): for timing only",
        "modalities": list(MODALITIES),
        "outputs": {"logits": list(REGIONS), "activation": "sigmoid", "threshold": 0.5},
        "label_scheme": "brats2021",
        "preprocessing": PreprocessConfig(spacing=(spacing,) * 3, patch_size=(patch,) * 3).to_dict(),
        "inference": {"patch_size": [patch] * 3, "overlap": OVERLAP, "divisor": divisor},
        "network": {"preset": preset, "sequence_dropout": 0.0, "overrides": {}},
    }


def legacy_onnx(net: nn.Module, patch: Sequence[int]) -> bytes:
    """The network through torch's TorchScript exporter (seconds instead of ~40 s)."""
    example = (torch.zeros(1, len(MODALITIES), *patch), torch.ones(1, len(MODALITIES)))
    dynamic = {0: "batch", 2: "d", 3: "h", 4: "w"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(InferenceGraph(net).eval(), example, buffer, input_names=["image", "modality_mask"],
                          output_names=["logits"], dynamic_axes={"image": dynamic, "modality_mask": {0: "batch"},
                                                                 "logits": dynamic},
                          opset_version=18, dynamo=False)
    return buffer.getvalue()


def prepare(args: argparse.Namespace, tmp: Path, log) -> dict[str, Any]:
    """The phantom case and, per configuration, the ONNX file, the torch weights and the
    card, under ``tmp``; returns the spec the memory processes read too."""
    spec: dict[str, Any] = {"configs": {}}
    began = time.perf_counter()
    write_phantoms(tmp / "case", 1, tuple(args.case_size), "brats2021", seed=args.seed)
    spec["case"] = str(tmp / "case")
    spec["phantom_s"] = time.perf_counter() - began
    log(f"phantom {'x'.join(map(str, args.case_size))}: {spec['phantom_s']:.1f} s")
    for name in args.configs:
        began = time.perf_counter()
        onnx_file = tmp / f"{name}.onnx"
        if name == "s":
            card = read_onnx(SHIPPED)[1]
            onnx_file = SHIPPED
            entry = {"kind": "shipped", "trained": True, "onnx_has_card": True, "export": "shipped",
                     "description": f"the shipped model ({SHIPPED.name}, {card['network']['preset']}), no torch backend"}
        elif name == "a" and args.run is not None:
            entry = {"kind": "run", "run": str(args.run), "checkpoint": args.checkpoint, "trained": True}
            run = load_run(args.run, args.checkpoint)
            if args.onnx is not None:
                onnx_file = args.onnx
                card = read_onnx(onnx_file)[1]
                if card.get("weights_sha256") != run.weights_sha256:
                    raise SystemExit(f"--onnx {onnx_file} is not an export of {run.checkpoint}")
                entry["onnx_has_card"], entry["export"] = True, "given"
            elif args.exporter == "project":
                card = export_run(args.run, onnx_file, args.checkpoint)
                entry["onnx_has_card"], entry["export"] = True, "export_run"
            else:
                card = model_card(run)
                onnx_file.write_bytes(legacy_onnx(run.net, card["inference"]["patch_size"]))
                entry["onnx_has_card"], entry["export"] = False, "legacy"
            entry["description"] = (f"trained {run.config.network.preset} network ({args.run.name}, {args.checkpoint}, "
                                    f"{card['training']['epochs']} epochs)")
        else:
            preset, spacing, patch = (("small", SMALL_SPACING, args.small_patch) if name == "a"
                                      else (args.large_preset, args.large_spacing, args.large_patch))
            torch.manual_seed(SEED)
            net = build_network(preset).eval()
            card = hand_card(preset, spacing, patch, int(getattr(net, "divisor", 16)))
            state = tmp / f"{name}.pt"
            torch.save(net.state_dict(), state)
            entry = {"kind": "random", "preset": preset, "state": str(state), "trained": False,
                     "onnx_has_card": False, "export": args.exporter,
                     "description": f"{preset} network, random weights"}
            if args.exporter == "project":
                model = _to_onnx(InferenceGraph(net).eval(), card["inference"]["patch_size"], card["inference"]["divisor"])
                onnx_file.write_bytes(model.SerializeToString())
            else:
                onnx_file.write_bytes(legacy_onnx(net, card["inference"]["patch_size"]))
        card_file = tmp / f"{name}.card.json"
        card_file.write_text(json.dumps(card))
        entry.update({"onnx": str(onnx_file), "card": str(card_file), "export_s": time.perf_counter() - began,
                      "spacing_mm": card["preprocessing"]["spacing"], "patch": card["inference"]["patch_size"],
                      "overlap": card["inference"]["overlap"], "preset": card["network"]["preset"],
                      "export_parity": card.get("parity")})
        spec["configs"][name] = entry
        log(f"config {name}: {entry['description']}, {entry['spacing_mm'][0]:g} mm, "
            f"{entry['patch'][0]}^3 windows; export ({entry['export']}) {entry['export_s']:.1f} s")
    return spec


def make_segmenter(entry: dict[str, Any], backend: str, threads: int, sw_batch_size: int) -> Segmenter:
    """The segmenter of one configuration on one backend, built as a user builds it."""
    card = json.loads(Path(entry["card"]).read_text())
    if backend == "torch":
        if entry["kind"] == "run":
            segmenter = Segmenter.load(entry["run"], device="cpu", checkpoint=entry["checkpoint"])
        else:
            net = build_network(entry["preset"])
            net.load_state_dict(torch.load(entry["state"], weights_only=True))
            segmenter = Segmenter(TorchBackend(net, "cpu"), card, f"random {entry['preset']}")
    else:
        data = Path(entry["onnx"]).read_bytes()
        chain = "numpy" if backend == "onnxruntime-numpy" else "monai"
        if entry["onnx_has_card"]:
            segmenter = Segmenter.load(entry["onnx"], provider="cpu", threads=threads, chain=chain)
        else:
            segmenter = Segmenter(OnnxBackend(data, "cpu", threads), card, entry["onnx"], chain=chain)
        if backend == "onnxruntime-spin":
            options = segmenter.backend.session.get_session_options()
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            segmenter.backend.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    segmenter.windowing = replace(segmenter.windowing, sw_batch_size=sw_batch_size)
    return segmenter


class TimedBackend:
    """A backend that adds up the time spent in its calls and the windows it saw."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.windows = 0.0, 0, 0

    def __call__(self, image: np.ndarray, modality_mask: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.inner(image, modality_mask)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.windows += int(image.shape[0])
        return out


#: (where, function) -> phase: the steps of both chains
PHASES = {(segmenter_module, "load_sequences"): "read", (segmenter_module, "labels_from_regions"): "labels",
          (monai_chain, "sliding_window_inference"): "sliding window", (monai_chain, "invert_prediction"): "invert",
          (numpy_chain, "sliding_window"): "sliding window", (Geometry, "invert"): "invert"}


@contextmanager
def phase_timer(seconds: dict[str, float]):
    """Time the steps of :meth:`Segmenter._predict` by wrapping the functions the segmenter
    calls (reading the files, the sliding window, the inversion, the labels; in the MONAI
    chain's module and in the numpy chain's) while inside; what is left of a case is the
    preprocessing (and small glue)."""
    originals = {key: getattr(*key) for key in PHASES}

    def timed(key, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[PHASES[key]] = seconds.get(PHASES[key], 0.0) + time.perf_counter() - start
        return wrapper

    for key, function in originals.items():
        setattr(*key, timed(key, function))
    for phase in set(PHASES.values()):
        seconds.setdefault(phase, 0.0)
    try:
        yield seconds
    finally:
        for key, function in originals.items():
            setattr(*key, function)


# ---------------------------------------------------------------------- measuring
def conv_flops(net: nn.Module, patch: Sequence[int]) -> dict[str, Any]:
    """FLOPs (2 x multiply-adds) of one window's convolutions, counted by forward hooks,
    and torch's flop counter's total for the same forward."""
    counts = {"conv": 0, "conv_transpose": 0, "layers": 0}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        kernel = int(np.prod(module.kernel_size))
        if isinstance(module, nn.ConvTranspose3d):
            counts["conv_transpose"] += 2 * inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            counts["conv"] += 2 * output.numel() * module.in_channels // module.groups * kernel
        counts["layers"] += 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    image, mask = torch.zeros(1, len(MODALITIES), *patch), torch.ones(1, len(MODALITIES))
    try:
        with torch.no_grad():
            net.eval()(image, mask)
    finally:
        for handle in handles:
            handle.remove()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(image, mask)
    return {"per_window": counts["conv"] + counts["conv_transpose"], **counts,
            "flop_counter_per_window": counter.get_total_flops()}


def matmul_gflops(size: int, reps: int) -> list[float]:
    """GFLOP/s of ``reps`` float32 products of two ``size`` square matrices (after one untimed)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return rates


def parity(reference, other, trained: bool) -> dict[str, Any]:
    """How the label maps and probabilities of two predictions of one case agree."""
    a, b = reference.labels, other.labels
    union = (a > 0) | (b > 0)
    return {
        "labels_trained": trained,
        "label_agreement": float((a == b).mean()),
        "label_agreement_tumour": float((a[union] == b[union]).mean()) if union.any() else 1.0,
        "voxels_differing": int((a != b).sum()),
        "voxels": int(a.size),
        "tumour_voxels": {"reference": int((a > 0).sum()), "other": int((b > 0).sum())},
        "max_abs_diff_probabilities": float(np.abs(reference.probabilities - other.probabilities).max()),
        "mean_abs_diff_probabilities": float(np.abs(reference.probabilities - other.probabilities).mean()),
    }


def ort_threads(segmenter: Segmenter) -> int | None:
    session = getattr(segmenter.backend, "session", None) or getattr(getattr(segmenter.backend, "inner", None), "session", None)
    return None if session is None else session.get_session_options().intra_op_num_threads


def time_config(args: argparse.Namespace, name: str, entry: dict[str, Any], case, log) -> dict[str, Any]:
    """Interleaved rounds of one configuration: every backend's case and a matmul per round."""
    segmenters = {}
    backends = config_backends(args, entry)
    baseline = backends[0]
    for backend in backends:
        segmenter = make_segmenter(entry, backend, args.threads, args.sw_batch_size)
        segmenter.backend = TimedBackend(segmenter.backend)
        segmenters[backend] = segmenter
    flops = conv_flops(segmenters[BASELINE].backend.inner.net, entry["patch"]) if BASELINE in segmenters else None
    rng = np.random.default_rng(SEED)
    window = rng.standard_normal((args.sw_batch_size, len(MODALITIES), *entry["patch"]), dtype=np.float32)
    mask = np.ones((args.sw_batch_size, len(MODALITIES)), dtype=np.float32)
    warm = {}
    for backend, segmenter in segmenters.items():
        start = time.perf_counter()
        segmenter.backend(window, mask)
        warm[backend] = time.perf_counter() - start
    del window
    log(f"[{name}] warm-up batch of {args.sw_batch_size} windows: " + ", ".join(f"{b} {s:.2f} s" for b, s in warm.items()))
    items = [*backends, "matmul"]
    rounds, predictions = [], {}
    for index in range(args.warmup + args.rounds[name]):
        timed = index >= args.warmup
        shift = index % len(items)
        order = items[shift:] + items[:shift]
        record: dict[str, Any] = {"order": order}
        for item in order:
            if item == "matmul":
                rates = matmul_gflops(args.matmul_size, args.matmul_reps)
                record["matmul_gflops"] = {"reps": rates, "median": statistics.median(rates)}
                continue
            segmenter = segmenters[item]
            segmenter.backend.reset()
            predictions.pop(item, None)
            phases: dict[str, float] = {}
            with phase_timer(phases):
                start, cpu = time.perf_counter(), time.process_time()
                predictions[item] = segmenter.predict_case(case)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            phases["preprocess + rest"] = seconds - sum(phases.values())
            phases["blending + padding"] = phases["sliding window"] - segmenter.backend.seconds
            record[item] = {"case_s": seconds, "cpu_s": cpu, "backend_s": segmenter.backend.seconds,
                            "calls": segmenter.backend.calls, "windows": segmenter.backend.windows,
                            "phases_s": phases}
        if timed:
            rounds.append(record)
        kind = f"round {index - args.warmup + 1}/{args.rounds[name]}" if timed else f"warm-up {index + 1}/{args.warmup}"
        log(f"[{name}] {kind}: " + ", ".join(
            f"matmul {record['matmul_gflops']['median']:.0f} GFLOP/s" if item == "matmul" else
            f"{item} {record[item]['case_s']:.2f} s (backend {record[item]['backend_s']:.2f} s)" for item in order))
    windows = {rounds[0][b]["windows"] for b in backends}
    if len(windows) != 1:
        raise RuntimeError(f"the backends saw different numbers of windows: {windows}")
    reference = predictions[baseline]
    return {
        "baseline": baseline,
        "backends": backends,
        "conv_flops": flops,
        "windows_per_case": windows.pop(),
        "calls_per_case": rounds[0][baseline]["calls"],
        "case_shape": list(reference.shape),
        "warmup_batch_s": warm,
        "ort_intra_op_threads": {b: ort_threads(s) for b, s in segmenters.items() if b != BASELINE},
        "rounds": rounds,
        "parity": {b: parity(reference, predictions[b], entry["trained"]) for b in backends if b != baseline},
    }


def config_backends(args: argparse.Namespace, entry: dict[str, Any]) -> list[str]:
    """The backends a configuration runs, its reference first (torch; the MONAI chain on
    ONNX Runtime where there is no torch network)."""
    backends = [b for b in args.backends if not (b == BASELINE and entry["kind"] == "shipped")]
    first = BASELINE if BASELINE in backends else ONNX_BASELINE
    return [first, *(b for b in backends if b != first)]


# ------------------------------------------------------------------------- memory
def measure_memory_here(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process (everything imported): load one backend, predict the case once."""
    imports = memory_kib("VmRSS")
    if imports is None:
        raise RuntimeError("the memory measurement reads /proc/self/status (Linux only)")
    name, backend = args.one.split(":")
    spec = json.loads(args.spec.read_text())
    segmenter = make_segmenter(spec["configs"][name], backend, args.threads, args.sw_batch_size)
    case = discover(spec["case"]).cases[0]
    loaded, load_peak = memory_kib("VmRSS"), memory_kib("VmHWM")
    reset = reset_peak_memory()
    before = memory_kib("VmRSS")
    start = time.perf_counter()
    segmenter.predict_case(case)
    seconds = time.perf_counter() - start
    case_peak = memory_kib("VmHWM")
    peak = max(load_peak, case_peak) if reset else case_peak
    return {
        "rss_after_imports_mib": imports / 1024,
        "rss_after_load_mib": loaded / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_over_imports_mib": (peak - imports) / 1024,
        # without the reset the mark also holds the load's peak
        "case_peak_over_loaded_mib": (case_peak - before) / 1024 if reset else None,
        "peak_reset": reset,
        "cold_case_s": seconds,
    }


def measure_memory(args: argparse.Namespace, spec_file: Path, name: str, backend: str) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", f"{name}:{backend}", "--spec", str(spec_file),
               "--threads", str(args.threads), "--sw-batch-size", str(args.sw_batch_size), "--malloc", args.malloc]
    return run_fresh(command, f"{name}:{backend}", cwd=str(REPO))


# ------------------------------------------------------------------------- report
def _span(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rounds, backends, baseline = config["rounds"], config["backends"], config["baseline"]
    flops = config["conv_flops"]["per_window"] * config["windows_per_case"] if config["conv_flops"] else float("nan")
    matmul = [r["matmul_gflops"]["median"] for r in rounds]
    rows = {}
    for backend in backends:
        case = [r[backend]["case_s"] for r in rounds]
        inside = [r[backend]["backend_s"] for r in rounds]
        achieved = [flops / s / 1e9 for s in inside]
        whole = [flops / s / 1e9 for s in case]
        rows[backend] = {
            "case_s": _span(case),
            "backend_s": _span(inside),
            "outside_backend_s": _span([c - b for c, b in zip(case, inside)]),
            "cpu_s": _span([r[backend]["cpu_s"] for r in rounds]),
            "phases_s": {phase: _span([r[backend]["phases_s"][phase] for r in rounds])
                         for phase in rounds[0][backend]["phases_s"]},
            "ratio_case_vs_torch": (_span([r[backend]["case_s"] / r[BASELINE]["case_s"] for r in rounds])
                                    if baseline == BASELINE else None),
            "ratio_backend_vs_torch": (_span([r[backend]["backend_s"] / r[BASELINE]["backend_s"] for r in rounds])
                                       if baseline == BASELINE else None),
            # the numpy chain's goal: a case in <= 0.5 x the MONAI chain's time (same ONNX Runtime session settings)
            "ratio_case_vs_monai_chain": _span([r[backend]["case_s"] / r[ONNX_BASELINE]["case_s"] for r in rounds]),
            "conv_gflops_backend": _span(achieved),
            "conv_gflops_case": _span(whole),
            "fraction_of_matmul_backend": _span([a / m for a, m in zip(achieved, matmul)]),
            "fraction_of_matmul_case": _span([a / m for a, m in zip(whole, matmul)]),
        }
        if not config["conv_flops"]:  # no torch network to count the convolutions of
            rows[backend].update(dict.fromkeys(("conv_gflops_backend", "conv_gflops_case", "fraction_of_matmul_backend",
                                                "fraction_of_matmul_case")))
    return rows


def _s(span: dict | None, digits: int = 2, unit: str = "") -> str:
    if span is None:
        return "—"
    text = f"{span['median']:.{digits}f}{unit}"
    return text if span["n"] < 2 else f"{text} ({span['min']:.{digits}f}–{span['max']:.{digits}f})"


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        f"Segmenter.predict_case on one {'x'.join(map(str, s['case_size']))} phantom case (CPU, "
        f"{s['threads']} torch threads = {s['threads']} ONNX Runtime intra-op threads, sw_batch_size "
        f"{s['sw_batch_size']}, malloc {s['malloc']}); rounds interleaved; load average before "
        f"{_load(payload['load_average_before'])}, after {_load(payload['load_average_after'])}; "
        + "; ".join(f"{k}={v}" for k, v in payload["environment"].items() if v is not None)
        + f"; whole run {payload['wall_s'] / 60:.1f} min",
        "",
    ]
    for name, config in payload["configs"].items():
        lines += [_config_line(name, config, s), ""]
        lines += [*_speed_table(config), "", *_phase_table(config), "", *_parity_lines(config), ""]
    lines.append(LEGEND)
    return "\n".join(lines) + "\n"


def _config_line(name: str, config: dict[str, Any], s: dict[str, Any]) -> str:
    """What a configuration is: network, grid, windows, FLOPs, export, the matmul reference."""
    e = config["spec"]
    flops = config["conv_flops"]
    matmul = _span([r["matmul_gflops"]["median"] for r in config["rounds"]])
    counted = (f"{flops['per_window'] / 1e9:.2f} conv GFLOP per window (flop counter: "
               f"{flops['flop_counter_per_window'] / 1e9:.2f})" if flops else "conv GFLOP not counted (no torch network)")
    return (f"**{name}**: {e['description']}, {e['spacing_mm'][0]:g} mm, {e['patch'][0]}^3 windows, overlap "
            f"{e['overlap']:g}; {config['windows_per_case']} windows per case in {config['calls_per_case']} calls; "
            f"{counted}; ONNX export: {e['export']}; "
            f"{len(config['rounds'])} rounds; matmul {s['matmul_size']}^2 float32: {_s(matmul, 0)} GFLOP/s")


def _table_head(header: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def _speed_table(config: dict[str, Any]) -> list[str]:
    """Per backend: times, ratios, throughput and memory."""
    lines = _table_head(["backend", "case s", "backend s", "rest s", "× MONAI chain (case)", "× torch (case)",
                         "× torch (backend)", "conv GFLOP/s in backend", "% of matmul", "% of matmul (whole case)",
                         "peak RSS MiB", "over imports MiB", "cold case s"])
    for backend, row in config["summary"].items():
        memory = config["memory"].get(backend)
        pct = {k: {**v, **{x: 100 * v[x] for x in ("median", "min", "max")}} if v else None
               for k, v in row.items() if k.startswith("fraction")}
        lines.append("| " + " | ".join([
            backend, _s(row["case_s"]), _s(row["backend_s"]), _s(row["outside_backend_s"]),
            _s(row["ratio_case_vs_monai_chain"], unit="x"), _s(row["ratio_case_vs_torch"], unit="x"), _s(row["ratio_backend_vs_torch"], unit="x"),
            _s(row["conv_gflops_backend"], 1), _s(pct["fraction_of_matmul_backend"], 0, "%"),
            _s(pct["fraction_of_matmul_case"], 0, "%"),
            f"{memory['peak_rss_mib']:.0f}" if memory else "—",
            f"{memory['peak_over_imports_mib']:.0f}" if memory else "—",
            f"{memory['cold_case_s']:.1f}" if memory else "—",
        ]) + " |")
    return lines


def _phase_table(config: dict[str, Any]) -> list[str]:
    """Per backend: where a case's time goes."""
    phases = ["read", "preprocess + rest", "network", "blending + padding", "invert", "labels"]
    lines = _table_head(["backend", "case s", *(f"{p} s" for p in phases), "process CPU s"])
    for backend, row in config["summary"].items():
        spans = {**row["phases_s"], "network": row["backend_s"]}
        lines.append("| " + " | ".join([backend, _s(row["case_s"]), *(_s(spans[p]) for p in phases),
                                        _s(row["cpu_s"])]) + " |")
    return lines


def _parity_lines(config: dict[str, Any]) -> list[str]:
    """One line per backend: how its labels and probabilities agree with the baseline's."""
    lines = []
    for backend, p in config["parity"].items():
        labels = (f"label agreement {100 * p['label_agreement']:.4f}% of {p['voxels']} voxels "
                  f"({p['voxels_differing']} differ), {100 * p['label_agreement_tumour']:.2f}% within the "
                  f"{int(np.sum(list(p['tumour_voxels'].values())))} tumour calls ({config['baseline']} "
                  f"{p['tumour_voxels']['reference']}, {backend} {p['tumour_voxels']['other']})"
                  if p["labels_trained"] else "labels not compared (untrained network)")
        lines.append(f"- parity {backend} vs {config['baseline']}: {labels}; max |Δ probability| "
                     f"{p['max_abs_diff_probabilities']:.2e} (mean {p['mean_abs_diff_probabilities']:.1e})")
    return lines


#: the report's closing paragraph: what each column means
LEGEND = (
    "*case s*: wall time of `predict_case` (NIfTI reading, preprocessing, sliding window, inversion, labels), "
    "median (min–max) over rounds; *backend s*: time inside the backend's calls; *rest s*: the difference, split in the second table (medians of each step over rounds: *read* the NIfTI files, "
    "*network* the backend's calls, *blending + padding* the rest of MONAI's sliding window, *invert* the resampling "
    "back to the input grid, *labels* thresholds and label map, *preprocess + rest* what remains: orientation, "
    "spacing, crop, z-score; *process CPU s*: CPU time of all threads of the process: close to *case s*, the process got about one "
    "core of the two). "
    "Ratios: median over rounds of the ratio within the round; *× MONAI chain*: over `onnxruntime` (ONNX Runtime "
    "with the MONAI chain, the path before the numpy chain; `onnxruntime-numpy` is the numpy chain, the default "
    "for an .onnx file). The phases of the numpy chain: *sliding window* is windows.py, *invert* "
    "Geometry.invert, *preprocess + rest* grid.preprocess. *conv GFLOP/s*: Conv3d + ConvTranspose3d FLOPs "
    "(2 x multiply-adds, counted by forward hooks) x windows / backend s; *% of matmul*: that over the "
    "torch.matmul throughput of the same round (*whole case*: FLOPs over case s). Memory: one cold case in a "
    "fresh process per backend; *peak RSS*: VmHWM over model load + case; *over imports*: minus VmRSS after "
    "the imports; *cold case s*: that first case's wall time."
)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory() if args.malloc == "tuned" else False
    if args.one:
        print_result({"target": args.one, "malloc_tuned": malloc_tuned, **measure_memory_here(args)})
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inference_speed_") as tmp_name:
        tmp = Path(tmp_name) if args.keep is None else args.keep
        tmp.mkdir(parents=True, exist_ok=True)
        spec = prepare(args, tmp, log)
        spec_file = tmp / "spec.json"
        spec_file.write_text(json.dumps(spec))
        case = discover(spec["case"]).cases[0]
        configs = {}
        for name in args.configs:
            entry = spec["configs"][name]
            configs[name] = {"spec": entry, **time_config(args, name, entry, case, log)}
            configs[name]["summary"] = summarise(configs[name])
            configs[name]["memory"] = {}
        if not args.no_memory:
            for name in args.configs:
                for backend in configs[name]["backends"]:
                    log(f"memory: {name}:{backend} in a fresh process")
                    configs[name]["memory"][backend] = measure_memory(args, spec_file, name, backend)
    payload = {
        **provenance("monai", "onnx", "onnxruntime"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - began,
        "malloc_tuned": malloc_tuned,
        "torch_threads": torch.get_num_threads(),
        "environment": {name: os.environ.get(name) for name in OMP_VARIABLES},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("out", "one", "spec", "keep")},
        "phantom_s": spec["phantom_s"],
        "configs": configs,
    }
    table = markdown(payload)
    print(table)
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), f"```\n{payload['command']}\n```\n\n" + table)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
