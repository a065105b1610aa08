"""Score calibration: turn a classifier's HRF-presence score into a probability that means something.

A network trained to separate classes ranks B-scans well (AUROC) but its raw sigmoid is not a
probability: the first shipped model needed a decision threshold of 0.965, and out of its training
domain HRF-free B-scans had a median score of 0.69. Calibration maps the score's log-odds
``z = logit(score)`` through ``sigmoid((z - bias) / temperature)``, fitted by minimising the
negative log-likelihood on the validation split (Platt scaling with a temperature): it keeps the
ranking (AUROC unchanged) and makes 0.5 the point where HRF are as likely as not, so the decision
threshold and the loop's stop score are probabilities.

The map works on the presence score of every task (binary, 3-class, regression), since each gives
one monotone score in [0, 1]. Scores are handled in float64 log-odds, clipped at ±``LOGIT_CLIP``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

LOGIT_CLIP = 30.0
METHOD = "temperature-bias"
MIN_SLOPE, MAX_SLOPE = 1e-3, 1e3  # 1 / temperature: scores may be flattened or sharpened this far


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid((logit(score) - bias) / temperature)``; the identity when (1, 0)."""

    temperature: float = 1.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0 and math.isfinite(self.bias)):
            raise ValueError(f"calibration needs a finite temperature > 0 and a finite bias, "
                             f"got temperature={self.temperature!r}, bias={self.bias!r}")

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.bias == 0.0

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for raw scores (float32, same shape)."""
        if self.is_identity:
            return np.asarray(scores, dtype=np.float32)
        return _sigmoid((log_odds(scores) - self.bias) / self.temperature).astype(np.float32)

    def apply_logits(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated log-odds for raw log-odds (the loop compares these, they do not saturate)."""
        return (np.asarray(logits, dtype=np.float64) - self.bias) / self.temperature

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration:
        """Read the ``calibration`` entry of a model config; an empty entry is the identity."""
        if not data:
            return cls()
        if data.get("method") != METHOD:
            raise ValueError(f"unknown calibration method {data.get('method')!r}; this version knows {METHOD!r}")
        return cls(temperature=float(data["temperature"]), bias=float(data["bias"]))


def log_odds(scores: np.ndarray) -> np.ndarray:
    """``logit(score)`` in float64, clipped to ±LOGIT_CLIP so a saturated score stays finite."""
    s = np.asarray(scores, dtype=np.float64)
    with np.errstate(divide="ignore"):
        z = np.log(s) - np.log1p(-s)
    return np.clip(z, -LOGIT_CLIP, LOGIT_CLIP)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of log-odds ``z`` against labels ``y`` (numerically stable)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_calibration(scores: np.ndarray, positive: np.ndarray) -> tuple[Calibration, dict[str, float]]:
    """Fit temperature and bias by maximum likelihood on held-out scores and 0/1 labels.

    Returns the calibration and a summary (NLL and expected calibration error before and after).
    Needs both classes; with one class the fit is undefined and a ValueError says so.
    """
    z = log_odds(scores)
    y = np.asarray(positive, dtype=np.float64)
    if z.shape != y.shape or z.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of one length, got {z.shape} and {y.shape}")
    if not 0 < y.sum() < len(y):
        raise ValueError("calibration needs validation B-scans with and without HRF; add patients of both kinds")

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # logistic regression on one feature, a * z + c: convex, so the optimum is found reliably
        u = theta[0] * z + theta[1]
        residual = _sigmoid(u) - y
        return _nll(u, y), np.array([np.mean(residual * z), np.mean(residual)])

    found = minimize(objective, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                     bounds=[(MIN_SLOPE, MAX_SLOPE), (-LOGIT_CLIP, LOGIT_CLIP)])
    a, c = (float(v) for v in found.x)
    cal = Calibration(temperature=1.0 / a, bias=-c / a)
    if _nll(cal.apply_logits(z), y) > _nll(z, y):  # never worse than the raw scores
        cal = Calibration()
    summary = {
        "n": float(len(y)), "nll_before": _nll(z, y), "nll_after": _nll(cal.apply_logits(z), y),
        "ece_before": expected_calibration_error(scores, y), "ece_after": expected_calibration_error(cal.apply(scores), y),
    }
    return cal, summary


def expected_calibration_error(probabilities: np.ndarray, positive: np.ndarray, bins: int = 10) -> float:
    """Mean |observed frequency − mean probability| over equal-width bins, weighted by bin size."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(positive, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(float(y[sel].mean()) - float(p[sel].mean()))
    return total / len(p)
