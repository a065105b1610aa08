"""Settings, read once and passed down: command-line flags > HRF_BATCH_* environment variables >
a TOML config file (``--config FILE`` or ``./hrf-batch.toml``) > defaults."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hrf_batch.errors import HrfBatchError

MODELS_DIR = Path(__file__).resolve().parent / "model" / "shipped"  # package data: also in a wheel
DEFAULT_MODEL = "cct-lite-synth"
CONFIG_FILE = "hrf-batch.toml"


@dataclass(frozen=True)
class Settings:
    db: str | None = None  # a URL or a SQLite file path; None: the store's default, ./hrf_batch.sqlite
    model: str = str(MODELS_DIR / DEFAULT_MODEL)
    device: str = "auto"
    segmenter: str = "auto"  # auto | sam2 | region
    sam2_checkpoint: str | None = None
    sam2_size: str = "tiny"
    batch_size: int | None = None  # None: fitted to free memory on CUDA, 2 on CPU (bigger batches were slower there)
    precision: str = "auto"  # auto | fp32 | bf16; auto: bf16 on CUDA, fp32 on CPU
    box_px: int = 4
    crop_px: int = 75
    max_iterations: int = 6
    stop_score: float = 0.05
    threshold: float | None = None  # None: the model's own threshold
    min_lesion_px: int = 5
    score_drop_guard: bool = False  # stop a B-scan when inpainting what was found does not lower its score (measured: off)
    lesion_filter: bool = True  # keep only lesions of HRF size, shape and contrast
    peaks_per_iteration: int = 1  # > 1: several separated relevance peaks per iteration
    retina_band: bool = True  # prompt and keep lesions only between ILM and Bruch's membrane


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, value: Any, origin: str) -> Any:
    """Coerce a setting from text (env vars) or TOML to the field's type, with a clear error."""
    if value is None:
        return None
    kind = _FIELDS[name].type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise HrfBatchError(f"setting {name} from {origin} is {value!r}, not true or false", f"fix {origin}")
    try:
        if "int" in kind and "float" not in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except (TypeError, ValueError) as exc:
        raise HrfBatchError(f"setting {name} from {origin} is {value!r}, not a number", f"fix {origin}") from exc
    return str(value)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HrfBatchError(f"cannot read config file {path}: {exc.strerror}", "check the --config path") from exc
    except tomllib.TOMLDecodeError as exc:
        raise HrfBatchError(f"config file {path} is not valid TOML: {exc}", "fix the file") from exc
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise HrfBatchError(f"config file {path} has unknown settings {unknown}", f"known settings: {sorted(_FIELDS)}")
    return {k: _convert(k, v, str(path)) for k, v in data.items()}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for name in _FIELDS:
        key = f"HRF_BATCH_{name.upper()}"
        if env.get(key, "") != "":
            out[name] = _convert(name, env[key], f"environment variable {key}")
    return out


def load_settings(flags: Mapping[str, Any] | None = None, config_file: Path | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Merge the sources; ``flags`` with value None do not override anything."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    path = config_file or (Path.cwd() / CONFIG_FILE if (Path.cwd() / CONFIG_FILE).is_file() else None)
    if path is not None:
        merged.update(_from_file(Path(path)))
    merged.update(_from_env(env))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None and k in _FIELDS})
    return Settings(**merged)
