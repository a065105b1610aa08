"""End-to-end ingest throughput: B-scans per second and time per stage, serial against ``--workers N`` and Ray.

Writes one synthetic study, then ingests it with ``hrf-batch ingest`` (as a user runs it, model loading
included) once serially, once per worker count and once per Ray actor count (``--ray local``: a private
Ray instance on this machine, its start-up included), each into a fresh SQLite database, and prints one
Markdown table measured in one run: wall time, B-scans/s, the speed-up over serial, and the summed time
per pipeline stage that the runs stored (anatomy, score, explain, segment).

Run: .venv/bin/python benchmarks/throughput.py [--workers 2] [--ray 2] [--volumes 8] [--bscans 13] [--width 512]
     [--device cpu|cuda|auto] [--devices 0,1] [--segmenter region]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

STAGES = ("anatomy", "score", "explain", "segment")


def _ingest(study: Path, db: Path, args: argparse.Namespace, workers: int, ray: bool) -> float:
    """Wall seconds of one `hrf-batch ingest` into a fresh database."""
    cmd = [str(Path(sys.executable).with_name("hrf-batch")), "ingest", str(study), "--db", str(db), "--quiet",
           "--device", args.device, "--segmenter", args.segmenter, "--workers", str(workers)]
    if ray:
        cmd += ["--ray", "local"]
    elif args.devices:
        cmd += ["--devices", args.devices]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ingest with {workers} worker(s) failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def _stored(db: Path) -> tuple[int, dict[str, float]]:
    """B-scans stored in done runs, and the per-stage seconds the runs recorded, summed."""
    with sqlite3.connect(db) as conn:
        n = conn.execute("SELECT COALESCE(SUM(v.n_bscans), 0) FROM runs r JOIN volumes v ON v.id = r.volume_pk "
                         "WHERE r.status = 'done'").fetchone()[0]
        stages = dict.fromkeys(STAGES, 0.0)
        for (seconds,) in conn.execute("SELECT seconds FROM runs WHERE status = 'done'"):
            for stage, value in json.loads(seconds).items():
                stages[stage] = stages.get(stage, 0.0) + float(value)
    return int(n), stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to compare with serial")
    ap.add_argument("--ray", type=int, nargs="*", default=[2], help="Ray actor counts (--ray local) to compare")
    ap.add_argument("--volumes", type=int, default=8, help="volumes in the study (even: both eyes per visit)")
    ap.add_argument("--bscans", type=int, default=13)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=496)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--devices", default=None, help="GPU numbers for --workers, e.g. 0,1")
    ap.add_argument("--segmenter", default="region", choices=("region", "sam2", "auto"))
    args = ap.parse_args()
    if args.volumes < 2 or args.volumes % 2:
        raise SystemExit("--volumes must be an even number of at least 2 (each visit has both eyes)")
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        spec = StudySpec(patients=1, visits=args.volumes // 2, bscans=args.bscans, width=args.width,
                         height=args.height, seed=7)
        write_synthetic_study(study, spec)
        rows = []
        runs = [("serial", 1, False)] + [(f"--workers {w}", w, False) for w in args.workers] + [
            (f"--ray local --workers {w}", w, True) for w in args.ray]
        for i, (name, workers, ray) in enumerate(runs):
            db = Path(tmp) / f"run{i}.sqlite"
            seconds = _ingest(study, db, args, workers, ray)
            n, stages = _stored(db)
            rows.append((name, seconds, n, stages))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, GPU {gpu}; "
          f"torch {torch.__version__}; device {args.device}; segmenter {args.segmenter}")
    print(f"study: {args.volumes} volumes x {args.bscans} B-scans of {args.height}x{args.width}, shipped model\n")
    print("| ingest | wall s | B-scans | B-scans/s | speed-up over serial | "
          + " | ".join(f"{s} s (summed over workers)" for s in STAGES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(STAGES))
    serial = rows[0][1]
    for name, seconds, n, stages in rows:
        print(f"| {name} | {seconds:.1f} | {n} | {n / seconds:.2f} | {serial / seconds:.2f} | "
              + " | ".join(f"{stages.get(s, 0.0):.1f}" for s in STAGES) + " |")


if __name__ == "__main__":
    main()
