#!/usr/bin/env bash
# Rebuild the shipped default model, models/brats_cggm_real.onnx (+ .card.json), from your own
# copy of labelled BraTS cases, with the project's own CLI: the cpu-real recipe (2 mm, 64^3
# patches, sequence dropout 0.25, joint training, AdamW 1e-3, 150 epochs; docs/real_data.md)
# with the network that measured best in the cross-validation on real cases, the early-fusion
# U-Net at the widths of the multi-branch network (8-16-32-64), on every case but about 8 %
# kept for epoch selection, then ONNX export with its card.
#
#   DATA=/path/to/BraTS2018/training bash models/train_real_model.sh     # ~10-15 min on 2 CPU cores for 12 cases
#
# EVALUATION names a JSON file of the recipe's cross-validated results for the card
# (bench/real_cv.py writes it). Research use only: not for clinical use, and the card says so.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a folder of labelled BraTS cases (any supported layout)}"
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/real_model}
SEED=${SEED:-0}
OUT=${OUT:-models/brats_cggm_real.onnx}
EVALUATION=${EVALUATION:-bench/results/real_cv_card.json}
CASES=$(find "$DATA" -name '*seg.nii*' | wc -l)

if [ -f "$WORK/checkpoints/last.pt" ]; then
    "$BIN/brats-cggm" train --out "$WORK" --resume
else
    "$BIN/brats-cggm" train --data "$DATA" --out "$WORK" --preset cpu-real --seed "$SEED" --set data.val_fraction=0.08 \
        --network early_fusion --set network.fusion=mean \
        --set 'network.overrides={"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}'
fi
"$BIN/brats-cggm" export --run "$WORK" --out "$OUT" --parity-cases 1 \
    $([ -f "$EVALUATION" ] && echo --evaluation "$EVALUATION") \
    --description "Trained on $CASES labelled BraTS 2018 training cases (real MRI; cpu-real recipe at 2 mm, early-fusion U-Net), with sequence dropout so any non-empty subset of the four sequences works. Research use only; NOT for clinical use."
