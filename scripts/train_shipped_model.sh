#!/usr/bin/env bash
# Reproduce the shipped classifier hrf_batch/model/shipped/cct-lite-synth from scratch (about 12 min on 2 CPU cores):
# a synthetic training study (40 patients x 2 visits x 2 eyes x 9 B-scans of 496x512, seed 101),
# then 500 AdamW/OneCycle steps of the cct-lite preset; the best model by validation AUROC is kept.
# The evaluation study (seed 202) was never seen in training.
set -euo pipefail
cd "$(dirname "$0")/.."
HB=.venv/bin/hrf-batch
WORK=${WORK:-/tmp/hrf-batch-train}
OUT=${OUT:-hrf_batch/model/shipped/cct-lite-synth}
$HB synth "$WORK/train_study" --patients 40 --visits 2 --bscans 9 --seed 101
$HB synth "$WORK/eval_study" --patients 12 --visits 2 --bscans 9 --seed 202
$HB train "$WORK/train_study" --out "$OUT" --preset cct-lite --steps 500 --eval-every 50 --batch-size 8 \
  --max-lr 1e-3 --seed 0 --device cpu
rm -f "$OUT/train_state.pt"   # resume state, not part of the model
$HB evaluate "$WORK/eval_study" --model "$OUT" --device cpu
