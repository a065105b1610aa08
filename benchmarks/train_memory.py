"""Peak memory of `hrf-batch train --stream` on a small and a 10x larger labelled study: it should not
grow with the study. The in-memory path (no --stream) runs too, for contrast.

Each label set is real HEYEX .vol files (written with a cheap pixel generator: a bright band, noise
and 1-3 bright dots on HRF-positive B-scans; the question is file count and size, not realism) and a
labels CSV. Each training runs as a fresh `python -m hrf_batch train` child; its peak resident set
size is the child's own ru_maxrss (os.wait4), so one run cannot inflate another's number.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_memory.py [--work DIR] [--sizes 1000 10000]
     [--per-volume 50] [--height 128 --width 128] [--steps 20] [--batch-size 8] [--cache-mb 8]
Label sets are kept under --work and reused by later runs with the same sizes.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrf_batch.io.volume import BScanPosition, Spacing, Volume, VolumeMeta
from hrf_batch.io.writers.vol import write_vol


def _pixels(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, list[int]]:
    """Display-scale B-scans: a bright band on a dark background with speckle; dots on some."""
    rows = np.arange(h, dtype=np.float32)[:, None]
    band = 150.0 * np.exp(-0.5 * ((rows - h * 0.45) / (h * 0.12)) ** 2)
    images = np.clip(band[None] + rng.normal(20.0, 12.0, size=(n, h, w)), 0, 255).astype(np.float32)
    counts = []
    for img in images:
        k = int(rng.integers(1, 4)) if rng.random() < 0.4 else 0
        for _ in range(k):
            r, c = int(rng.integers(int(h * 0.35), int(h * 0.55))), int(rng.integers(2, w - 4))
            img[r : r + 3, c : c + 3] = 250.0
        counts.append(k)
    return images, counts


def _meta(patient: str, eye: str, n: int, w: int) -> VolumeMeta:
    lateral = 6.0 / w
    return VolumeMeta(
        source_path="", source_sha256="", source_format="heyex-vol", series_uid=f"{patient}-{eye}", patient_id=patient,
        eye=eye, visit_date=None, acquired_at=None, device="Heidelberg Engineering Spectralis", scan_pattern="volume",
        spacing=Spacing(lateral, 0.00387, 0.12),
        positions=tuple(BScanPosition((1.5, 7.5 - 0.12 * i), (7.5, 7.5 - 0.12 * i)) for i in range(n)),
    )


def label_set(work: Path, n_bscans: int, per_volume: int, h: int, w: int) -> tuple[Path, Path, int]:
    """(study folder, labels CSV, files) for ``n_bscans`` B-scans, written once and then reused."""
    folder = work / f"set_{n_bscans}_{per_volume}_{h}x{w}"
    labels = folder / "labels.csv"
    n_files = -(-n_bscans // per_volume)
    if labels.is_file():  # written last: its presence means the set is complete
        return folder, labels, n_files
    rng = np.random.default_rng(n_bscans)
    rows = []
    for k in range(n_files):
        n = min(per_volume, n_bscans - k * per_volume)
        patient, eye = f"B{k // 2:05d}", ("OD", "OS")[k % 2]
        images, counts = _pixels(rng, n, h, w)
        name = f"{patient}_{eye}.vol"
        write_vol(Volume(bscans=images, meta=_meta(patient, eye, n, w)), folder / name)
        rows += [[name, i, c] for i, c in enumerate(counts)]
    tmp = labels.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows([["file", "bscan_index", "count"], *rows])
    tmp.replace(labels)
    return folder, labels, n_files


@dataclass(frozen=True)
class Measured:
    peak_mib: float
    seconds: float
    model_id: str = ""


def run_child(cmd: list[str], log: Path) -> Measured:
    """Run ``cmd`` to the end; its own peak RSS (not its parent's, not an earlier child's)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); its output is in {log}")
    saved = re.search(r"saved (\S+) to", log.read_text())
    return Measured(usage.ru_maxrss / 1024, time.perf_counter() - start, saved.group(1) if saved else "")  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hrf-train-memory")
    ap.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--per-volume", type=int, default=50, help="B-scans per .vol file")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache-mb", type=int, default=8, help="--cache-mb of the streamed runs")
    ap.add_argument("--skip-memory-large", action="store_true", help="no in-memory run on the large set")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    sets = {}
    for name, n in zip(("small", "large"), args.sizes):
        start = time.perf_counter()
        sets[name] = label_set(args.work, n, args.per_volume, args.height, args.width)
        print(f"{name} set: {n} B-scans in {sets[name][2]} .vol files under {sets[name][0]} "
              f"({time.perf_counter() - start:.1f} s to write or find)", flush=True)

    def train(name: str, stream: bool) -> Measured:
        folder, labels, _ = sets[name]
        tag = f"{name}_{'stream' if stream else 'memory'}"
        cmd = [sys.executable, "-m", "hrf_batch", "train", str(folder), "--labels", str(labels), "--out",
               str(args.work / f"model_{tag}"), "--preset", "cct-tiny", "--steps", str(args.steps), "--eval-every",
               str(args.steps), "--batch-size", str(args.batch_size), "--device", "cpu"]
        if stream:
            cmd += ["--stream", "--cache-mb", str(args.cache_mb)]
        return run_child(cmd, args.work / f"{tag}.log")

    # what the training child holds before it reads a B-scan: the interpreter with the CLI and torch loaded
    baseline = run_child([sys.executable, "-c", "import hrf_batch.cli, hrf_batch.training.train"], args.work / "imports.log")
    runs = [("small", True), ("large", True), ("small", False)] + ([] if args.skip_memory_large else [("large", False)])
    results = {}
    for name, stream in runs:
        results[(name, stream)] = train(name, stream)
        m = results[(name, stream)]
        print(f"  {name:5} {'streamed' if stream else 'in memory':9}: peak RSS {m.peak_mib:7.1f} MiB, {m.seconds:6.1f} s", flush=True)

    print()
    print(f"B-scans of {args.height}x{args.width} px (small, to measure memory quickly), {args.per_volume} per .vol file; "
          f"cct-tiny, {args.steps} steps of {args.batch_size}, validation and calibration on 20% of patients, CPU, "
          f"{os.cpu_count()} cores; streamed runs with --cache-mb {args.cache_mb}")
    print(f"{'set':6} {'B-scans':>8} {'mode':10} {'peak RSS MiB':>13} {'above imports':>14} {'wall s':>7}")
    print(f"{'-':6} {'-':>8} {'imports':10} {baseline.peak_mib:13.1f} {0.0:14.1f} {baseline.seconds:7.1f}")
    for (name, stream), m in results.items():
        n = args.sizes[0] if name == "small" else args.sizes[1]
        print(f"{name:6} {n:8d} {'streamed' if stream else 'in memory':10} {m.peak_mib:13.1f} "
              f"{m.peak_mib - baseline.peak_mib:14.1f} {m.seconds:7.1f}")
    ratio = results[("large", True)].peak_mib / results[("small", True)].peak_mib
    print(f"streamed peak RSS, large / small: {ratio:.2f} for {args.sizes[1] / args.sizes[0]:.0f}x the B-scans")
    if ("large", False) in results:
        mem_ratio = results[("large", False)].peak_mib / results[("small", False)].peak_mib
        print(f"in-memory peak RSS, large / small: {mem_ratio:.2f}")
    for name in ("small", "large"):
        if (name, False) in results:
            a, b = results[(name, True)].model_id, results[(name, False)].model_id
            print(f"{name} set, streamed and in memory: {'the same model ' + a if a == b else f'different models {a} / {b}'}")


if __name__ == "__main__":
    main()
