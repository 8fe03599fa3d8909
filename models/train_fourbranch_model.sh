#!/usr/bin/env bash
# Rebuild the four-branch CGGM model, brats_cggm/models/brats_cggm_fourbranch.onnx (+ .card.json), from your
# own copy of labelled BraTS cases: models/train_real_model.sh's three steps (the protocol's folds, the
# clean-up and mirroring scored on them, the fold networks exported as one ensemble) for the protocol row
# slots-cggm-paper-dropout: one 8-16-32-64 encoder per sequence, slot fusion, sequence dropout 0.25, CGGM
# with the paper's rule, cpu-real for 150 epochs, last checkpoint.
#
#   DATA=/path/to/brats/cases bash models/train_fourbranch_model.sh     # ~65 min on 2 CPU cores for 13 cases
#   ROW=slots-cggm-deficit-dropout DATA=... bash models/train_fourbranch_model.sh   # the deficit variant
#
# Research use only: not for clinical use, and the card says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROW=${ROW:-slots-cggm-paper-dropout}
export WORK=${WORK:-runs/real_cv_paired}
export RESULTS=${RESULTS:-$WORK/results-fourbranch}
export OUT=${OUT:-brats_cggm/models/brats_cggm_fourbranch.onnx}
# the row's recipe and encoder widths (its screen candidate's, or the preset's), for the card
RECIPE=$("${BIN:-.venv/bin}/python" -c "import sys; sys.path.insert(0, 'bench'); from real_cv import ROWS; print(ROWS['$ROW'].label)")
WIDTHS=$("${BIN:-.venv/bin}/python" -c "import sys; sys.path.insert(0, 'bench'); from real_cv import widths; print(widths('$ROW'))")
export DESCRIPTION="Three four-branch U-Nets (one $WIDTHS encoder per sequence, slot fusion, 2 mm), one per fold of @CASES@ labelled real BraTS cases (each trained on about two thirds of them), averaged; recipe: $RECIPE. Any non-empty subset of the sequences can be given: a sequence left out switches its branch off."
mkdir -p "$RESULTS"
exec bash models/train_real_model.sh
