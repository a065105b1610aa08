"""What every export walks: the stored volumes (latest done run), their masks, and one folder each."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hrf_batch.errors import HrfBatchError
from hrf_batch.export.errors import ExportError
from hrf_batch.store import Store, StoredVolume

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class ExportSummary:
    """What an export wrote, per volume, and the volumes it left out with the reason."""

    written: dict[str, list[Path]] = field(default_factory=dict)  # volume folder -> files
    skipped: list[str] = field(default_factory=list)  # one line per volume left out

    @property
    def files(self) -> list[Path]:
        return [path for paths in self.written.values() for path in paths]

    def describe(self, out_dir: Path) -> str:
        """One line for the console: how many volumes and files went where."""
        return f"wrote {len(self.written)} volumes ({len(self.files)} files) under {out_dir}"


def stored_volumes(store: Store, patient: str | None = None) -> Iterator[StoredVolume]:
    """Every patient's volumes with their latest done run and masks, or one patient's (an unknown id is an error)."""
    patients = [p.patient_id for p in store.list_patients()]
    if patient is not None:
        if patient not in patients:
            raise HrfBatchError(f"patient {patient!r} is not in {store.url}",
                                "pass a patient id as stored (the patients CSV of `hrf-batch export --out DIR` lists them)")
        patients = [patient]
    for patient_id in patients:
        yield from store.volume_results(patient_id, masks=True)


def export_each(store: Store, patient: str | None,
                export_one: Callable[[StoredVolume], tuple[Path, list[Path]]]) -> ExportSummary:
    """``export_one`` for every stored volume (or one patient's); a volume it refuses (source gone or changed)
    is left out with its reason in ``skipped`` and the others are still written."""
    summary = ExportSummary()
    for stored in stored_volumes(store, patient):
        try:
            folder, files = export_one(stored)
        except ExportError as exc:
            log.info("not exported: %s", exc)
            summary.skipped.append(str(exc))
            continue
        summary.written[str(folder)] = files
    return summary


def stored_masks(stored: StoredVolume) -> np.ndarray:
    """The stored B-scan masks (the union of the B-scan's HRF) as bool ``(n_bscans, H, W)``, in volume order."""
    masks = np.zeros((stored.n_bscans, *stored.bscan_shape), dtype=bool)
    for bscan in stored.bscans:
        if bscan.mask is None:
            raise HrfBatchError(f"{stored.source_path}: B-scan {bscan.index} was read without its mask",
                                "this is a bug; please report it")
        masks[bscan.index] = bscan.mask
    return masks


def volume_folder(out_dir: Path, stored: StoredVolume) -> Path:
    """``OUT/<patient>/<visit>_<eye>_<12 hex of sha256(source sha256 + series)>``: stable across exports,
    apart for the two series of one .e2e file, and safe as a file name whatever the patient id holds."""
    digest = hashlib.sha256(f"{stored.source_sha256}/{stored.series_uid}".encode()).hexdigest()[:12]
    visit = stored.visit_date.isoformat() if stored.visit_date else "undated"
    return Path(out_dir) / _safe_name(stored.patient_id) / f"{visit}_{stored.eye}_{digest}"


def _safe_name(text: str) -> str:
    clean = _SAFE.sub("_", text)[:48] or "_"
    if clean == text:
        return clean
    return f"{clean}-{hashlib.sha256(text.encode('utf-8', errors='surrogatepass')).hexdigest()[:8]}"
