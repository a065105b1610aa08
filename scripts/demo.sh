#!/usr/bin/env bash
# The main job on the embedded defaults: a small synthetic study, ingested with the shipped model
# into ./hrf_batch.sqlite, then a per-patient PDF report, cohort CSVs, DICOM SEG (with DICOM OCT for the
# HEYEX sources) and NIfTI, and a picture of one SEG drawn over its B-scans.
set -euo pipefail
cd "$(dirname "$0")/.."
HB=.venv/bin/hrf-batch
rm -rf sample_study reports exports hrf_batch.sqlite
$HB synth sample_study --patients 2 --visits 2 --bscans 5 --seed 7
$HB ingest sample_study
$HB report --patient P001 --out reports
$HB export --out exports --dicom-seg exports/dicom --nifti exports/nifti
.venv/bin/python scripts/show_segmentation.py exports/dicom/P001 exports/segmentation.png --search sample_study
