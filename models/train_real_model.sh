#!/usr/bin/env bash
# Rebuild the shipped default model, brats_cggm/models/brats_cggm_real.onnx (+ .card.json), from your own
# copy of labelled BraTS cases, with the project's own tools:
#   1. the protocol (bench/real_cv.py, docs/real_data.md) trains the recipe once per fold (3 folds by
#      source, a fixed budget, last checkpoint): phantom pre-training (30 calibrated phantoms, cpu-real for
#      60 epochs), then the early-fusion U-Net at the widths of the four-branch network (8-16-32-64) with
#      sequence dropout 0.25, cpu-real for 150 epochs on the fold's training cases; each case is scored
#      once, by the fold network that never saw it: the card's estimate and its interval;
#   2. bench/inference_choices.py scores mirroring (TTA) and the clean-up candidates on the same folds,
#      paired case by case; VARIANT names the one the card carries (chosen from its table: small-island
#      removal; mirroring gained little for 3x the time, models/README.md);
#   3. the three fold networks are exported as one ensemble (their mean probability), with that
#      mirroring and clean-up in the card.
#
#   DATA=/path/to/brats/cases bash models/train_real_model.sh     # ~35 min on 2 CPU cores for 13 cases
#
# Research use only: not for clinical use, and the card says so.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a folder of labelled BraTS cases, or a parent of several (any supported layout)}"
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/real_cv_paired}
RESULTS=${RESULTS:-$WORK/results}
OUT=${OUT:-brats_cggm/models/brats_cggm_real.onnx}
VARIANT=${VARIANT:-small-islands}
ROW=${ROW:-ef-dropout-init}  # models/train_fourbranch_model.sh sets another row, OUT and DESCRIPTION
RUN_DIR=$("$BIN/python" -c "import sys; sys.path.insert(0, 'bench'); from real_cv import ROWS; r = ROWS['$ROW']; print(f'{r.group}/FOLD/runs/{r.method}-seed0')")

"$BIN/python" bench/real_cv.py --data "$DATA" --out "$WORK" --results "$RESULTS" --rows "$ROW" --reference "$ROW" --card "$ROW"
"$BIN/python" bench/inference_choices.py --protocol "$WORK" --row "$ROW" --results "$RESULTS" --card "$VARIANT"
"$BIN/python" - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path
results = Path(sys.argv[1])
chosen = json.loads((results / "real_cv_card.json").read_text())["inference"]
(results / "postprocessing.json").write_text(json.dumps(chosen["postprocessing"]) + "\n")
(results / "tta").write_text("--tta" if chosen["tta"] else "--no-tta")
EOF
CASES=$(find "$WORK/cases" -mindepth 1 -maxdepth 1 -type d | wc -l)
# (the widths are looked up only when no DESCRIPTION is given: train_fourbranch_model.sh gives its own)
DESCRIPTION=${DESCRIPTION:-"Three early-fusion U-Nets ($("$BIN/python" -c "import sys; sys.path.insert(0, 'bench'); from real_cv import widths; print(widths('$ROW'))"), 2 mm), one per fold of @CASES@ labelled real BraTS cases (each trained on about two thirds of them after pre-training on 30 calibrated phantoms, with sequence dropout so any non-empty subset of the four sequences works), averaged."}
RUNS=()
for fold in 0 1 2; do RUNS+=(--run "$WORK/${RUN_DIR/FOLD/fold$fold}"); done
POSTPROCESSING=()
[ "$(cat "$RESULTS/postprocessing.json")" = "{}" ] || POSTPROCESSING=(--postprocessing "$RESULTS/postprocessing.json")
"$BIN/brats-cggm" export "${RUNS[@]}" --checkpoint last --out "$OUT" --parity-cases 1 \
    --evaluation "$RESULTS/real_cv_card.json" "${POSTPROCESSING[@]}" "$(cat "$RESULTS/tta")" \
    --description "${DESCRIPTION//@CASES@/$CASES} Research use only; NOT for clinical use."
