#!/usr/bin/env bash
# Reproduce the shipped classifier hrf_batch/model/shipped/cct-lite-synth from scratch (about 30 min on 2 CPU cores):
# two synthetic training studies written by independent generators (40 patients x 2 visits x 2 eyes x 9 B-scans
# each; generator a at 496x512, seed 101; generator b at widths 512/768/1024, seed 111), then 1000 AdamW/OneCycle
# steps of the cct-lite preset with strong augmentation; the best model by validation AUROC is kept and its
# scores are calibrated on the validation patients. The evaluation studies (seeds 202 and 303) are never trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
HB=.venv/bin/hrf-batch
WORK=${WORK:-/tmp/hrf-batch-train}
OUT=${OUT:-hrf_batch/model/shipped/cct-lite-synth}
[ -d "$WORK/a_train" ] || $HB synth "$WORK/a_train" --patients 40 --visits 2 --bscans 9 --seed 101
[ -d "$WORK/b_train" ] || $HB synth "$WORK/b_train" --generator b --patients 40 --visits 2 --bscans 9 --widths 512,768,1024 --seed 111
[ -d "$WORK/a_eval" ] || $HB synth "$WORK/a_eval" --patients 12 --visits 2 --bscans 9 --seed 202
[ -d "$WORK/b_eval" ] || $HB synth "$WORK/b_eval" --generator b --patients 12 --visits 2 --bscans 9 --widths 512,768,1024,1536 --seed 303
$HB train "$WORK/a_train" "$WORK/b_train" --out "$OUT" --preset cct-lite --steps 1000 --eval-every 100 --batch-size 8 \
  --max-lr 1e-3 --seed 0 --device cpu
rm -f "$OUT/train_state.pt"   # resume state, not part of the model
$HB evaluate "$WORK/a_eval" --model "$OUT" --device cpu
$HB evaluate "$WORK/b_eval" --model "$OUT" --device cpu
