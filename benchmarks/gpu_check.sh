#!/usr/bin/env bash
# The device checks, in one command on a machine with a CUDA GPU; everything goes to stdout.
#   1. the CUDA-only tests (bf16 against fp32 relevance and scores, memory-sized batches, CUDA vs CPU maps)
#   2. the pipeline on one 13 x 496 x 1024 volume, fp32 against bf16 (stage times, B-scans/s)
#   3. end-to-end ingest throughput (benchmarks/throughput.py) on CUDA, 496 x 1024 B-scans, shipped model,
#      region grower
#   4. SAM 2.1 Hiera-T built from its config with random weights: time per prompt on CUDA by batch size,
#      and host<->device synchronisations of one LRP call for 4 and 16 B-scans (equal: none per B-scan)
# On a machine without CUDA it says so and exits 0 having run nothing.
# Run from anywhere: bash benchmarks/gpu_check.sh   (PYTHON=... to use another interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA: nothing to check on this machine"
    exit 0
fi
failed=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "0. device"
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); free, total = torch.cuda.mem_get_info()
print(f"{p.name}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), bf16 {torch.cuda.is_bf16_supported()}, torch {torch.__version__}")'

step "1. CUDA-only tests"
"$PY" -m pytest -q -s -rs -k cuda tests/test_explain.py tests/test_cuda_path.py || failed=1

step "2. pipeline, one volume of 13 x 496 x 1024, region grower: fp32 then bf16"
for precision in fp32 bf16; do
    "$PY" benchmarks/pipeline_speed.py --device cuda --precision "$precision" --bscans 13 --width 1024 \
        --segmenter region --repeats 2 --batched-only || failed=1
done

step "3. ingest throughput on CUDA (496 x 1024, shipped model, region grower; precision auto = bf16)"
"$PY" benchmarks/throughput.py --device cuda --width 1024 --height 496 --volumes 2 --bscans 13 \
    --segmenter region --workers 2 || failed=1

step "4. SAM 2.1 Hiera-T (random weights) per prompt, and synchronisations per LRP call"
"$PY" - <<'EOF' || failed=1
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sam2.build_sam import build_sam2

from hrf_batch.config import DEFAULT_MODEL, MODELS_DIR
from hrf_batch.model.classify import load_classifier
from hrf_batch.model.explain import Explainer
from hrf_batch.segment.prompts import make_prompt
from hrf_batch.segment.sam import Sam2Segmenter
from hrf_batch.segment.weights import sam2_spec

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:  # random weights through the real loader: no download needed
    path = Path(tmp) / sam2_spec("tiny").filename
    torch.save({"model": build_sam2(sam2_spec("tiny").config, None, device="cpu").state_dict()}, path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (496, 1024)).astype(np.float32)
    for batch in (1, 4, 16):
        seg = Sam2Segmenter(path, "tiny", device="cuda", batch_size=batch)
        n = 32
        prompts = [make_prompt((int(rng.integers(60, 436)), int(rng.integers(60, 964))), image.shape) for _ in range(n)]
        seg.segment([image] * batch, prompts[:batch])  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        start = time.perf_counter()
        masks = seg.segment([image] * n, prompts)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"SAM 2.1 Hiera-T, batch {batch:2d}: {1000 * seconds / n:6.1f} ms per prompt "
              f"({n} prompts, {sum(int(m.any()) for m in masks)} non-empty masks)")
        del seg
        torch.cuda.empty_cache()

clf = load_classifier(str(MODELS_DIR / DEFAULT_MODEL), "cuda")
for n in (4, 16):
    images = np.random.default_rng(n).integers(0, 256, (n, 496, 1024)).astype(np.float32)
    with Explainer(clf) as explainer:
        explainer.explain(images[:1])  # warm-up
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            explainer.explain(images)
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    print(f"LRP of {n:2d} B-scans (batch {clf.batch_for(images.shape)}, {clf.precision}): {syncs} synchronising calls")
EOF

step "done"
if [ "$failed" -ne 0 ]; then
    echo "gpu_check: some step FAILED (see above)"
    exit 1
fi
echo "gpu_check: every step passed"
