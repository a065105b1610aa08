"""Model files: a folder with ``model.safetensors`` (weights) and ``config.json`` (everything else).

``config.json`` names the architecture and all its kwargs, the task, the input normalisation
(mean/std on the 0..255 display scale), a training-data summary, metrics, creation time, code
version and the sha256 of the weights file. The model id ``f"{arch}-{sha256[:12]}"`` is what every
stored result carries, so the same weights always give the same id and any change to them gives a
new one. A model folder describes itself: :func:`build_model` needs only the config, and
:func:`load_model` refuses (with :class:`ModelFileError`) missing files, changed weights, a config
that does not fit the weights, and unknown architectures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hrf_batch import __version__
from hrf_batch.errors import HrfBatchError
from hrf_batch.io.hashing import sha256_file
from hrf_batch.model.calibration import Calibration
from hrf_batch.model.nets import ARCHITECTURES, TASKS

FORMAT = "hrf-batch-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_REFETCH = "re-copy the whole model folder from where it came from (never edit its files by hand)"


class ModelFileError(HrfBatchError):
    """A model folder is missing, incomplete, changed, or does not describe its weights."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything but the weights. ``kwargs`` are the architecture's constructor kwargs (no task)."""

    arch: str
    task: str = "binary"
    kwargs: dict[str, Any] = field(default_factory=dict)
    norm_mean: float = 0.0
    norm_std: float = 1.0
    preset: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # see hrf_batch.model.calibration; {} = none
    created: str = ""
    code_version: str = ""

    @classmethod
    def for_model(cls, model: nn.Module, **fields: Any) -> "ModelConfig":
        """The config of a model built from :mod:`hrf_batch.model.nets`: arch, task and all kwargs."""
        return cls(arch=model.arch, task=model.task_name, kwargs=dict(model.arch_kwargs), **fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed ``config.json``; unknown keys are ignored, missing ``arch`` refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        if "arch" not in data:
            raise ModelFileError(f"{CONFIG_FILE} has no 'arch' entry", _REFETCH)
        config = cls(**{k: v for k, v in data.items() if k in names})
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse configs no model can be built or fed from, saying which field is wrong."""
        if not isinstance(self.kwargs, dict) or "task" in self.kwargs:
            raise ModelFileError("config kwargs must be a dict without 'task'",
                                 "put the task in ModelConfig.task and the constructor kwargs in kwargs")
        if self.task not in TASKS:
            raise ModelFileError(f"unknown task {self.task!r} in the model config",
                                 f"use one of {sorted(TASKS)}")
        mean, std = self.norm_mean, self.norm_std
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std)) or std <= 0:
            raise ModelFileError(f"norm_mean/norm_std must be finite numbers with std > 0, got {mean!r}/{std!r}",
                                 "record the training set's pixel mean and standard deviation")
        try:
            Calibration.from_dict(self.calibration)
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelFileError(f"the calibration entry of the model config is not valid: {exc}",
                                 "retrain or recalibrate the model, or remove the entry to use raw scores") from exc


@dataclass(frozen=True)
class ModelInfo:
    """A saved or loaded model: its id, weights hash, config and folder."""

    model_id: str
    sha256: str
    config: ModelConfig
    path: Path


def model_id_for(arch: str, sha256: str) -> str:
    """The model id of weights with this sha256."""
    return f"{arch}-{sha256[:12]}"


def resolve_device(device: str = "cpu") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; any other torch device string as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise HrfBatchError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or auto") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HrfBatchError(f"device {device!r} requested but CUDA is not available here",
                            "use --device cpu or auto")
    return resolved


def build_model(config: ModelConfig, **init_options: Any) -> nn.Module:
    """A freshly initialised model from the config alone.

    ``init_options`` go to the constructor without being part of the architecture (e.g.
    ``alexnet_weights=path`` for MIL training).
    """
    config.validate()
    if config.arch not in ARCHITECTURES:
        raise ModelFileError(f"unknown architecture {config.arch!r} in the model config",
                             f"known architectures: {sorted(ARCHITECTURES)}; a newer hrf-batch may know it")
    try:
        return ARCHITECTURES[config.arch](config.task, **config.kwargs, **init_options)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"the {config.arch!r} kwargs in the model config are not valid: {exc}",
                             _REFETCH) from exc


# --------------------------------------------------------------------------- save


def save_model(model: nn.Module, config: ModelConfig, directory: Path, *, overwrite: bool = False) -> ModelInfo:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; return the model's info.

    The config must describe the model (same arch, task and kwargs, same tensors); the model's
    full ``arch_kwargs`` are recorded. ``created`` and ``code_version`` are filled when empty.
    """
    directory = Path(directory)
    config = _complete_config(model, config)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    problems = _state_problems(_reference_state(config), state)
    if problems:
        raise ModelFileError("the config does not describe this model: " + "; ".join(problems),
                             "build the config with ModelConfig.for_model(model)")
    weights, cfg_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not overwrite and (weights.exists() or cfg_path.exists()):
        raise ModelFileError(f"{directory} already holds a model",
                             "choose a new folder or pass overwrite=True")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    # one metadata key only: several keys are written in a random order, changing the hash
    save_file(state, str(tmp), metadata={"format": "pt"})
    sha = sha256_file(tmp)
    os.replace(tmp, weights)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_id": model_id_for(config.arch, sha),
              "weights_file": WEIGHTS_FILE, "weights_sha256": sha, **config.to_dict()}
    text = json.dumps(record, indent=2, allow_nan=False)
    tmp_cfg = directory / (CONFIG_FILE + ".tmp")
    tmp_cfg.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp_cfg, cfg_path)
    return ModelInfo(model_id=model_id_for(config.arch, sha), sha256=sha, config=config, path=directory)


def _complete_config(model: nn.Module, config: ModelConfig) -> ModelConfig:
    """Check arch/task/kwargs against the model, record all its kwargs, fill time and version."""
    config.validate()
    arch, task = getattr(model, "arch", None), getattr(model, "task_name", None)
    if arch is not None and (arch != config.arch or task != config.task):
        raise ModelFileError(
            f"the config says {config.arch}/{config.task} but the model is {arch}/{task}",
            "build the config with ModelConfig.for_model(model)")
    kwargs = dict(config.kwargs)
    full = getattr(model, "arch_kwargs", None)
    if full is not None:
        wrong = [k for k, v in kwargs.items() if k not in full or _jsonable(v) != _jsonable(full[k])]
        if wrong:
            raise ModelFileError(f"config kwargs {wrong} differ from the model's",
                                 "build the config with ModelConfig.for_model(model)")
        kwargs = dict(full)
    try:
        json.dumps(config.to_dict(), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"the model config is not JSON-ready: {exc}",
                             "use plain numbers, strings, lists and dicts (None instead of NaN)") from exc
    return dataclasses.replace(
        config, kwargs=json.loads(json.dumps(kwargs)),
        created=config.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        code_version=config.code_version or __version__)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _reference_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Tensor names and shapes that the config implies (on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = build_model(config, **_load_options(config))
    return model.state_dict()


def _load_options(config: ModelConfig) -> dict[str, Any]:
    """Constructor options for a model whose weights are loaded right after (no init warnings)."""
    return dict(getattr(ARCHITECTURES.get(config.arch), "LOAD_OPTIONS", {}))


def _state_problems(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped tensors, each list cut to 5 names."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shaped = [f"{k} {tuple(found[k].shape)} instead of {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors {names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {names(unexpected)}")
    if shaped:
        problems.append(f"mis-shaped tensors {names(shaped)}")
    return problems


# --------------------------------------------------------------------------- load


def load_model(directory: Path, device: str = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a model folder (or its ``config.json`` / ``model.safetensors`` path) in eval mode."""
    directory = _model_dir(Path(directory))
    record = _read_record(directory)
    config = ModelConfig.from_dict(record)
    weights = directory / WEIGHTS_FILE
    sha = sha256_file(weights)
    recorded = record.get("weights_sha256")
    if sha != recorded:
        raise ModelFileError(
            f"{weights}: weights sha256 hash mismatch — the file has {sha[:12]}…, {CONFIG_FILE} "
            f"records {str(recorded)[:12]}…; the weights were changed or damaged", _REFETCH)
    torch_device = resolve_device(device)
    model = build_model(config, **_load_options(config))
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{weights}: not a readable safetensors file ({exc})", _REFETCH) from exc
    problems = _state_problems(model.state_dict(), tensors)
    if problems:
        raise ModelFileError(f"{CONFIG_FILE} does not match the weights in {directory}: " + "; ".join(problems),
                             "the config must be the one saved with these weights; " + _REFETCH)
    model.load_state_dict(tensors, strict=True)
    model.to(torch_device).eval()
    return model, ModelInfo(model_id=model_id_for(config.arch, sha), sha256=sha, config=config, path=directory)


def _model_dir(path: Path) -> Path:
    """The model folder for a folder path or a path to one of its two files; refuse missing files."""
    if path.name in (CONFIG_FILE, WEIGHTS_FILE) and not path.is_dir():
        path = path.parent
    if not path.is_dir():
        raise ModelFileError(f"model folder not found: {path}",
                             f"pass the folder that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise ModelFileError(f"{path}: model folder is missing {' and '.join(missing)}", _REFETCH)
    return path


def _read_record(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json``; refuse unreadable JSON and other format versions."""
    path = directory / CONFIG_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable JSON model config ({exc})", _REFETCH) from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an hrf-batch model config (no \"format\": \"{FORMAT}\")",
                             f"pass a folder written by hrf-batch's save_model; {_REFETCH}")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {version!r}, this hrf-batch reads {FORMAT_VERSION}",
                             "use the hrf-batch version that wrote the model, or re-save it with this one")
    return record
