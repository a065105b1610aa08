"""Where training gets its B-scans: one interface over B-scans held in memory and B-scans read
from their files on demand, so the training loop, the split, the batches, the normalisation and
the validation are one code path and a streamed run gives the same model as an in-memory one.

A source hands out display-scale uint8 B-scans by index, with the HRF count and patient of each
and each B-scan's size known without reading its pixels (batches group equal sizes).
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from hrf_batch.io.labels import LabelledBScans

SCORE_CHUNK = 256  # B-scans read at once for normalisation and validation: bounds memory, not results


class BScanSource(Protocol):
    """Labelled B-scans addressed by index; ``image(i)`` is uint8 ``(H, W)`` of size ``shapes[i]``."""

    counts: np.ndarray  # int (N,)
    patients: np.ndarray  # str (N,)
    shapes: np.ndarray  # int (N, 2): height, width

    def __len__(self) -> int: ...

    def image(self, i: int) -> np.ndarray: ...

    def subset(self, index: np.ndarray) -> BScanSource: ...


class InMemory:
    """A :class:`LabelledBScans` (every B-scan already decoded) seen as a :class:`BScanSource`."""

    def __init__(self, data: LabelledBScans) -> None:
        self.data = data
        self.counts, self.patients = data.counts, data.patients
        self.shapes = np.array([img.shape for img in data.images], dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.data)

    def image(self, i: int) -> np.ndarray:
        return self.data.images[i]

    def subset(self, index: np.ndarray) -> InMemory:
        return InMemory(self.data.subset(index))


def as_source(data: LabelledBScans | BScanSource) -> BScanSource:
    """Training accepts decoded labels as they are loaded for evaluation, or any source."""
    return InMemory(data) if isinstance(data, LabelledBScans) else data


def chunks(source: BScanSource, size: int = SCORE_CHUNK) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(first index, B-scans) in order, ``size`` at a time: a pass over a source in bounded memory."""
    for start in range(0, len(source), size):
        yield start, [source.image(i) for i in range(start, min(start + size, len(source)))]


def norm_stats(source: BScanSource) -> tuple[float, float]:
    """Mean and standard deviation of every 7th pixel of each B-scan.

    Counted as a 256-bin histogram of the uint8 pixels, so the result is exact, needs no memory
    that grows with the study and does not depend on how the pass was chunked."""
    hist = np.zeros(256, dtype=np.int64)
    for _, images in chunks(source):
        for img in images:
            hist += np.bincount(np.asarray(img, dtype=np.uint8).ravel()[::7], minlength=256)
    n = int(hist.sum())
    if n == 0:
        raise ValueError("no pixels to take normalisation statistics from")
    levels = np.arange(256, dtype=np.int64)
    total, squares = int(hist @ levels), int(hist @ levels**2)
    mean = total / n
    var = (n * squares - total * total) / (n * n)  # exact integers until this division
    return float(mean), float(max(np.sqrt(var), 1e-3))
