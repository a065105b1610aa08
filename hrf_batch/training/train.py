"""Train a B-scan classifier from image-level labels (HRF count per B-scan).

Patient-level train/validation split, class-balanced batches of equal-sized B-scans, the paper's
augmentation, normalisation statistics of the training set stored with the model, AdamW (weight
decay 0.01) with a OneCycle schedule, validation metrics at every evaluation, the best model kept,
resumable state, and the kept model's scores calibrated on the validation split so its decision
threshold is the probability 0.5 (:mod:`hrf_batch.model.calibration`). A run that does not take off (validation AUROC below ``takeoff_auroc`` after
``takeoff_steps``) is restarted with the next seed: from-scratch transformers on few positives
sometimes stay at chance, and one restart is cheaper than a user noticing it.

The B-scans come from a :class:`~hrf_batch.training.source.BScanSource`: decoded in memory, or
streamed from their files (:mod:`hrf_batch.training.stream`) with memory that does not grow with
the study; both give the same model for the same seed. Every random draw of a step depends on
(seed, step) only (:mod:`hrf_batch.training.sampling`), so a resumed run continues exactly. Under
``torchrun`` the model trains with DistributedDataParallel (:mod:`hrf_batch.training.distributed`),
``batch_size`` B-scans per process; on CUDA the forward pass runs under bfloat16 autocast.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from hrf_batch.errors import HrfBatchError
from hrf_batch.evaluation.metrics import best_f1_threshold, presence_metrics
from hrf_batch.io.labels import LabelledBScans
from hrf_batch.model.calibration import fit_calibration
from hrf_batch.model.classify import score_images
from hrf_batch.model.files import ModelConfig, ModelInfo, build_model, resolve_device, save_model
from hrf_batch.model.nets import PRESETS, get_task
from hrf_batch.training.augment import augment
from hrf_batch.training.distributed import Processes, process_device, process_group, processes_from_env
from hrf_batch.training.sampling import BalancedBatchSampler, BScanDataset, collate, step_seed
from hrf_batch.training.source import BScanSource, as_source, chunks, norm_stats

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
    amp: bool = True  # bfloat16 autocast of the forward pass on CUDA; no effect on the CPU
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


@dataclass
class _Attempt:
    model: torch.nn.Module  # what is evaluated and saved
    net: torch.nn.Module  # what takes the steps: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    seed: int
    step: int = 0
    best_auroc: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)


def _new_attempt(cfg: TrainConfig, seed: int, device: torch.device, procs: Processes,
                 state: dict[str, Any] | None = None) -> _Attempt:
    """A model with its optimizer and schedule, fresh from ``seed`` or as ``state`` left them."""
    if cfg.preset not in PRESETS:
        raise HrfBatchError(f"unknown model preset {cfg.preset!r}", f"choose one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    arch, kwargs = PRESETS[cfg.preset]
    config = ModelConfig(arch=arch, task=cfg.task, kwargs={**kwargs, **cfg.overrides}, preset=cfg.preset)
    options = {"alexnet_weights": cfg.alexnet_weights} if arch == "mil" else {}
    model = build_model(config, **options).to(device)
    if state is not None:
        model.load_state_dict(state["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.max_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, total_steps=cfg.steps)
    att = _Attempt(model, procs.wrap(model, device), opt, sched, seed)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        att.step, att.best_auroc, att.history = state["step"], state["best_auroc"], state["history"]
    return att


def _batches(train: BScanSource, cfg: TrainConfig, att: _Attempt, procs: Processes,
             workers: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """This process's batches from the attempt's current step to the last."""
    sampler = BalancedBatchSampler(train.counts, train.shapes, cfg.batch_size, att.seed, start=att.step, stop=cfg.steps,
                                   rank=procs.rank, world_size=procs.world_size)
    return iter(DataLoader(BScanDataset(train), batch_sampler=sampler, collate_fn=collate, num_workers=workers))


def _train_step(att: _Attempt, cfg: TrainConfig, x: torch.Tensor, counts: np.ndarray, norm: tuple[float, float],
                device: torch.device, rank: int = 0) -> float:
    """One optimizer step on display-scale ``x`` (B, 1, H, W); its randomness (augmentation,
    dropout) is drawn from seeds of (attempt seed, step, process)."""
    task = get_task(cfg.task)
    att.model.train()
    torch.manual_seed(step_seed(att.seed, att.step, rank, 1))
    x = augment(x.to(device), torch.Generator().manual_seed(step_seed(att.seed, att.step, rank, 0)))
    x = (x - norm[0]) / norm[1]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        out = att.net(x)
    loss = task.loss(out.float(), task.target(counts).to(device))
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


def _scores(model: torch.nn.Module, cfg: TrainConfig, source: BScanSource, norm: tuple[float, float],
            device: torch.device) -> np.ndarray:
    """Raw HRF scores of every B-scan of ``source``, read a chunk at a time."""
    out = np.empty(len(source), dtype=np.float64)
    for start, images in chunks(source):
        out[start : start + len(images)] = score_images(model, cfg.task, images, *norm, device, cfg.batch_size)
    return out


def _evaluate(run: _Run, cfg: TrainConfig, val: BScanSource, norm: tuple[float, float], device: torch.device,
              recent_loss: float) -> dict[str, float]:
    att = run.attempt
    scores = _scores(att.model, cfg, val, norm, device)
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


def _summary(cfg: TrainConfig, run: _Run, train: BScanSource, val: BScanSource, source: str, device: torch.device,
             procs: Processes) -> dict[str, Any]:
    shapes = sorted({f"{h}x{w}" for h, w in train.shapes.tolist()})
    return {
        "source": source, "device": str(device), "processes": procs.world_size, "wall_time_s": round(run.seconds, 1),
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


def _calibrate(model: torch.nn.Module, cfg: TrainConfig, val: BScanSource, norm: tuple[float, float],
               device: torch.device, best: dict[str, float]) -> tuple[dict[str, Any], dict[str, float]]:
    """Fit the score calibration of the kept model on the validation split; the decision threshold
    becomes 0.5 (HRF as likely as not). Without both classes in validation the scores stay raw and
    the best-F1 threshold is kept, with a warning."""
    raw = _scores(model, cfg, val, norm, device)
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
               val: BScanSource, device: torch.device) -> ModelInfo:
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


def _save_state(path: Path, run: _Run, fingerprint: str) -> None:
    """What a resume needs; the sampler's position is ``step`` (batches are drawn per step)."""
    att = run.attempt
    state = {
        "fingerprint": fingerprint, "seed": att.seed, "step": att.step, "best_auroc": att.best_auroc,
        "history": att.history, "model": att.model.state_dict(), "optimizer": att.optimizer.state_dict(),
        "scheduler": att.scheduler.state_dict(), "restarts": run.restarts, "best_state": run.best_state,
        "best_metrics": run.best_metrics, "seconds": run.seconds,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_state(path: Path, cfg: TrainConfig, device: torch.device, fingerprint: str, procs: Processes) -> _Run:
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise HrfBatchError(f"cannot resume: {path} is unreadable ({exc})", "delete it to start afresh") from exc
    if state.get("fingerprint") != fingerprint:
        raise HrfBatchError(f"cannot resume from {path}: it was written for other data or settings",
                            "resume with the same study, labels, options and number of processes, or delete the "
                            "file to start afresh")
    att = _new_attempt(cfg, state["seed"], device, procs, state)
    return _Run(att, state["restarts"], state["best_state"], state["best_metrics"], state["seconds"])


def _fingerprint(cfg: TrainConfig, data: BScanSource, world_size: int) -> str:
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    digest.update(data.counts.tobytes())
    digest.update("|".join(data.patients.tolist()).encode())
    if world_size > 1:  # the global batch, and so every step, depends on it
        digest.update(f"processes={world_size}".encode())
    return digest.hexdigest()


def train_model(data: LabelledBScans | BScanSource, cfg: TrainConfig, out_dir: Path, *, source: str = "",
                resume: bool = False, progress: bool = True, workers: int = 0) -> ModelInfo | None:
    """Train, keep the best model (by validation AUROC) in ``out_dir``; returns its ModelInfo, or
    None on the processes other than process 0 of a distributed run (they write nothing).

    ``data`` is decoded B-scans or any source (e.g. streamed); ``workers`` processes read batches
    ahead (each with its own cache when streaming)."""
    procs = processes_from_env()
    device = process_device(procs, resolve_device(cfg.device))
    with process_group(procs, device):
        return _train(as_source(data), cfg, Path(out_dir), source, resume, progress and procs.is_main, workers,
                      procs, device)


def _train(data: BScanSource, cfg: TrainConfig, out_dir: Path, source: str, resume: bool, progress: bool,
           workers: int, procs: Processes, device: torch.device) -> ModelInfo | None:
    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = split_by_patient(data.patients, cfg.val_fraction, cfg.seed)
    train, val = data.subset(train_idx), data.subset(val_idx)
    if procs.is_main and len(set((val.counts > 0).tolist())) < 2:
        log.warning("the validation patients' B-scans are all %s: AUROC is undefined and the first "
                    "evaluation's model is kept; use more patients for a meaningful validation",
                    "HRF-positive" if (val.counts > 0).all() else "HRF-free")
    norm = procs.share(norm_stats(train) if procs.is_main else None)
    fingerprint, state_path = _fingerprint(cfg, data, procs.world_size), out_dir / STATE_FILE
    if procs.share(resume and state_path.exists()):
        run = _load_state(state_path, cfg, device, fingerprint, procs)
        if procs.is_main:
            log.info("resuming at step %d of %d", run.attempt.step, cfg.steps)
    else:
        run = _Run(_new_attempt(cfg, cfg.seed, device, procs))
    batches = _batches(train, cfg, run.attempt, procs, workers)
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=run.attempt.step, disable=not progress, desc="train", unit="step")
    while run.attempt.step < cfg.steps:
        start = time.perf_counter()
        x, counts = next(batches)
        losses.append(_train_step(run.attempt, cfg, x, counts, norm, device, procs.rank))
        bar.update(1)
        if run.attempt.step % cfg.eval_every == 0 or run.attempt.step == cfg.steps:
            restart = False
            if procs.is_main:
                m = _evaluate(run, cfg, val, norm, device, float(np.mean(losses[-cfg.eval_every:])))
                bar.set_postfix(loss=f"{m['loss']:.3f}", val_auroc=f"{m['auroc']:.3f}")
                restart = _should_restart(run, cfg)
            if procs.share(restart):
                if procs.is_main:
                    log.warning("validation AUROC %.2f after %d steps: restarting with seed %d",
                                run.attempt.best_auroc, run.attempt.step, run.attempt.seed + 1)
                    run.restarts.append({"seed": run.attempt.seed, "step": run.attempt.step,
                                         "best_auroc": run.attempt.best_auroc})
                run.attempt = _new_attempt(cfg, run.attempt.seed + 1, device, procs)
                batches = _batches(train, cfg, run.attempt, procs, workers)
                bar.reset()
            run.seconds += time.perf_counter() - start
            if procs.is_main:
                _save_state(state_path, run, fingerprint)
        else:
            run.seconds += time.perf_counter() - start
    bar.close()
    info = None
    if procs.is_main:
        if run.best_state is None:
            raise HrfBatchError("training ended without a validation result", "use more steps than --eval-every")
        info = _save_best(run, cfg, norm, _summary(cfg, run, train, val, source, device, procs), out_dir, val, device)
    procs.wait_for_all()
    return info
