#!/usr/bin/env bash
# The main job on the embedded defaults: a small synthetic study, ingested with the shipped model
# into ./hrf_batch.sqlite, then a per-patient PDF report and cohort CSVs.
set -euo pipefail
cd "$(dirname "$0")/.."
HB=.venv/bin/hrf-batch
rm -rf sample_study reports exports hrf_batch.sqlite
$HB synth sample_study --patients 2 --visits 2 --bscans 5 --seed 7
$HB ingest sample_study
$HB report --patient P001 --out reports
$HB export --out exports
