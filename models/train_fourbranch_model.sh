#!/usr/bin/env bash
# Rebuild the four-branch CGGM model, brats_cggm/models/brats_cggm_fourbranch.onnx (+ .card.json), from your
# own copy of labelled BraTS cases, with the project's own tools:
#   1. the protocol (bench/real_cv.py, docs/real_data.md) trains ROW once per fold (3 folds by source, a fixed
#      budget, last checkpoint): the four-branch network (one 8-16-32-64 encoder per sequence, slot fusion)
#      trained with CGGM, cpu-real for 150 epochs on the fold's training cases; each case is scored once,
#      by the fold network that never saw it: the card's estimate and its interval;
#   2. bench/inference_choices.py scores the clean-up VARIANT (and mirroring) on the same folds;
#   3. the three fold networks are exported as one ensemble (their mean probability), with that clean-up.
#
#   DATA=/path/to/brats/cases bash models/train_fourbranch_model.sh     # ~60 min on 2 CPU cores for 13 cases
#   ROW=slots-cggm-deficit DATA=... bash models/train_fourbranch_model.sh   # the deficit variant instead
#
# Research use only: not for clinical use, and the card says so.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a folder of labelled BraTS cases, or a parent of several (any supported layout)}"
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/real_cv_paired}
RESULTS=${RESULTS:-$WORK/results-fourbranch}
OUT=${OUT:-brats_cggm/models/brats_cggm_fourbranch.onnx}
VARIANT=${VARIANT:-small-islands}
ROW=${ROW:-slots-cggm-paper}
METHOD=$("$BIN/python" -c "import sys; sys.path.insert(0, 'bench'); from real_cv import ROWS; print(ROWS['$ROW'].method)")
RULE=$("$BIN/python" -c "import sys; sys.path.insert(0, 'bench'); from real_cv import ROWS; print(ROWS['$ROW'].label.split(', ')[-1])")

mkdir -p "$RESULTS"
"$BIN/python" bench/real_cv.py --data "$DATA" --out "$WORK" --results "$RESULTS" --rows "$ROW" --reference "$ROW" \
    --card "$ROW"
"$BIN/python" bench/inference_choices.py --protocol "$WORK" --row "$ROW" --results "$RESULTS" --card "$VARIANT"
"$BIN/python" - "$RESULTS" <<'PY'
import json, sys
from pathlib import Path
results = Path(sys.argv[1])
chosen = json.loads((results / "real_cv_card.json").read_text())["inference"]
(results / "postprocessing.json").write_text(json.dumps(chosen["postprocessing"]) + "\n")
PY
CASES=$(find "$WORK/cases" -mindepth 1 -maxdepth 1 -type d | wc -l)
RUNS=()
for fold in 0 1 2; do RUNS+=(--run "$WORK/slots/fold$fold/runs/$METHOD-seed0"); done
POSTPROCESSING=()
[ "$(cat "$RESULTS/postprocessing.json")" = "{}" ] || POSTPROCESSING=(--postprocessing "$RESULTS/postprocessing.json")
"$BIN/brats-cggm" export "${RUNS[@]}" --checkpoint last --out "$OUT" --parity-cases 1 \
    --evaluation "$RESULTS/real_cv_card.json" "${POSTPROCESSING[@]}" --no-tta \
    --description "Three four-branch U-Nets (one 8-16-32-64 encoder per sequence, slot fusion, 2 mm), trained with $RULE, one per fold of $CASES labelled real BraTS cases (each on about two thirds of them), averaged. Any non-empty subset of the sequences can be given; a sequence left out switches its branch off. Research use only; NOT for clinical use."
