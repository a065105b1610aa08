#!/usr/bin/env bash
# The main job on the embedded defaults: write a small synthetic study, then read it all back.
set -euo pipefail
cd "$(dirname "$0")/.."
HB=.venv/bin/hrf-batch
rm -rf sample_study
$HB synth sample_study --patients 2 --visits 2 --bscans 5 --seed 7
$HB scan sample_study
$HB info sample_study/P001/2023-01-10/P001_2023-01-10_OD.vol
