#!/usr/bin/env bash
# The cross-generator evaluation of the model card: train on generator a, on generator b and on both
# (the shipped recipe), test each on fresh seeds of both generators, and the shipped model on the held-out
# generator c; then the guards on and off, and the paper's findings (CCT vs MIL, prompting vs global
# relevance threshold, iterations) per generator. About 2 h on 2 CPU cores; the studies are those of
# scripts/train_shipped_model.sh, and c_eval (written here). Segmentation is
# scored on the first 12 volumes of each evaluation study, as in the model card.
set -euo pipefail
cd "$(dirname "$0")/.."
HB=.venv/bin/hrf-batch
PY=.venv/bin/python
WORK=${WORK:-/tmp/hrf-batch-train}
MODELS=${MODELS:-$WORK/models}
SHIPPED=hrf_batch/model/shipped/cct-lite-synth
[ -d "$WORK/b_eval" ] || WORK=$WORK bash scripts/train_shipped_model.sh
# generator c is held out: nothing trains on it; the shipped model is measured on it below
[ -d "$WORK/c_eval" ] || $HB synth "$WORK/c_eval" --generator c --patients 12 --visits 2 --bscans 9 --widths 512,768,1024,1536 --seed 606
train() { $HB train "$@" --preset cct-lite --eval-every 100 --batch-size 8 --max-lr 1e-3 --seed 0 --device cpu; }
[ -f "$MODELS/a/config.json" ] || train "$WORK/a_train" --out "$MODELS/a" --steps 800
[ -f "$MODELS/b/config.json" ] || train "$WORK/b_train" --out "$MODELS/b" --steps 500
[ -f "$MODELS/mil_ab/config.json" ] || $HB train "$WORK/a_train" "$WORK/b_train" --out "$MODELS/mil_ab" --preset mil-alexnet \
  --steps 300 --eval-every 100 --batch-size 8 --max-lr 1e-3 --seed 0 --device cpu
for loop in default recall; do  # the model card's cross-generator table
  $PY scripts/cross_generator.py table --model "A=$MODELS/a" --model "B=$MODELS/b" --model "A+B (shipped)=$SHIPPED" \
    --study "A=$WORK/a_eval" --study "B=$WORK/b_eval" --limit-volumes 12 --device cpu --loop $loop
  $PY scripts/cross_generator.py table --model "A+B (shipped)=$SHIPPED" --study "C=$WORK/c_eval" --limit-volumes 12 \
    --device cpu --loop $loop
done
for g in b c; do
  $PY scripts/cross_generator.py guards --model "A+B (shipped)=$SHIPPED" --study "${g^^}=$WORK/${g}_eval" --limit-volumes 12 --device cpu
done
for g in a b; do
  $PY scripts/cross_generator.py paper --loop card --model "CCT=$SHIPPED" --model "MIL=$MODELS/mil_ab" --study "${g^^}=$WORK/${g}_eval" --limit-volumes 12 --device cpu
done
$PY scripts/cross_generator.py paper --loop card --model "CCT=$SHIPPED" --study "C=$WORK/c_eval" --limit-volumes 12 --device cpu
