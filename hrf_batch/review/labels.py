"""The graders' verdicts as a training labels CSV (`hrf-batch export --labels FILE`), read by
`hrf-batch train STUDY --labels FILE` without edits.

One row per B-scan a grader *finished* (the `hrf_review_bscans` view of migration 0005: a yes/no
given, or every model lesion judged): ``file, eye, bscan_index, count, label``.

* ``count`` = accepted model lesions + lesions the grader added; 0 after a "no HRF" answer, which
  wins over lesion verdicts. It is left empty when unknown — a "yes" while some model lesion is still
  undecided, or a "yes" with nothing accepted or added — and the loader then reads ``label``.
* ``label`` = the grader's HRF yes/no (1/0): the answer when given, else whether any lesion was
  accepted or added. Unfinished B-scans are left out, so an unjudged lesion never becomes a label.
* ``file`` is the absolute path of the source as stored when it was ingested (a relative stored path
  is taken from the current folder), so any STUDY folder given to `train` finds it. Each file is read
  again: it must still hold the stored series with the stored sha256, and be the only volume of its
  eye in that file (the CSV names a volume by file and eye). A DICOM series of single-frame files is
  stored as its folder, which the CSV cannot name. Sources that fail are left out and listed.

Several graders: pick one with ``grader``; without it the export refuses and names them. The same
B-scan labelled differently through two runs of its volume is refused too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from hrf_batch.errors import HrfBatchError, LabelError
from hrf_batch.io.analysed import Mismatch, find_analysed
from hrf_batch.io.discover import path_from_display
from hrf_batch.io.readers import read_volumes
from hrf_batch.io.volume import Volume
from hrf_batch.store import Store, StoredVolume
from hrf_batch.store.read import ReviewBScan

LABEL_COLUMNS = ("file", "eye", "bscan_index", "count", "label")


@dataclass(frozen=True)
class LabelRow:
    """One B-scan's label as written."""

    file: str
    eye: str
    bscan_index: int
    count: int | None  # None: unknown, the loader takes ``label``
    label: int  # 1: HRF present


@dataclass
class LabelExport:
    """What an export wrote and which reviewed volumes it had to leave out (source path → why)."""

    path: Path
    grader: str
    rows: list[LabelRow]
    left_out: dict[str, str] = field(default_factory=dict)
    left_out_bscans: int = 0

    def text(self) -> str:
        """The summary the CLI prints."""
        files = len({r.file for r in self.rows})
        lines = [f"wrote {self.path}: {len(self.rows)} B-scans of {files} files reviewed by {self.grader} "
                 f"({sum(r.label for r in self.rows)} with HRF)"]
        if self.left_out:
            n = len(self.left_out)
            lines.append(f"left out {self.left_out_bscans} reviewed B-scans of {n} source{'' if n == 1 else 's'}:")
            lines += [f"  {path}: {why}" for path, why in sorted(self.left_out.items())]
        return "\n".join(lines)


def pick_grader(rows: list[ReviewBScan], grader: str | None) -> str:
    """The grader whose finished B-scans are exported: ``grader``, or the only one there is."""
    graders = sorted({r.grader for r in rows})
    if not graders:
        raise LabelError("no grader has finished a B-scan yet, so there are no labels to export",
                         "review B-scans first: answer HRF yes/no or judge every lesion of a B-scan")
    if grader is None:
        if len(graders) > 1:
            raise LabelError(f"{len(graders)} graders reviewed B-scans: {', '.join(graders)}",
                             "pick whose verdicts to export with --grader NAME")
        return graders[0]
    name = grader.strip()
    if name not in graders:
        raise LabelError(f"grader {name!r} has finished no B-scan", f"pick one of: {', '.join(graders)}")
    return name


def label_of(row: ReviewBScan) -> tuple[int | None, int]:
    """(count or None, label 0/1) of one finished B-scan (rules in the module docstring)."""
    if not row.finished:
        raise ValueError(f"B-scan {row.bscan_index} of run {row.run_id} is not finished by {row.grader}")
    return row.grader_count, int(bool(row.grader_has_hrf))


def export_labels(store: Store, out: Path | str, *, grader: str | None = None) -> LabelExport:
    """Write the labels CSV of one grader's finished B-scans to ``out`` (see the module docstring)."""
    finished = [r for r in store.view_rows("hrf_review_bscans") if r.finished]
    name = pick_grader(finished, grader)
    mine = [r for r in finished if r.grader == name]
    volumes = {v.volume_id: v for pid in sorted({r.patient_id for r in mine})
               for v in store.volume_results(pid, masks=False)}
    files: dict[int, str] = {}
    export = LabelExport(Path(out), name, [])
    labels: dict[tuple[str, str, int], tuple[LabelRow, int]] = {}
    for row in mine:
        volume = volumes[row.volume_id]
        if row.volume_id not in files:
            try:
                files[row.volume_id] = labelled_file(volume)
            except LabelError as exc:
                files[row.volume_id] = ""
                export.left_out[volume.source_path] = exc.problem
        if not files[row.volume_id]:
            export.left_out_bscans += 1
            continue
        count, label = label_of(row)
        found = LabelRow(files[row.volume_id], volume.eye, row.bscan_index, count, label)
        key = (found.file, found.eye, found.bscan_index)
        if key in labels and (labels[key][0].count, labels[key][0].label) != (count, label):
            raise LabelError(
                f"{name} labelled B-scan {row.bscan_index} of {volume.source_path} ({volume.eye}) differently in "
                f"runs {labels[key][1]} and {row.run_id}",
                "make the verdicts of both runs agree (or withdraw one), then export again")
        labels.setdefault(key, (found, row.run_id))
    export.rows = [labels[key][0] for key in sorted(labels)]
    if not export.rows:
        raise LabelError(f"none of the {len(mine)} B-scans {name} finished could be exported: "
                         + "; ".join(f"{p}: {why}" for p, why in sorted(export.left_out.items())),
                         "put moved or changed sources back as they were ingested (each reason says which)")
    write_labels(export.rows, export.path)
    return export


def labelled_file(volume: StoredVolume) -> str:
    """The absolute path of the one file that holds this stored volume as it was analysed, for the
    labels CSV; LabelError saying why there is none."""
    path = path_from_display(volume.source_path)
    path = path if path.is_absolute() else Path.cwd() / path
    if not path.exists():
        raise LabelError("the source is no longer there")
    if path.is_dir():
        raise LabelError("is a DICOM series of single-frame files, stored as its folder; a labels CSV names one file "
                         "per volume, so export such a series as one multi-frame file to label it")
    _stored(_read(path), volume, path)
    return str(path)


def _read(path: Path) -> list[Volume]:
    try:
        return read_volumes(path)
    except HrfBatchError as exc:
        raise LabelError(f"cannot be read any more ({exc.problem})") from exc


def _stored(found: list[Volume], volume: StoredVolume, path: Path) -> Volume:
    """The stored volume among those read, unchanged and alone with its eye in the file."""
    analysed = find_analysed(found, volume.series_uid, volume.source_sha256, volume.n_bscans, volume.bscan_shape)
    if analysed is Mismatch.SERIES:
        raise LabelError(f"no longer holds series {volume.series_uid}")
    if analysed is Mismatch.CONTENT:
        raise LabelError("changed since it was analysed (its sha256 differs from the stored one)")
    if isinstance(analysed, Mismatch):
        raise LabelError(analysed.value)
    _one_of_its_eye(found, volume, path)
    return analysed


def _one_of_its_eye(found: list[Volume], volume: StoredVolume, path: Path) -> None:
    """The loader picks a file's volume by eye, so the file must hold no other volume of that eye."""
    if sum(v.meta.eye == volume.eye for v in found) > 1:
        raise LabelError(f"{path.name} holds several {volume.eye} volumes; a labels CSV names one by file and eye")


def write_labels(rows: list[LabelRow], path: Path) -> Path:
    """Write the CSV via a temporary file, so a failed export never leaves half a labels file."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(LABEL_COLUMNS)
            for r in rows:
                writer.writerow([r.file, r.eye, r.bscan_index, "" if r.count is None else r.count, r.label])
        partial.replace(path)
    except OSError as exc:
        raise LabelError(f"cannot write {path}: {exc.strerror or exc}",
                         "choose a file in a folder you can write to") from exc
    return path
