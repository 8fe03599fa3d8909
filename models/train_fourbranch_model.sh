#!/usr/bin/env bash
# Rebuild the four-branch CGGM model, brats_cggm/models/brats_cggm_fourbranch.onnx (+ .card.json), from your
# own copy of labelled BraTS cases: models/train_real_model.sh's three steps (the protocol's folds, the
# clean-up and mirroring scored on them, the fold networks exported as one ensemble) for the protocol row
# slots-c3-cggm-deficit-lr-partial-init: the screen's four-branch network (C3, one 8-16-32-64-128 encoder
# per sequence, slot fusion), phantom pre-training, sequence dropout 0.25, CGGM with the deficit rule
# (lam 0, B as each encoder's learning rate), the cases that lack sequences as well, cpu-real for 143
# epochs (C3's equal wall time), last checkpoint. DATA must also hold those cases (a parent folder of
# several, e.g. full cases and a partial/ folder of FLAIR+T1ce-only cases; docs/real_data.md).
#
#   DATA=/path/to/brats/cases bash models/train_fourbranch_model.sh     # ~2 h on 2 CPU cores for 13 + 5 cases
#   ROW=slots-cggm-paper-dropout DATA=... bash models/train_fourbranch_model.sh   # the paper's rule (shipped before)
#
# Research use only: not for clinical use, and the card says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROW=${ROW:-slots-c3-cggm-deficit-lr-partial-init}
export WORK=${WORK:-runs/real_cv_paired}
export RESULTS=${RESULTS:-$WORK/results-fourbranch}
export OUT=${OUT:-brats_cggm/models/brats_cggm_fourbranch.onnx}
# the row's recipe and encoder widths (its screen candidate's, or the preset's), for the card
read -r WIDTHS RECIPE < <("${BIN:-.venv/bin}/python" -c "import sys; sys.path.insert(0, 'bench'); from real_cv import ROWS, widths; print(widths('$ROW'), ROWS['$ROW'].label)")
export DESCRIPTION="Three four-branch U-Nets (one $WIDTHS encoder per sequence, slot fusion, 2 mm), one per fold of @CASES@ labelled real BraTS cases (each trained on about two thirds of them), averaged; recipe: $RECIPE. Any non-empty subset of the sequences can be given: a sequence left out switches its branch off."
mkdir -p "$RESULTS"
exec bash models/train_real_model.sh
