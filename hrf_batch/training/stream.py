"""B-scans read from their files when training asks for them, so memory does not grow with the study.

An index is built in one pass over the study (each volume is read once, kept only while its B-scans
are listed): per B-scan the volume it lives in, its index there, its size, HRF count and patient,
in the same order as :func:`~hrf_batch.io.labels.load_csv_labels` and
:func:`~hrf_batch.io.labels.load_study_labels` list them. Pixels are read again on demand through
a small least-recently-used cache of decoded volumes, bounded in bytes. Readers decode whole
volumes, so a B-scan costs a volume read on a cache miss; the cache makes sequential passes
(normalisation, validation) read each volume once.
"""

from __future__ import annotations

import csv
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Iterator

import numpy as np

from hrf_batch.errors import LabelError
from hrf_batch.io.discover import FileIssue, discover, read_sources
from hrf_batch.io.ground_truth import has_ground_truth, manifest_path
from hrf_batch.io.labels import as_uint8, wanted_bscans
from hrf_batch.io.readers import read_source, read_volumes
from hrf_batch.io.volume import Volume

DEFAULT_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class VolumeRef:
    """How to read one volume again: its file(s), the reader format (None: recognise it from the
    content) and its position among the volumes read from them; size and count guard against a
    file that changed since the index was built."""

    paths: tuple[Path, ...]
    fmt: str | None
    position: int
    n_bscans: int
    shape: tuple[int, int]

    def read(self) -> np.ndarray:
        """The volume's B-scans as uint8 ``(n, H, W)``, converted as the in-memory labels are."""
        volumes = read_source(self.fmt, list(self.paths)) if self.fmt else read_volumes(self.paths[0])
        if self.position >= len(volumes):
            raise LabelError(f"{self.paths[0]} no longer holds the volume listed when training started",
                             "do not change the study while training on it; start the training again")
        pixels = as_uint8(volumes[self.position].bscans)
        if pixels.shape != (self.n_bscans, *self.shape):
            raise LabelError(f"{self.paths[0]} changed while training: B-scans {pixels.shape}, listed as "
                             f"{(self.n_bscans, *self.shape)}", "do not change the study while training on it")
        return pixels


@dataclass
class VolumeCache:
    """Decoded volumes, least recently used dropped first once they hold more than ``max_bytes``
    (the volume just read is always kept, however large)."""

    max_bytes: int = DEFAULT_CACHE_BYTES
    hits: int = 0
    misses: int = 0
    _items: OrderedDict[VolumeRef, np.ndarray] = field(default_factory=OrderedDict, repr=False)
    _bytes: int = 0

    def get(self, ref: VolumeRef) -> np.ndarray:
        pixels = self._items.get(ref)
        if pixels is not None:
            self.hits += 1
            self._items.move_to_end(ref)
            return pixels
        self.misses += 1
        pixels = ref.read()
        self._items[ref] = pixels
        self._bytes += pixels.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
        return pixels

    @property
    def nbytes(self) -> int:
        return self._bytes


@dataclass
class StreamedBScans:
    """Labelled B-scans whose pixels stay in their files (a :class:`~hrf_batch.training.source.BScanSource`)."""

    refs: list[VolumeRef]
    volume: np.ndarray  # int (N,): index into refs
    bscan: np.ndarray  # int (N,): B-scan index in that volume
    counts: np.ndarray  # int (N,)
    patients: np.ndarray  # str (N,)
    keys: list[str]  # "source#eye#B-scan index in the volume", for reports
    cache: VolumeCache = field(default_factory=VolumeCache)

    @property
    def shapes(self) -> np.ndarray:
        return np.array([self.refs[v].shape for v in self.volume.tolist()], dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.counts)

    def image(self, i: int) -> np.ndarray:
        return self.cache.get(self.refs[int(self.volume[i])])[int(self.bscan[i])]

    def subset(self, index: np.ndarray) -> StreamedBScans:
        """The picked B-scans; the volume cache is shared with this one."""
        pick = np.asarray(index, dtype=np.int64)
        return StreamedBScans(self.refs, self.volume[pick], self.bscan[pick], self.counts[pick], self.patients[pick],
                              [self.keys[i] for i in pick.tolist()], self.cache)


def _build(found: Iterator[tuple[VolumeRef, Volume, list[int], list[int]]], cache_bytes: int) -> StreamedBScans:
    refs: list[VolumeRef] = []
    volume, bscan, counts, patients, keys = [], [], [], [], []
    for ref, vol, picks, vol_counts in found:
        refs.append(ref)
        for i, count in zip(picks, vol_counts, strict=True):
            volume.append(len(refs) - 1)
            bscan.append(i)
            counts.append(count)
            patients.append(vol.meta.patient_id)
            keys.append(f"{vol.meta.source_path}#{vol.meta.eye}#{i}")
    if not counts:
        raise LabelError("no labelled B-scans found", "check that the study folder holds OCT files and labels")
    return StreamedBScans(refs, np.asarray(volume), np.asarray(bscan), np.asarray(counts), np.asarray(patients), keys,
                          VolumeCache(cache_bytes))


def _ref(paths: tuple[Path, ...], fmt: str | None, position: int, vol: Volume) -> VolumeRef:
    return VolumeRef(paths, fmt, position, vol.n_bscans, (int(vol.bscans.shape[1]), int(vol.bscans.shape[2])))


def stream_csv_labels(csv_path: Path, study_dir: Path, cache_bytes: int = DEFAULT_CACHE_BYTES) -> StreamedBScans:
    """The B-scans named in a labels CSV (as :func:`~hrf_batch.io.labels.load_csv_labels` reads it), streamed."""
    wanted = wanted_bscans(csv_path)

    def found() -> Iterator[tuple[VolumeRef, Volume, list[int], list[int]]]:
        for (file, eye), by_index in sorted(wanted.items()):
            path = Path(study_dir) / file
            volumes = read_volumes(path)
            match = [j for j, v in enumerate(volumes) if eye in ("", v.meta.eye)]
            if len(match) != 1:
                raise LabelError(f"{file}: {len(match)} volumes match eye {eye or '(any)'}", "add an eye column (OD/OS) to the labels CSV")
            vol = volumes[match[0]]
            bad = [i for i in by_index if not 0 <= i < vol.n_bscans]
            if bad:
                raise LabelError(f"{file}: B-scan indices {bad[:5]} out of range 0..{vol.n_bscans - 1}", "fix the labels CSV")
            keep = sorted(by_index)
            yield _ref((path,), None, match[0], vol), vol, keep, [by_index[i] for i in keep]

    return _build(found(), cache_bytes)


def _manifest_counts(study_dir: Path) -> dict[tuple[str, date, str], dict[int, int]]:
    """HRF count per B-scan of each volume, from ``ground_truth/manifest.csv``."""
    if not has_ground_truth(study_dir):
        raise LabelError(f"{study_dir} has no ground_truth/manifest.csv, which image-level labels without --labels "
                         "CSV (columns file, bscan_index, count) need",
                         "use a study written by `hrf-batch synth`, or pass --labels")
    out: dict[tuple[str, date, str], dict[int, int]] = defaultdict(dict)
    with open(manifest_path(study_dir), newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["patient_id"], date.fromisoformat(row["visit_date"]), row["eye"])
            out[key][int(row["bscan_index"])] = int(row["hrf_count"])
    return out


def stream_study_labels(study_dir: Path, cache_bytes: int = DEFAULT_CACHE_BYTES) -> StreamedBScans:
    """Every B-scan of a study with ground truth (as :func:`~hrf_batch.io.labels.load_study_labels`
    lists them), streamed; counts come from the manifest."""
    study_dir = Path(study_dir)
    truth = _manifest_counts(study_dir)

    def found() -> Iterator[tuple[VolumeRef, Volume, list[int], list[int]]]:
        for source in discover(study_dir).sources:
            vols = [v for v in read_sources([source]) if not isinstance(v, FileIssue)]
            for position, vol in enumerate(vols):
                key = (vol.meta.patient_id, vol.meta.visit_date, vol.meta.eye)
                if key not in truth:
                    raise LabelError(f"no ground truth for {key} ({vol.meta.source_path})", "regenerate the study or its manifest")
                picks = list(range(vol.n_bscans))
                missing = [i for i in picks if i not in truth[key]]
                if missing:
                    raise LabelError(f"the ground truth of {vol.meta.source_path} lacks B-scans {missing[:5]}",
                                     "regenerate the study or its manifest")
                yield _ref(source.paths, source.format, position, vol), vol, picks, [truth[key][i] for i in picks]

    return _build(found(), cache_bytes)


def combine_streams(parts: list[tuple[str, StreamedBScans]]) -> StreamedBScans:
    """Several streamed studies as one, patients prefixed with the study's name as
    :func:`~hrf_batch.io.labels.combine` does; one cache for all."""
    if len(parts) == 1:
        return parts[0][1]
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise LabelError(f"studies with the same folder name {sorted(names)} cannot be told apart", "rename one of the study folders")
    refs: list[VolumeRef] = []
    volume = []
    for _, part in parts:
        volume.append(part.volume + len(refs))
        refs.extend(part.refs)
    return StreamedBScans(
        refs, np.concatenate(volume), np.concatenate([p.bscan for _, p in parts]),
        np.concatenate([p.counts for _, p in parts]),
        np.concatenate([np.char.add(f"{name}/", p.patients.astype(str)) for name, p in parts]),
        [k for _, p in parts for k in p.keys], VolumeCache(parts[0][1].cache.max_bytes),
    )


def stream_labels(study_dir: Path, labels: Path | None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> StreamedBScans:
    """A study's B-scans streamed with the labels of ``labels`` (CSV) or else its ground truth."""
    if labels is not None:
        return stream_csv_labels(labels, study_dir, cache_bytes)
    return stream_study_labels(study_dir, cache_bytes)
