"""How long reading a 49×496×1024 volume takes for each format (target: well under 1 s).

Run: .venv/bin/python benchmarks/read_speed.py [--bscans 49 --height 496 --width 1024 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from hrf_batch.io.discover import discover, read_sources
from hrf_batch.io.volume import BScanPosition, Spacing, Volume, VolumeMeta
from hrf_batch.io.writers.dicom import write_dicom_oct
from hrf_batch.io.writers.e2e import write_e2e
from hrf_batch.io.writers.heyex_xml import write_heyex_xml
from hrf_batch.io.writers.vol import write_vol
from hrf_batch.synthetic.fundus import synth_localizer
from hrf_batch.synthetic.generator_a import synth_volume


def _volume(n: int, h: int, w: int) -> Volume:
    rng = np.random.default_rng(0)
    images, _ = synth_volume(rng, n_bscans=n, height=h, width=w)
    lateral = 6.0 / w
    meta = VolumeMeta(
        source_path="", source_sha256="", source_format="heyex-vol", series_uid="BENCH1", patient_id="B001",
        eye="OD", visit_date=None, acquired_at=None, device="Heidelberg Engineering Spectralis", scan_pattern="volume",
        spacing=Spacing(lateral, 0.00387, 0.12),
        positions=tuple(BScanPosition((1.5, 7.5 - 0.12 * i), (7.5, 7.5 - 0.12 * i)) for i in range(n)),
        localizer_spacing_mm=(0.01182, 0.01182),
    )
    return Volume(bscans=images.astype(np.float32), meta=meta, localizer=synth_localizer(rng, size=768))


def _time_read(folder: Path, repeats: int) -> tuple[float, tuple[int, ...]]:
    sources = discover(folder).sources
    times, shape = [], ()
    for _ in range(repeats):
        start = time.perf_counter()
        vols = list(read_sources(sources))
        times.append(time.perf_counter() - start)
        shape = vols[0].bscans.shape
    return statistics.median(times), shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bscans", type=int, default=49)
    ap.add_argument("--height", type=int, default=496)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    vol = _volume(args.bscans, args.height, args.width)
    writers = {
        "heyex-vol": lambda d: write_vol(vol, d / "v.vol"),
        "heyex-e2e": lambda d: write_e2e([vol], d / "v.e2e"),
        "heyex-xml": lambda d: write_heyex_xml(vol, d, stem="v"),
        "dicom multi-frame": lambda d: write_dicom_oct(vol, d, multiframe=True),
        "dicom single-frame series": lambda d: write_dicom_oct(vol, d, multiframe=False),
    }
    print(f"read time per volume of {args.bscans}x{args.height}x{args.width}, median of {args.repeats}")
    for name, write in writers.items():
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            seconds, shape = _time_read(Path(tmp), args.repeats)
        print(f"{name:28s} {seconds:7.3f} s   shape {shape}")


if __name__ == "__main__":
    main()
