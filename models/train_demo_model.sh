#!/usr/bin/env bash
# Rebuild the shipped demo model, brats_cggm/models/brats_cggm_phantom_demo.onnx (+ .card.json), with the
# project's own CLI: 30 phantom cases (96^3) -> cpu-small training with sequence dropout (so
# that a missing sequence can be switched off at inference) -> ONNX export with its card.
#
#   bash models/train_demo_model.sh            # ~15-25 min on 2 CPU cores
#   BALANCER=cggm EPOCHS=30 bash models/train_demo_model.sh
#
# The model has only seen synthetic phantoms: it is for demonstrations and tests, not for
# clinical use, and its card says so.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/demo_model}
BALANCER=${BALANCER:-none}
EPOCHS=${EPOCHS:-50}
LR=${LR:-1e-3}
SEED=${SEED:-0}
OUT=${OUT:-brats_cggm/models/brats_cggm_phantom_demo.onnx}

[ -f "$WORK/phantoms/BraTS2021_00029/BraTS2021_00029_seg.nii.gz" ] ||
    "$BIN/brats-cggm" phantom --out "$WORK/phantoms" --cases 30 --size 96 --seed 0
"$BIN/brats-cggm" train --data "$WORK/phantoms" --out "$WORK/$BALANCER-seed$SEED" --preset cpu-small \
    --balancer "$BALANCER" --epochs "$EPOCHS" --lr "$LR" --seed "$SEED" --set network.sequence_dropout=0.25
"$BIN/brats-cggm" export --run "$WORK/$BALANCER-seed$SEED" --out "$OUT" --parity-cases 2 \
    --description "Demonstration model trained on 30 synthetic phantom cases (brats-cggm phantom, 96^3), never on patient data. NOT for clinical use."
