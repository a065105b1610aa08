"""The three training tasks: what the last Linear layer outputs, how it is trained and read.

Every network ends in ``nn.Linear(features, task.n_outputs)`` and returns raw logits ``(B, n)``.
A :class:`Task` turns those logits into a loss, an HRF-presence score in [0, 1] (the one number
that thresholds, AUROC and the iterative inference use, whatever the task), a task prediction,
and the scalar that LRP explains. Targets are built from the HRF count of a B-scan, so one
labelled data set serves all three tasks.

Tasks
-----
``binary``
    1 logit ``z``; target ``count > 0``; loss BCE-with-logits; score ``sigmoid(z)``.
``3class``
    3 logits for 0 / 1 / more than 1 HRF; target ``min(count, 2)``; loss cross-entropy;
    score ``1 - p(0) = sigmoid(logsumexp(z1, z2) - z0)``.
``regression``
    1 logit ``z``; predicted count ``10 * sigmoid(z)``; target ``min(count, 10)``; loss
    smooth-L1 (Huber, beta 1) on counts, so a miscount of 5 does not dominate a batch as it
    would under MSE. Score ``1 - exp(-count)``: strictly monotone in the count (keeps the
    ranking for AUROC, unlike ``clip(count, 0, 1)``) and 0.5 at a count of ln 2 = 0.69.

What LRP explains
-----------------
:meth:`Task.explain_weights` gives the output relevance ``(B, n)`` to start LRP from (the
``grad_output`` of a gradient-based attributor); :meth:`Task.explain_logit` is the matching scalar
``sum(weights * logits)``. Binary and regression: the single logit (the regression count is a
monotone function of it). 3class: a linear contrast ``w1*z1 + w2*z2 - z0`` with
``(w1, w2) = softmax(z1, z2)`` held constant — this is the gradient of the log-odds of "has HRF",
``logsumexp(z1, z2) - z0``, at the current logits, so the explanation points at what makes the
B-scan "not HRF-free" while mixing the two positive classes by their relative probability.
Its value differs from the log-odds by at most ln 2.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MAX_COUNT = 10.0  # regression counts are clipped here; the head predicts 10 * sigmoid(z)


def _as_counts(counts: Any) -> Tensor:
    """HRF counts (int, sequence, numpy array or tensor) as a float tensor; negatives refused."""
    if isinstance(counts, Tensor):
        t = counts.detach().to(torch.float32)
    else:
        t = torch.as_tensor(np.asarray(counts, dtype=np.float32))
    if t.numel() and bool((t < 0).any()):
        raise ValueError(
            "HRF counts must be >= 0; check the labels (a negative count usually means a missing value)"
        )
    return t.reshape(-1) if t.ndim == 0 else t


def _check_logits(logits: Tensor, n: int, task: str) -> None:
    if logits.ndim != 2 or logits.shape[1] != n:
        raise ValueError(
            f"task {task!r} expects logits of shape (B, {n}), got {tuple(logits.shape)}; "
            "build the model with the same task as the head that reads it"
        )


class Task(ABC):
    """Base class; the subclasses below are stateless and shared through :data:`TASKS`."""

    name: str = ""
    n_outputs: int = 1

    @abstractmethod
    def target(self, counts: Any) -> Tensor:
        """Per-task training target from HRF counts per B-scan."""

    @abstractmethod
    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over the batch; ``targets`` as returned by :meth:`target`."""

    @abstractmethod
    def score(self, logits: Tensor) -> Tensor:
        """HRF-presence score ``(B,)`` in [0, 1]; higher means more likely to hold HRF."""

    @abstractmethod
    def predict(self, logits: Tensor) -> Tensor:
        """Task-native prediction ``(B,)``: probability, class index, or HRF count."""

    def explain_weights(self, logits: Tensor) -> Tensor:
        """Output relevance ``(B, n_outputs)`` to start LRP from; constant (detached)."""
        _check_logits(logits, self.n_outputs, self.name)
        return torch.ones_like(logits).detach()

    def explain_logit(self, logits: Tensor) -> Tensor:
        """The scalar per B-scan that LRP explains: ``sum(explain_weights * logits)``."""
        return (self.explain_weights(logits) * logits).sum(dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_outputs={self.n_outputs})"


class BinaryTask(Task):
    """HRF present or not: one logit."""

    name = "binary"
    n_outputs = 1

    def target(self, counts: Any) -> Tensor:
        return (_as_counts(counts) > 0).to(torch.float32)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_logits(logits, 1, self.name)
        return F.binary_cross_entropy_with_logits(logits[:, 0], targets.to(logits.dtype))

    def score(self, logits: Tensor) -> Tensor:
        _check_logits(logits, 1, self.name)
        return torch.sigmoid(logits[:, 0])

    def predict(self, logits: Tensor) -> Tensor:
        return self.score(logits)


class ThreeClassTask(Task):
    """0, 1 or more than 1 HRF: three logits, cross-entropy."""

    name = "3class"
    n_outputs = 3

    def target(self, counts: Any) -> Tensor:
        return _as_counts(counts).round().clamp(max=2).to(torch.long)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_logits(logits, 3, self.name)
        return F.cross_entropy(logits, targets.to(torch.long))

    def score(self, logits: Tensor) -> Tensor:
        _check_logits(logits, 3, self.name)
        return torch.sigmoid(self._has_hrf_log_odds(logits))

    def predict(self, logits: Tensor) -> Tensor:
        _check_logits(logits, 3, self.name)
        return logits.argmax(dim=1)

    def explain_weights(self, logits: Tensor) -> Tensor:
        _check_logits(logits, 3, self.name)
        positive = torch.softmax(logits[:, 1:].detach(), dim=1)
        return torch.cat([-torch.ones_like(logits[:, :1]), positive], dim=1).detach()

    @staticmethod
    def _has_hrf_log_odds(logits: Tensor) -> Tensor:
        return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


class RegressionTask(Task):
    """HRF count (clipped at 10) as ``10 * sigmoid(z)``, smooth-L1 loss on counts."""

    name = "regression"
    n_outputs = 1

    def target(self, counts: Any) -> Tensor:
        return _as_counts(counts).clamp(max=MAX_COUNT)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.smooth_l1_loss(self.predict(logits), targets.to(logits.dtype), beta=1.0)

    def predict(self, logits: Tensor) -> Tensor:
        _check_logits(logits, 1, self.name)
        return MAX_COUNT * torch.sigmoid(logits[:, 0])

    def score(self, logits: Tensor) -> Tensor:
        return 1.0 - torch.exp(-self.predict(logits))

    @staticmethod
    def count_at_score(score: float) -> float:
        """Inverse of the score map: the predicted count at which the score equals ``score``."""
        if not 0.0 <= score < 1.0:
            raise ValueError(f"score must be in [0, 1), got {score}; a score of 1 means an infinite count")
        return -math.log(1.0 - score)


TASKS: dict[str, Task] = {t.name: t for t in (BinaryTask(), ThreeClassTask(), RegressionTask())}


def get_task(name: str) -> Task:
    """The task called ``name``; unknown names raise with the list of known ones."""
    try:
        return TASKS[name]
    except KeyError as exc:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from exc
