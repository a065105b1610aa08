"""Train a B-scan classifier from image-level labels (HRF count per B-scan).

Patient-level train/validation split, class-balanced batches of equal-sized B-scans, the paper's
augmentation, normalisation statistics of the training set stored with the model, AdamW (weight
decay 0.01) with a OneCycle schedule, validation metrics at every evaluation, the best model kept,
resumable state, and the kept model's scores calibrated on the validation split so its decision
threshold is the probability 0.5 (:mod:`hrf_batch.model.calibration`). A run that does not take off (validation AUROC below ``takeoff_auroc`` after
``takeoff_steps``) is restarted with the next seed: from-scratch transformers on few positives
sometimes stay at chance, and one restart is cheaper than a user noticing it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hrf_batch.errors import HrfBatchError
from hrf_batch.evaluation.metrics import best_f1_threshold, presence_metrics
from hrf_batch.io.labels import LabelledBScans
from hrf_batch.model.calibration import fit_calibration
from hrf_batch.model.classify import score_images
from hrf_batch.model.files import ModelConfig, build_model, resolve_device, save_model
from hrf_batch.model.nets import PRESETS, get_task
from hrf_batch.training.augment import augment

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"
CALIBRATED_THRESHOLD = 0.5  # on calibrated probabilities: HRF as likely as not


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "cct-small"
    task: str = "binary"
    steps: int = 600
    batch_size: int = 8
    max_lr: float = 1e-3
    weight_decay: float = 0.01
    val_fraction: float = 0.2
    eval_every: int = 100
    seed: int = 0
    device: str = "auto"
    max_restarts: int = 2
    takeoff_steps: int = 300
    takeoff_auroc: float = 0.7
    alexnet_weights: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def split_by_patient(patients: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and validation B-scans; no patient is in both."""
    unique = np.array(sorted(set(patients.tolist())))
    if len(unique) < 2:
        raise HrfBatchError(f"need B-scans of at least 2 patients for a patient-level split, got {len(unique)}",
                            "add patients or use a bigger study")
    rng = np.random.default_rng(seed)
    n_val = min(len(unique) - 1, max(1, round(len(unique) * val_fraction)))
    val_patients = set(rng.permutation(unique)[:n_val].tolist())
    is_val = np.array([p in val_patients for p in patients])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class BalancedBatches:
    """Batches of equal-sized B-scans, half with HRF and half without where both exist."""

    def __init__(self, data: LabelledBScans, batch_size: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.rng = np.random.default_rng(seed)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(data.images):
            groups.setdefault(img.shape, []).append(i)
        self.groups = [np.array(v) for v in groups.values()]
        self.weights = np.array([len(g) for g in self.groups], dtype=float) / len(data)

    def next(self) -> np.ndarray:
        group = self.groups[self.rng.choice(len(self.groups), p=self.weights)]
        pos = group[self.data.counts[group] > 0]
        neg = group[self.data.counts[group] == 0]
        if len(pos) == 0 or len(neg) == 0:
            return self.rng.choice(group, self.batch_size)
        n_pos = self.batch_size // 2
        return np.concatenate([self.rng.choice(pos, n_pos), self.rng.choice(neg, self.batch_size - n_pos)])


def _norm_stats(data: LabelledBScans) -> tuple[float, float]:
    sample = np.concatenate([img.ravel()[::7] for img in data.images]).astype(np.float64)
    return float(sample.mean()), float(max(sample.std(), 1e-3))


@dataclass
class _Attempt:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    seed: int
    step: int = 0
    best_auroc: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)


def _new_attempt(cfg: TrainConfig, seed: int, device: torch.device) -> _Attempt:
    if cfg.preset not in PRESETS:
        raise HrfBatchError(f"unknown model preset {cfg.preset!r}", f"choose one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    arch, kwargs = PRESETS[cfg.preset]
    config = ModelConfig(arch=arch, task=cfg.task, kwargs={**kwargs, **cfg.overrides}, preset=cfg.preset)
    options = {"alexnet_weights": cfg.alexnet_weights} if arch == "mil" else {}
    model = build_model(config, **options).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.max_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, total_steps=cfg.steps)
    return _Attempt(model, opt, sched, seed)


def _train_step(att: _Attempt, cfg: TrainConfig, data: LabelledBScans, idx: np.ndarray, norm: tuple[float, float],
                gen: torch.Generator, device: torch.device) -> float:
    task = get_task(cfg.task)
    att.model.train()
    x = torch.from_numpy(np.stack([data.images[i] for i in idx]).astype(np.float32)).unsqueeze(1)
    x = augment(x, gen)
    x = ((x - norm[0]) / norm[1]).to(device)
    loss = task.loss(att.model(x), task.target(data.counts[idx]).to(device))
    att.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(att.model.parameters(), 1.0)
    att.optimizer.step()
    att.scheduler.step()
    att.step += 1
    return float(loss.detach())


@dataclass
class _Run:
    """Everything a resumed run needs besides the data."""

    attempt: _Attempt
    restarts: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _evaluate(run: _Run, cfg: TrainConfig, val: LabelledBScans, norm: tuple[float, float], device: torch.device,
              recent_loss: float) -> dict[str, float]:
    att = run.attempt
    scores = score_images(att.model, cfg.task, val.images, *norm, device, cfg.batch_size)
    metrics = presence_metrics(val.counts, scores, 0.5)
    metrics.update(step=float(att.step), loss=recent_loss, seed=float(att.seed))
    att.history.append(metrics)
    auroc = metrics["auroc"] if np.isfinite(metrics["auroc"]) else 0.0
    if auroc > att.best_auroc:
        att.best_auroc = auroc
        threshold = best_f1_threshold(val.counts, scores)
        run.best_metrics = {**presence_metrics(val.counts, scores, threshold), "step": float(att.step), "seed": float(att.seed)}
        run.best_state = {k: v.detach().to("cpu").clone() for k, v in att.model.state_dict().items()}
    return metrics


def _should_restart(run: _Run, cfg: TrainConfig) -> bool:
    att = run.attempt
    return (att.step >= cfg.takeoff_steps and att.step < cfg.steps and att.best_auroc < cfg.takeoff_auroc
            and len(run.restarts) < cfg.max_restarts)


def _summary(cfg: TrainConfig, run: _Run, train: LabelledBScans, val: LabelledBScans, source: str, device: torch.device) -> dict[str, Any]:
    shapes = sorted({f"{h}x{w}" for h, w in (img.shape for img in train.images)})
    return {
        "source": source, "device": str(device), "wall_time_s": round(run.seconds, 1),
        "config": asdict(cfg),
        "data": {
            "n_train": len(train), "n_val": len(val), "train_positive": int((train.counts > 0).sum()),
            "val_positive": int((val.counts > 0).sum()), "train_patients": len(set(train.patients.tolist())),
            "val_patients": len(set(val.patients.tolist())), "bscan_sizes": shapes,
        },
        "restarts": run.restarts, "history": run.attempt.history,
    }


def _json_safe(value: Any) -> Any:
    """NaN (e.g. AUROC of a validation split without HRF) → None, so the config stays valid JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _calibrate(model: torch.nn.Module, cfg: TrainConfig, val: LabelledBScans, norm: tuple[float, float],
               device: torch.device, best: dict[str, float]) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit the score calibration of the kept model on the validation split; the decision threshold
    becomes 0.5 (HRF as likely as not). Without both classes in validation the scores stay raw and
    the best-F1 threshold is kept, with a warning."""
    raw = score_images(model, cfg.task, val.images, *norm, device, cfg.batch_size)
    try:
        cal, summary = fit_calibration(raw, val.counts > 0)
    except ValueError as exc:
        log.warning("scores left uncalibrated: %s", exc)
        return {}, best
    metrics = {**presence_metrics(val.counts, cal.apply(raw), CALIBRATED_THRESHOLD),
               "step": best["step"], "seed": best["seed"],
               "uncalibrated_threshold": best["threshold"], "uncalibrated_f1": best["f1"]}
    return {**cal.to_dict(), "fitted_on": "validation split", **summary}, metrics


def _save_best(run: _Run, cfg: TrainConfig, norm: tuple[float, float], summary: dict[str, Any], out_dir: Path,
               val: LabelledBScans, device: torch.device):
    model = run.attempt.model
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(run.best_state)
    calibration, metrics = _calibrate(model, cfg, val, norm, device, run.best_metrics)
    config = ModelConfig.for_model(model, norm_mean=norm[0], norm_std=norm[1], preset=cfg.preset,
                                   training=_json_safe(summary), metrics=_json_safe(metrics),
                                   calibration=_json_safe(calibration))
    info = save_model(model, config, out_dir, overwrite=True)
    model.load_state_dict(current)
    return info


def _save_state(path: Path, run: _Run, gen: torch.Generator, batches: BalancedBatches, fingerprint: str) -> None:
    att = run.attempt
    state = {
        "fingerprint": fingerprint, "seed": att.seed, "step": att.step, "best_auroc": att.best_auroc,
        "history": att.history, "model": att.model.state_dict(), "optimizer": att.optimizer.state_dict(),
        "scheduler": att.scheduler.state_dict(), "restarts": run.restarts, "best_state": run.best_state,
        "best_metrics": run.best_metrics, "seconds": run.seconds, "generator": gen.get_state(),
        "batches_rng": batches.rng.bit_generator.state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_state(path: Path, cfg: TrainConfig, device: torch.device, fingerprint: str) -> tuple[_Run, dict[str, Any]]:
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise HrfBatchError(f"cannot resume: {path} is unreadable ({exc})", "delete it to start afresh") from exc
    if state.get("fingerprint") != fingerprint:
        raise HrfBatchError(f"cannot resume from {path}: it was written for other data or settings",
                            "resume with the same study, labels and options, or delete the file to start afresh")
    att = _new_attempt(cfg, state["seed"], device)
    att.model.load_state_dict(state["model"])
    att.optimizer.load_state_dict(state["optimizer"])
    att.scheduler.load_state_dict(state["scheduler"])
    att.step, att.best_auroc, att.history = state["step"], state["best_auroc"], state["history"]
    run = _Run(att, state["restarts"], state["best_state"], state["best_metrics"], state["seconds"])
    return run, state


def _fingerprint(cfg: TrainConfig, data: LabelledBScans) -> str:
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    digest.update(data.counts.tobytes())
    digest.update("|".join(data.patients.tolist()).encode())
    return digest.hexdigest()


def train_model(data: LabelledBScans, cfg: TrainConfig, out_dir: Path, *, source: str = "",
                resume: bool = False, progress: bool = True):
    """Train, keep the best model (by validation AUROC) in ``out_dir``; returns its ModelInfo."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    train_idx, val_idx = split_by_patient(data.patients, cfg.val_fraction, cfg.seed)
    train, val = data.subset(train_idx), data.subset(val_idx)
    if len(set((val.counts > 0).tolist())) < 2:
        log.warning("the validation patients' B-scans are all %s: AUROC is undefined and the first "
                    "evaluation's model is kept; use more patients for a meaningful validation",
                    "HRF-positive" if (val.counts > 0).all() else "HRF-free")
    norm = _norm_stats(train)
    fingerprint, state_path = _fingerprint(cfg, data), out_dir / STATE_FILE
    run, gen = _Run(_new_attempt(cfg, cfg.seed, device)), torch.Generator().manual_seed(cfg.seed)
    batches = BalancedBatches(train, cfg.batch_size, cfg.seed)
    if resume and state_path.exists():
        run, state = _load_state(state_path, cfg, device, fingerprint)
        gen.set_state(state["generator"])
        batches.rng.bit_generator.state = state["batches_rng"]
        log.info("resuming at step %d of %d", run.attempt.step, cfg.steps)
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=run.attempt.step, disable=not progress, desc="train", unit="step")
    while run.attempt.step < cfg.steps:
        start = time.perf_counter()
        losses.append(_train_step(run.attempt, cfg, train, batches.next(), norm, gen, device))
        bar.update(1)
        if run.attempt.step % cfg.eval_every == 0 or run.attempt.step == cfg.steps:
            m = _evaluate(run, cfg, val, norm, device, float(np.mean(losses[-cfg.eval_every:])))
            bar.set_postfix(loss=f"{m['loss']:.3f}", val_auroc=f"{m['auroc']:.3f}")
            if _should_restart(run, cfg):
                log.warning("validation AUROC %.2f after %d steps: restarting with seed %d",
                            run.attempt.best_auroc, run.attempt.step, run.attempt.seed + 1)
                run.restarts.append({"seed": run.attempt.seed, "step": run.attempt.step, "best_auroc": run.attempt.best_auroc})
                run.attempt = _new_attempt(cfg, run.attempt.seed + 1, device)
                bar.reset()
            run.seconds += time.perf_counter() - start
            _save_state(state_path, run, gen, batches, fingerprint)
        else:
            run.seconds += time.perf_counter() - start
    bar.close()
    if run.best_state is None:
        raise HrfBatchError("training ended without a validation result", "use more steps than --eval-every")
    return _save_best(run, cfg, norm, _summary(cfg, run, train, val, source, device), out_dir, val, device)
