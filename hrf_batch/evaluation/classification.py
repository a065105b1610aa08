"""Evaluate a classifier on a labelled study: AUROC, average precision and F1 at the model's
threshold for HRF presence, plus the task's own measure (3-class accuracy, count error)."""

from __future__ import annotations

from typing import Any

import numpy as np

from hrf_batch.evaluation.metrics import presence_metrics
from hrf_batch.io.labels import LabelledBScans
from hrf_batch.model.calibration import expected_calibration_error
from hrf_batch.model.classify import Classifier, raw_scores


def evaluate_classifier(clf: Classifier, data: LabelledBScans) -> dict[str, Any]:
    """Metrics of ``clf`` on ``data``; scores are the task head's HRF-presence score."""
    cfg = clf.info.config
    raw = raw_scores(clf, data.images)
    scores = clf.calibration.apply(raw)
    out: dict[str, Any] = {"model_id": clf.model_id, "task": cfg.task, **presence_metrics(data.counts, scores, clf.threshold)}
    out["ece"] = expected_calibration_error(scores, data.counts > 0)
    out["calibrated"] = not clf.calibration.is_identity
    out["n_patients"] = len(set(data.patients.tolist()))
    if cfg.task == "regression":
        from hrf_batch.model.nets.heads import RegressionTask

        predicted = np.array([RegressionTask.count_at_score(min(float(s), 1 - 1e-6)) for s in raw])
        out["count_mae"] = float(np.mean(np.abs(predicted - np.minimum(data.counts, 10))))
    return out


def format_metrics(metrics: dict[str, Any]) -> str:
    """Plain-text table of evaluation metrics."""
    lines = [
        f"model       {metrics['model_id']}  (task {metrics['task']})",
        f"B-scans     {int(metrics['n'])} ({int(metrics['n_positive'])} with HRF) from {metrics['n_patients']} patients",
        f"AUROC       {metrics['auroc']:.3f}",
        f"AP          {metrics['ap']:.3f}",
        f"F1          {metrics['f1']:.3f}  at threshold {metrics['threshold']:.3f}",
        f"ECE         {metrics['ece']:.3f}  ({'calibrated' if metrics['calibrated'] else 'uncalibrated'} scores)",
    ]
    if "count_mae" in metrics:
        lines.append(f"count MAE   {metrics['count_mae']:.2f} HRF per B-scan")
    return "\n".join(lines)
