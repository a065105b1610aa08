"""What counts as one HRF lesion in a mask: an 8-connected component of at least ``min_px`` pixels.

One definition for the pipeline (which counts and stores lesions) and the evaluation (which matches
predicted lesions with ground-truth HRFs), so a count and its score always mean the same thing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a bool mask (0 = background) and their number."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    return labels, int(n)


def lesion_labels(mask: np.ndarray, min_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Component labels of ``mask`` and the ids (ascending) of the components that are lesions:
    those of at least ``min_px`` pixels (at least 1)."""
    labels, n = components(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    kept = np.flatnonzero(sizes >= max(int(min_px), 1))
    return labels, kept[kept > 0]
