#!/usr/bin/env bash
# Rebuild the shipped default model, brats_cggm/models/brats_cggm_real.onnx (+ .card.json), from your own
# copy of labelled BraTS cases, with the project's own CLI. The recipe is the row that measured
# best in the cross-validation on real cases (bench/real_cv.py, docs/real_data.md):
#   1. phantom pre-training: 30 calibrated phantoms (96^3, seed 0), cpu-real for 60 epochs;
#   2. real training from those weights (--init): the cpu-real recipe (2 mm, 64^3 patches,
#      sequence dropout 0.25, AdamW 1e-3, 150 epochs) on every case but about 8 % kept for
#      epoch selection;
# both with the early-fusion U-Net at the widths of the multi-branch network (8-16-32-64);
# then ONNX export with its card.
#
#   DATA=/path/to/BraTS2018/training bash models/train_real_model.sh     # ~20 min on 2 CPU cores for 12 cases
#
# EVALUATION names a JSON file of the recipe's cross-validated results for the card
# (bench/real_cv.py --card writes it). Research use only: not for clinical use, and the card says so.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a folder of labelled BraTS cases (any supported layout)}"
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/real_model}
PRETRAIN=${PRETRAIN:-runs/real_model_pretrain}
SEED=${SEED:-0}
OUT=${OUT:-brats_cggm/models/brats_cggm_real.onnx}
EVALUATION=${EVALUATION:-bench/results/real_cv_card.json}
CASES=$(find "$DATA" -name '*seg.nii*' | wc -l)
NETWORK=(--network early_fusion --set 'network.overrides={"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}')

if [ ! -f "$PRETRAIN/run/summary.json" ]; then
    [ -d "$PRETRAIN/phantoms" ] || "$BIN/brats-cggm" phantom --out "$PRETRAIN/phantoms" --cases 30 --size 96 --seed 0
    rm -rf "$PRETRAIN/run"
    "$BIN/brats-cggm" train --data "$PRETRAIN/phantoms" --out "$PRETRAIN/run" --preset cpu-real --epochs 60 \
        --set validation.every=20 "${NETWORK[@]}"
fi
if [ -f "$WORK/checkpoints/last.pt" ]; then
    "$BIN/brats-cggm" train --out "$WORK" --resume
else
    "$BIN/brats-cggm" train --data "$DATA" --out "$WORK" --preset cpu-real --seed "$SEED" --set data.val_fraction=0.08 \
        --init "$PRETRAIN/run" "${NETWORK[@]}"
fi
"$BIN/brats-cggm" export --run "$WORK" --out "$OUT" --parity-cases 1 \
    $([ -f "$EVALUATION" ] && echo --evaluation "$EVALUATION") \
    --description "Trained on $CASES labelled BraTS 2018 training cases (real MRI; cpu-real recipe at 2 mm, early-fusion U-Net), starting from a network pre-trained on 30 calibrated phantoms, with sequence dropout so any non-empty subset of the four sequences works. Research use only; NOT for clinical use."
