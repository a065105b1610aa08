"""Accuracy and speed of the layer lines estimated from the pixels.

Mean absolute error in micrometres per boundary against the synthetic generators' truth (fresh seeds,
mixed B-scan sizes), and ILM and BM against the device's lines of the real Spectralis fixtures
(columns where the device line is known), and the median signed error (is a line found too high or
too low?). Prints markdown tables.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/layer_accuracy.py [--n 40] [--seed 2024]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hrf_batch.anatomy.layers import complete_layers, estimate_layers
from hrf_batch.io.readers import read_volume
from hrf_batch.io.volume import Spacing
from hrf_batch.synthetic import generator_a, generator_b, generator_c

BOUNDARIES = ("ILM", "INL", "ELM", "EZ", "RPE", "BM")
WIDTHS = (256, 512, 768, 1024, 1536)
HEIGHTS = (400, 496, 640, 768)
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "spectralis-raw-data"
REAL = ("Willis_B_716_0.vol", "Willis_B_716_2.vol", "valid.vol")


def _synthetic(generator: str, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray], Spacing]:
    width, height = int(rng.choice(WIDTHS)), int(rng.choice(HEIGHTS))
    if generator == "A":
        scan = generator_a.synth_bscan(rng, height=height, width=width)
        lat, ax = max(0.01182, 3.0 / width), max(0.00387, 1.0 / height)  # the generator's own coarsening
        return scan.image, scan.layers, Spacing(lat, ax)
    module = generator_b if generator == "B" else generator_c
    scan = module.synth_bscan(rng, height=height, width=width)
    return scan.image, scan.layers, Spacing(module.FIELD_MM / width, module.AXIAL_MM)


def measure_synthetic(generator: str, n: int, seed: int
                      ) -> tuple[dict[str, float], dict[str, float], dict[str, float], float]:
    """Mean and 90th-percentile (over B-scans) of the per-B-scan MAE in um, the median over B-scans of
    the per-B-scan median signed error in um (negative: the estimate lies above the truth), and CPU
    ms per 512 A-scans."""
    rng = np.random.default_rng(seed)
    errors: dict[str, list[float]] = {k: [] for k in BOUNDARIES}
    signed: dict[str, list[float]] = {k: [] for k in BOUNDARIES}
    cpu = 0.0
    for _ in range(n):
        image, truth, spacing = _synthetic(generator, rng)
        start = time.process_time()
        lines = estimate_layers(image[None], spacing)
        cpu += (time.process_time() - start) * 512.0 / image.shape[1]
        for name in BOUNDARIES:
            diff = lines.rows[name][0] - truth[name]
            errors[name].append(float(np.nanmean(np.abs(diff))) * spacing.axial_mm * 1000.0)
            signed[name].append(float(np.nanmedian(diff)) * spacing.axial_mm * 1000.0)
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in errors.items()}
    bias = {k: float(np.median(v)) for k, v in signed.items()}
    return mean, p90, bias, 1000.0 * cpu / n


def measure_real(path: Path) -> dict[str, tuple[float, int, float]]:
    """Per device line (ILM, BM): MAE in um of the estimate where both are known, the number of columns
    compared, and the share of the device's known columns that the estimate left NaN."""
    volume = read_volume(path)
    if volume.layers is None:
        raise SystemExit(f"{path} carries no device layer lines; this script needs a reader that returns them")
    lines = estimate_layers(volume.bscans, volume.meta.spacing)
    done = complete_layers(volume.layers, volume.bscans, volume.meta.spacing)
    for name, device in volume.layers.rows.items():  # completing must never change a known device row
        known = np.isfinite(device)
        if not np.array_equal(done.rows[name][known], device[known]):
            raise SystemExit(f"{path}: complete_layers changed the device line {name}")
    out = {}
    for name in ("ILM", "BM"):
        device = volume.layers.rows[name]
        estimate = lines.rows[name]
        known = np.isfinite(device)
        both = known & np.isfinite(estimate)
        mae = float(np.mean(np.abs(device[both] - estimate[both]))) * volume.meta.spacing.axial_mm * 1000.0
        out[name] = (mae, int(both.sum()), float(1.0 - both.sum() / max(1, known.sum())))
    return out


def cpu_ms_496x512(repeats: int = 10) -> float:
    """Median CPU time of one 496 x 512 B-scan (the Spectralis default), in ms."""
    image = generator_b.synth_bscan(np.random.default_rng(7), height=496, width=512).image[None]
    spacing = Spacing(generator_b.FIELD_MM / 512, generator_b.AXIAL_MM)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        estimate_layers(image, spacing)
        times.append(time.process_time() - start)
    return 1000.0 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="synthetic B-scans per generator")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    print("| generator | " + " | ".join(f"{k} MAE um (p90)" for k in BOUNDARIES) + " | CPU ms / 512 A-scans |")
    print("|---" * (len(BOUNDARIES) + 2) + "|")
    biases = {}
    for i, generator in enumerate(("A", "B", "C")):  # C: held out, never tuned on
        mean, p90, biases[generator], ms = measure_synthetic(generator, args.n, args.seed + i)
        cells = " | ".join(f"{mean[k]:.1f} ({p90[k]:.1f})" for k in BOUNDARIES)
        print(f"| {generator} ({args.n} B-scans) | {cells} | {ms:.0f} |")
    print("\n| generator | " + " | ".join(f"{k} median signed um" for k in BOUNDARIES) + " |")
    print("|---" * (len(BOUNDARIES) + 1) + "|")
    for generator, bias in biases.items():
        print(f"| {generator} | " + " | ".join(f"{bias[k]:+.1f}" for k in BOUNDARIES) + " |")
    print(f"\nCPU time of one 496 x 512 B-scan: {cpu_ms_496x512():.0f} ms (median of 10)\n")
    print("| real file | ILM MAE um | BM MAE um | columns compared (ILM/BM) | device columns left NaN (ILM/BM) |")
    print("|---|---|---|---|---|")
    for name in REAL:
        res = measure_real(FIXTURES / name)
        print(f"| {name} | {res['ILM'][0]:.1f} | {res['BM'][0]:.1f} | {res['ILM'][1]}/{res['BM'][1]} | "
              f"{res['ILM'][2]:.0%}/{res['BM'][2]:.0%} |")


if __name__ == "__main__":
    main()
