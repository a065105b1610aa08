"""Classification metrics for HRF presence: AUROC, average precision, F1 at a threshold."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score


def presence_metrics(counts: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """2-class metrics of HRF presence (count > 0) for scores in [0, 1]."""
    y = (np.asarray(counts) > 0).astype(int)
    s = np.asarray(scores, dtype=float)
    out = {"n": float(len(y)), "n_positive": float(y.sum()), "threshold": float(threshold)}
    if 0 < y.sum() < len(y):
        out["auroc"] = float(roc_auc_score(y, s))
        out["ap"] = float(average_precision_score(y, s))
    else:
        out["auroc"] = out["ap"] = float("nan")
    out["f1"] = float(f1_score(y, (s >= threshold).astype(int), zero_division=0))
    return out


def best_f1_threshold(counts: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises F1 on (validation) data; 0.5 when undefined."""
    y = (np.asarray(counts) > 0).astype(int)
    s = np.asarray(scores, dtype=float)
    if y.sum() == 0:
        return 0.5
    candidates = np.unique(s)
    f1s = [f1_score(y, (s >= t).astype(int), zero_division=0) for t in candidates]
    return float(candidates[int(np.argmax(f1s))])
