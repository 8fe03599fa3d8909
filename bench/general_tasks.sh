#!/usr/bin/env bash
# Evidence for the general tasks on synthetic data in the official formats, with a strong
# imbalance (text dominant, 4x the signal-to-noise of the other modalities):
# every method x 3 seeds on CMU-MOSI (aligned pickle) and IEMOCAP (MMIN layout, fold 1),
# none vs cggm x 3 seeds on UPMC-Food 101 (features of tiny RANDOM BERT/ViT: not pretrained).
# Results: bench/results/general_{mosi,iemocap,food101}/results.md (+ csv, png, runs/).
# About 40 min on 2 CPU cores. Usage: bash bench/general_tasks.sh [mosi|iemocap|food101 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
MG=${MG:-.venv/bin/multimodal-general}
DATA=runs/general_data
RESULTS=bench/results
METHODS=none,cggm,ogm_ge,mmpareto,agm,mslr,modality_dropout,gblending
COMMON=(--seeds 3 --epochs 12 --d-model 32 --layers 1 --threads 1)
mkdir -p "$DATA"
tasks=("$@"); [ $# -gt 0 ] || tasks=(mosi iemocap food101)
for task in "${tasks[@]}"; do
  case $task in
    mosi)
      [ -e $DATA/mosi.pkl ] || $MG synth --task mosi --out $DATA/mosi.pkl --samples 1200 --imbalance 4 --strength 2 --seed 0
      $MG compare --task mosi --data $DATA/mosi.pkl --methods $METHODS "${COMMON[@]}" --out $RESULTS/general_mosi ;;
    iemocap)
      [ -e $DATA/iemocap ] || $MG synth --task iemocap --out $DATA/iemocap --samples 1500 --imbalance 4 --strength 1 --seed 0
      $MG compare --task iemocap --data $DATA/iemocap --fold 1 --methods $METHODS "${COMMON[@]}" --out $RESULTS/general_iemocap ;;
    food101)
      [ -e $DATA/food101 ] || $MG synth --task food101 --out $DATA/food101 --samples 640 --imbalance 4 --strength 1 --random-encoders --seed 0
      $MG compare --task food101 --data $DATA/food101 --bert $DATA/food101/random_encoders/bert \
        --vit $DATA/food101/random_encoders/vit --methods none,cggm "${COMMON[@]}" --out $RESULTS/general_food101 ;;
    *) echo "unknown task $task" >&2; exit 2 ;;
  esac
done
