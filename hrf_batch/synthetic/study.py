"""Write a synthetic study folder: patients, visits, both eyes, every supported export format.

Layout::

    OUT/P001/2023-01-10/P001_2023-01-10_OD.vol          HEYEX .vol
    OUT/P001/2023-04-10/P001_2023-04-10.e2e             HEYEX .e2e (both eyes in one file)
    OUT/P002/2023-01-17/OD_xml/P002_..._OD.xml + TIFFs  HEYEX XML export
    OUT/P002/2023-01-17/OS_dicom/*.dcm                  DICOM OCT (+ localizer)
    OUT/ground_truth/P001_2023-01-10_OD.npz             HRF label masks (n, H, W), one id per HRF, true
                                                        layer rows and foveal centre
    OUT/ground_truth/manifest.csv                       one row per B-scan: HRF count and area

The ground-truth layout is defined (and read back) by :mod:`hrf_batch.io.ground_truth`. The B-scans
come from generator a, b or c (``StudySpec.generator``; c is held out, for evaluation only);
``StudySpec.widths`` mixes B-scan widths. The true layer lines go to the ground truth only, never
into the scan files: the files carry no device lines, so the pipeline has to estimate them, and
that estimate is what the truth measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from hrf_batch.io.ground_truth import (
    TRUTH_DIR,
    GroundTruthVolume,
    SyntheticVolume,
    count_labels,
    label_areas,
    truth_arrays,
    write_manifest,
)
from hrf_batch.io.volume import LAYER_NAMES, BScanPosition, Spacing, Volume, VolumeMeta
from hrf_batch.synthetic import generator_a, generator_b, generator_c
from hrf_batch.synthetic.fundus import synth_localizer

FORMAT_CYCLE = ("heyex-vol", "dicom-oct", "heyex-xml", "heyex-e2e")


def _generator_b_truth(rng: np.random.Generator, **size: Any) -> SyntheticVolume:
    """Generator B's volume as ground truth: only the boundaries hrf-batch names (LAYER_NAMES)."""
    drawn = generator_b.synth_volume_truth(rng, **size)
    layers = {name: drawn.layers[name] for name in LAYER_NAMES}
    return SyntheticVolume(drawn.images, drawn.labels, layers, drawn.fovea_bscan, drawn.fovea_col)


GENERATORS: dict[str, Callable[..., SyntheticVolume]] = {  # c returns only LAYER_NAMES already
    "a": generator_a.synth_volume_truth, "b": _generator_b_truth, "c": generator_c.synth_volume_truth,
}
_SIZE_CHECKS: dict[str, Callable[[int, int], None]] = {"b": generator_b.check_size, "c": generator_c.check_size}
_AXIAL_MM = 0.00387
_SCAN_WIDTH_MM = 6.0
_SCAN_HEIGHT_MM = 5.8


@dataclass(frozen=True)
class StudySpec:
    """How big a synthetic study to write; the seed makes it reproducible."""

    patients: int = 3
    visits: int = 2
    bscans: int = 9
    width: int = 512
    height: int = 496
    seed: int = 0
    generator: str = "a"            # which B-scan generator (see GENERATORS)
    widths: tuple[int, ...] = ()    # when given, each visit draws its B-scan width from these

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown synthetic generator {self.generator!r}: choose one of {', '.join(GENERATORS)}")
        if any(int(w) < 16 for w in self.widths):
            raise ValueError(f"every width must be at least 16 pixels, got {self.widths}")
        check = _SIZE_CHECKS.get(self.generator)
        if check is not None:  # fail before any file is written
            for w in self.widths or (self.width,):
                check(self.height, w)


def _positions(n: int, width: int, lateral: float, field_mm: float) -> tuple[BScanPosition, ...]:
    """B-scans stacked top to bottom over a square region centred on the localizer; index 0 is inferior."""
    x0 = (field_mm - width * lateral) / 2
    step = _SCAN_HEIGHT_MM / max(n - 1, 1) if n > 1 else 0.0
    y_first = field_mm / 2 + step * (n - 1) / 2
    return tuple(BScanPosition((x0, y_first - i * step), (x0 + width * lateral, y_first - i * step)) for i in range(n))


def synthetic_volume(rng: np.random.Generator, spec: StudySpec, patient: str, visit: date, eye: str, burden: float,
                     when: datetime, width: int | None = None) -> tuple[Volume, np.ndarray]:
    """One synthetic volume with consistent metadata, and its HRF labels (n, H, W); ``width``
    overrides ``spec.width`` (visits of a study with several widths)."""
    volume, truth = synthetic_volume_truth(rng, spec, patient, visit, eye, burden, when, width)
    return volume, truth.labels


def synthetic_volume_truth(rng: np.random.Generator, spec: StudySpec, patient: str, visit: date, eye: str,
                           burden: float, when: datetime, width: int | None = None) -> tuple[Volume, SyntheticVolume]:
    """:func:`synthetic_volume` with the generator's whole truth (labels, layer rows, fovea), seen
    as the volume's eye: a left eye's truth is mirrored like its images. The Volume carries no layers."""
    width = spec.width if width is None else int(width)
    truth = GENERATORS[spec.generator](rng, n_bscans=spec.bscans, height=spec.height, width=width,
                                       hrf_prevalence=burden)
    if eye == "OS":  # a left eye is the mirror image of a right one
        truth = truth.mirrored()
    lateral = _SCAN_WIDTH_MM / width
    loc_size = 768 if width >= 384 else 2 * width
    loc_spacing = max(0.01182, 1.6 * max(_SCAN_WIDTH_MM, _SCAN_HEIGHT_MM) / loc_size)
    localizer = synth_localizer(rng, size=loc_size)
    if eye == "OS":
        localizer = localizer[:, ::-1].copy()
    between = _SCAN_HEIGHT_MM / (spec.bscans - 1) if spec.bscans > 1 else 0.0
    meta = VolumeMeta(
        source_path="", source_sha256="", source_format="heyex-vol", series_uid=f"{patient}{visit:%y%m%d}{eye}",
        patient_id=patient, eye=eye, visit_date=visit, acquired_at=when, device="Heidelberg Engineering Spectralis",
        scan_pattern="volume" if spec.bscans > 1 else "line", spacing=Spacing(lateral, _AXIAL_MM, between),
        positions=_positions(spec.bscans, width, lateral, loc_size * loc_spacing),
        localizer_spacing_mm=(loc_spacing, loc_spacing), birth_date=date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 9000))),
        patient_name=f"Synthetic {patient}",
    )
    volume = Volume(bscans=truth.images.astype(np.float32), meta=meta, localizer=localizer.astype(np.float32))
    return volume, truth


def write_format(fmt: str, volumes: list[Volume], visit_dir: Path, stem: str) -> list[Path]:
    """Write the volumes of one visit in one format; returns the source path of each volume."""
    from hrf_batch.io.writers.dicom import write_dicom_oct
    from hrf_batch.io.writers.e2e import write_e2e
    from hrf_batch.io.writers.heyex_xml import write_heyex_xml
    from hrf_batch.io.writers.vol import write_vol

    visit_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "heyex-e2e":
        path = write_e2e(volumes, visit_dir / f"{stem}.e2e")
        return [path] * len(volumes)
    out = []
    for i, vol in enumerate(volumes):
        eye = vol.meta.eye
        if fmt == "heyex-vol":
            out.append(write_vol(vol, visit_dir / f"{stem}_{eye}.vol"))
        elif fmt == "heyex-xml":
            out.append(write_heyex_xml(vol, visit_dir / f"{eye}_xml", stem=f"{stem}_{eye}"))
        else:
            out.append(write_dicom_oct(vol, visit_dir / f"{eye}_dicom", multiframe=i % 2 == 0)[0].parent)
    return out


def write_synthetic_study(out_dir: Path, spec: StudySpec) -> list[GroundTruthVolume]:
    """Write the study and its ground truth; returns one record per volume (also in manifest.csv)."""
    out_dir = Path(out_dir)
    truth_dir = out_dir / TRUTH_DIR
    truth_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    width_rng = np.random.default_rng([spec.seed, 1])  # own stream: listing widths leaves `rng`'s sequence as it was
    records: list[GroundTruthVolume] = []
    k = 0
    for p in range(spec.patients):
        patient = f"P{p + 1:03d}"
        first = date(2023, 1, 10) + timedelta(days=7 * p)
        burden = float(rng.uniform(0.05, 0.5))
        for v in range(spec.visits):
            visit = first + timedelta(days=91 * v)
            stem = f"{patient}_{visit:%Y-%m-%d}"
            fmt = FORMAT_CYCLE[k % len(FORMAT_CYCLE)]
            k += 1
            width = int(width_rng.choice(spec.widths)) if spec.widths else spec.width  # both eyes: one e2e file
            pairs = [
                synthetic_volume_truth(rng, spec, patient, visit, eye, min(0.9, burden * (1 + 0.5 * v)), datetime.combine(visit, datetime.min.time()) + timedelta(hours=9, minutes=5 * i), width)
                for i, eye in enumerate(("OD", "OS"))
            ]
            sources = write_format(fmt, [vol for vol, _ in pairs], out_dir / patient / f"{visit:%Y-%m-%d}", stem)
            for (vol, truth), source in zip(pairs, sources, strict=True):
                mask_file = truth_dir / f"{stem}_{vol.meta.eye}.npz"
                labels = truth.labels
                np.savez_compressed(mask_file, labels=labels.astype(np.int16), **truth_arrays(truth))
                counts = tuple(int(c) for c in count_labels(labels))
                areas = tuple(int(a) for a in label_areas(labels))
                records.append(GroundTruthVolume(patient, visit, vol.meta.eye, fmt, source, mask_file, counts, areas))
    write_manifest(out_dir, records)
    return records
