#!/usr/bin/env bash
# Create .venv and install hrf-batch with pinned dependencies.
# torch comes first; the rest is installed without build isolation because sam2 is an sdist whose
# isolated build would fetch a second torch and try to compile CUDA code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q pip==24.3.1 setuptools==84.2.1 wheel==0.48.0
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation -c constraints.txt -e ".[dev]"
