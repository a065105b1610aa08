"""Where SAM 2 checkpoints are expected, which file each model size needs, and whether it is there.

No torch here: ``hrf-batch models`` can report SAM 2's state instantly. The weights cannot ship
with hrf-batch (licence and size), so every "not found" message names the official SAM 2.1 file,
its download address and where to put it.

Lookup order for a size: the configured path (setting ``sam2_checkpoint``, environment variable
``HRF_BATCH_SAM2_CHECKPOINT``; a file, or a folder holding the size's official file name), else
the default folder ``$XDG_CACHE_HOME/hrf-batch/sam2/`` (``~/.cache/hrf-batch/sam2/``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrf_batch.errors import HrfBatchError

CHECKPOINT_ENV = "HRF_BATCH_SAM2_CHECKPOINT"
DOWNLOAD_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives (all official SAM 2.1 files are)


class SegmenterSetupError(HrfBatchError):
    """A segmenter cannot be built: missing or unreadable checkpoint, unknown size or kind."""


@dataclass(frozen=True)
class Sam2Spec:
    """One official SAM 2.1 model: the config inside the sam2 package and its checkpoint file."""

    size: str
    config: str
    filename: str

    @property
    def name(self) -> str:
        """Recorded with every result, e.g. ``sam2.1-hiera-base-plus``."""
        return "sam2.1-hiera-" + self.size.replace("_", "-")

    @property
    def url(self) -> str:
        return DOWNLOAD_BASE + self.filename


SAM2_MODELS: dict[str, Sam2Spec] = {
    "tiny": Sam2Spec("tiny", "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "small": Sam2Spec("small", "configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "base_plus": Sam2Spec("base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "large": Sam2Spec("large", "configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}


def sam2_spec(size: str) -> Sam2Spec:
    """The spec of a model size (``tiny``, ``small``, ``base_plus``, ``large``)."""
    key = size.strip().lower().replace("-", "_").replace("+", "_plus")
    if key not in SAM2_MODELS:
        raise SegmenterSetupError(f"unknown SAM 2 model size {size!r}",
                                  f"use one of {', '.join(SAM2_MODELS)} (tiny is the fastest)")
    return SAM2_MODELS[key]


def default_checkpoint_dir() -> Path:
    """The folder searched when no checkpoint path is configured."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "hrf-batch" / "sam2"


def checkpoint_candidate(checkpoint: str | os.PathLike[str] | None, size: str) -> Path:
    """The file that would be loaded for ``size``: the configured file, the official file name
    inside a configured folder, or that name in :func:`default_checkpoint_dir`."""
    spec = sam2_spec(size)
    if checkpoint is None or str(checkpoint) == "":
        return default_checkpoint_dir() / spec.filename
    path = Path(checkpoint).expanduser()
    return path / spec.filename if path.is_dir() else path


def how_to_install(size: str) -> str:
    """What to download and where to put it — the hint of every missing-checkpoint error."""
    spec = sam2_spec(size)
    target = default_checkpoint_dir() / spec.filename
    return (f"run `hrf-batch models fetch sam2 --size {spec.size}`, or download the official SAM 2.1 checkpoint "
            f"{spec.filename} ({spec.url}) and install it with `hrf-batch models fetch sam2 --size {spec.size} "
            f"--from FILE` (it goes to {target}), or point the sam2_checkpoint setting / {CHECKPOINT_ENV} at the "
            "file; without it hrf-batch can only use the region-growing segmenter")


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint file, or None when it looks like one."""
    if not path.exists():
        return f"SAM 2 checkpoint not found: {path}"
    if not path.is_file():
        return f"SAM 2 checkpoint {path} is not a file"
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_ZIP_MAGIC))
    except OSError as exc:
        return f"SAM 2 checkpoint {path} cannot be read ({exc.strerror or exc})"
    if head != _ZIP_MAGIC:
        return f"{path} is not a PyTorch checkpoint (damaged or incomplete download?)"
    return None


def require_checkpoint(checkpoint: str | os.PathLike[str] | None, size: str) -> Path:
    """The checkpoint file for ``size``, or SegmenterSetupError saying what to download and where."""
    path = checkpoint_candidate(checkpoint, size)
    problem = _problem(path)
    if problem:
        raise SegmenterSetupError(problem, how_to_install(size))
    return path


def sam2_status(checkpoint_path: str | os.PathLike[str] | None, size: str = "tiny") -> dict[str, Any]:
    """Whether SAM 2 of ``size`` is ready to load, for ``hrf-batch models``.

    Keys: ready, name, size, path (file looked at), expected_file, download_url, default_dir,
    setting (environment variable), message (one line for people). Cheap: reads 4 bytes.
    """
    spec = sam2_spec(size)
    path = checkpoint_candidate(checkpoint_path, size)
    problem = _problem(path)
    message = f"{spec.name} ready: {path}" if problem is None else f"{problem} — {how_to_install(size)}"
    return {
        "ready": problem is None, "name": spec.name, "size": spec.size, "path": str(path),
        "expected_file": spec.filename, "download_url": spec.url,
        "default_dir": str(default_checkpoint_dir()), "setting": CHECKPOINT_ENV, "message": message,
    }
