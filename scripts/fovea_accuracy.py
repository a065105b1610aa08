"""How far the foveal centre found on the thickness map lies from the true one, on synthetic volumes.

Each generator draws volumes whose pit centre is known. The fovea is found twice per volume: on the
thickness map of the TRUE layer lines (the error of the pit search alone) and on that of the layer
lines ESTIMATED from the pixels (the error a volume without device segmentation gets). The error is the
distance on the fundus in micrometres, using the B-scan and lateral spacing. Prints a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fovea_accuracy.py --volumes 10 --bscans 25 --height 496 --width 512
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np

from hrf_batch.anatomy.fovea import find_fovea
from hrf_batch.anatomy.layers import estimate_layers
from hrf_batch.anatomy.thickness import thickness_map
from hrf_batch.io.volume import LAYER_NAMES, BScanPosition, LayerLines, Spacing, VolumeMeta
from hrf_batch.synthetic import generator_a, generator_b, generator_c

AXIAL_MM = 0.00387


@dataclass(frozen=True)
class Case:
    """One synthetic volume: its B-scans, true layers and true foveal centre, and its metadata."""

    images: np.ndarray
    layers: LayerLines
    fovea_bscan: float
    fovea_col: float
    meta: VolumeMeta


def _meta(n: int, width: int, lateral: float, between: float) -> VolumeMeta:
    """A right-eye raster volume laid out as the synthetic study lays it out (B-scan 0 inferior)."""
    top = 1.0 + between * (n - 1)
    positions = tuple(BScanPosition((1.0, top - i * between), (1.0 + width * lateral, top - i * between))
                      for i in range(n))
    return VolumeMeta(source_path="", source_sha256="", source_format="heyex-vol", series_uid="", patient_id="",
                      eye="OD", visit_date=None, acquired_at=None, device="synthetic", scan_pattern="volume",
                      spacing=Spacing(lateral, AXIAL_MM, between), positions=positions)


def case_a(rng: np.random.Generator, n: int, height: int, width: int) -> Case:
    """Generator A: 11.82 um columns, B-scans spread over a square field (width x lateral)."""
    v = generator_a.synth_volume_truth(rng, n_bscans=n, height=height, width=width)
    lateral = 0.01182
    layers = LayerLines({k: v.layers[k] for k in LAYER_NAMES if k in v.layers}, "ground-truth")
    return Case(v.images, layers, v.fovea_bscan, v.fovea_col, _meta(n, width, lateral, width * lateral / (n - 1)))


def _case_6mm(module: ModuleType) -> Callable[[np.random.Generator, int, int, int], Case]:
    """Generators B and C (C held out, never tuned on): a 6 mm wide B-scan, B-scans spread over 5.8 mm."""
    def case(rng: np.random.Generator, n: int, height: int, width: int) -> Case:
        v = module.synth_volume_truth(rng, n_bscans=n, height=height, width=width)
        layers = LayerLines({k: v.layers[k] for k in LAYER_NAMES if k in v.layers}, "ground-truth")
        lateral, between = module.FIELD_MM / width, module.SLOW_FIELD_MM / (n - 1)
        return Case(v.images, layers, v.fovea_bscan, v.fovea_col, _meta(n, width, lateral, between))
    return case


GENERATORS: dict[str, Callable[[np.random.Generator, int, int, int], Case]] = {
    "A": case_a, "B": _case_6mm(generator_b), "C": _case_6mm(generator_c),
}


def error_um(case: Case, layers: LayerLines) -> tuple[float | None, str]:
    """Distance (um) between the fovea found on ``layers``' thickness map and the true one; None and
    the note when none was found."""
    fovea, note = find_fovea(thickness_map(layers, case.meta.spacing.axial_mm), case.meta, case.images.shape[2])
    if fovea is None:
        return None, note
    s = case.meta.spacing
    return 1000.0 * math.hypot((fovea.bscan - case.fovea_bscan) * s.between_bscans_mm,
                               (fovea.col - case.fovea_col) * s.lateral_mm), note


def _row(generator: str, source: str, errors: list[float | None]) -> str:
    found = np.array([e for e in errors if e is not None])
    cells = [f"{np.median(found):.0f}", f"{found.mean():.0f}", f"{np.percentile(found, 90):.0f}",
             f"{found.max():.0f}", f"{(found <= 100).mean():.0%}"] if found.size else ["-"] * 5
    return f"| {generator} | {source} | {found.size}/{len(errors)} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=10, help="volumes per generator")
    ap.add_argument("--bscans", type=int, default=25)
    ap.add_argument("--height", type=int, default=496)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generators", default="AB", help="which generators, e.g. A, B, C or ABC")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per volume")
    args = ap.parse_args(argv)
    if args.volumes < 1 or args.bscans < 5:
        ap.error("need --volumes >= 1 and --bscans >= 5 (the fovea is only looked for in volumes of 5 B-scans or more)")
    if args.width < 256 or args.height < 260:
        ap.error("need --width >= 256 and --height >= 260: smaller B-scans get a coarser spacing from generator A")
    unknown = set(args.generators) - set(GENERATORS)
    if unknown:
        ap.error(f"unknown generators {sorted(unknown)}; choose from {sorted(GENERATORS)}")
    rows = []
    for name in args.generators:
        truth_err: list[float | None] = []
        est_err: list[float | None] = []
        seconds = 0.0
        for k in range(args.volumes):
            case = GENERATORS[name](np.random.default_rng([args.seed, ord(name), k]), args.bscans, args.height,
                                    args.width)
            e_true, n_true = error_um(case, case.layers)
            t0 = time.perf_counter()
            estimated = estimate_layers(case.images, case.meta.spacing)
            seconds += time.perf_counter() - t0
            e_est, n_est = error_um(case, estimated)
            truth_err.append(e_true)
            est_err.append(e_est)
            if args.verbose:
                print(f"{name} {k}: true layers {e_true if e_true is None else round(e_true)} um ({n_true}); "
                      f"estimated {e_est if e_est is None else round(e_est)} um ({n_est})", file=sys.stderr)
        rows += [_row(name, "true layers", truth_err), _row(name, "estimated layers", est_err)]
        print(f"generator {name}: layer estimate {seconds / args.volumes:.1f} s per volume", file=sys.stderr)
    print(f"Fovea location error (um on the fundus), {args.volumes} volumes per generator, {args.bscans} B-scans "
          f"of {args.height}x{args.width}, seed {args.seed}\n")
    print("| generator | layers | found | median | mean | 90th pct | max | within 100 um |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
