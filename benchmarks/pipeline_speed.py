"""Per-volume pipeline time by stage (score, explain, segment), and the batched pipeline's speed-up
over a loop that handles one B-scan at a time, both measured in the same run on the same volume.

Run: .venv/bin/python benchmarks/pipeline_speed.py [--bscans 9 --width 512 --segmenter region]
     [--device cuda --precision bf16 --batched-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from datetime import date, datetime

import numpy as np

from hrf_batch.config import DEFAULT_MODEL, MODELS_DIR
from hrf_batch.io.volume import Volume
from hrf_batch.model.classify import load_classifier
from hrf_batch.pipeline import PipelineParams, run_volume
from hrf_batch.segment import make_segmenter
from hrf_batch.synthetic.study import StudySpec, synthetic_volume


def _one_at_a_time(volume: Volume, clf, segmenter, params: PipelineParams) -> tuple[float, int]:
    start, found = time.perf_counter(), 0
    for i in range(volume.n_bscans):
        meta = dataclasses.replace(volume.meta, positions=(volume.meta.positions[i],) if volume.meta.positions else ())
        single = Volume(bscans=volume.bscans[i : i + 1], meta=meta, localizer=volume.localizer)
        found += run_volume(single, clf, segmenter, params).hrf_count
    return time.perf_counter() - start, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(MODELS_DIR / DEFAULT_MODEL))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--segmenter", default="auto", choices=["auto", "sam2", "region"])
    ap.add_argument("--sam2-checkpoint", default=None)
    ap.add_argument("--bscans", type=int, default=9)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="default: fitted to free memory on CUDA, 2 on CPU")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each variant")
    ap.add_argument("--batched-only", action="store_true", help="skip the one-B-scan-at-a-time loop")
    args = ap.parse_args()
    clf = load_classifier(args.model, args.device, args.batch_size, args.precision)
    segmenter = make_segmenter(args.segmenter, sam2_checkpoint=args.sam2_checkpoint, device=args.device)
    spec = StudySpec(bscans=args.bscans, width=args.width, height=496, seed=5)
    volume, labels = synthetic_volume(np.random.default_rng(5), spec, "B001", date(2024, 1, 1), "OD", 0.6, datetime(2024, 1, 1, 9))
    params = PipelineParams()
    _one_at_a_time(Volume(volume.bscans[:2], dataclasses.replace(volume.meta, positions=volume.meta.positions[:2])),
                   clf, segmenter, params)  # warm-up: first calls allocate and build kernels
    batched, looped, looped_found = float("inf"), float("inf"), 0
    for _ in range(args.repeats):  # alternate the two so neither profits from running second
        start = time.perf_counter()
        result = run_volume(volume, clf, segmenter, params)
        batched = min(batched, time.perf_counter() - start)
        if not args.batched_only:
            seconds, looped_found = _one_at_a_time(volume, clf, segmenter, params)
            looped = min(looped, seconds)
    gt = sum(len(np.unique(lab[lab > 0])) for lab in labels)
    batch = clf.batch_for(volume.bscan_shape)
    print(f"model {clf.model_id} on {clf.device} in {clf.precision}, segmenter {segmenter.name}, "
          f"LRP batch size {batch}{' (fitted to free memory)' if clf.fit_batch_to_memory else ''}")
    print(f"volume {volume.n_bscans} x 496 x {args.width}, {gt} ground-truth HRFs")
    print("batched pipeline, seconds by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in result.run.seconds.items()))
    print(f"batched total (best of {args.repeats})  {batched:7.2f} s   ({result.hrf_count} HRFs found, "
          f"{volume.n_bscans / batched:.2f} B-scans/s)")
    if not args.batched_only:
        print(f"one B-scan at a time (best)  {looped:7.2f} s   ({looped_found} HRFs found)")
        print(f"speed-up of batching {looped / batched:6.2f}x")


if __name__ == "__main__":
    main()
