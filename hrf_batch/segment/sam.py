"""SAM 2.1 behind the :class:`~hrf_batch.segment.Segmenter` protocol: numpy in, numpy out.

Input handling (Morelle et al.: a 50..100 px crop upsampled to SAM's 1024 input, a small box at the
relevance peak, the best of SAM's multimask outputs):

* The grey crop is upsampled here, bicubically (``align_corners=False``), to the model's square
  input size (1024) and clipped to 0..255 as ``uint8`` — the predictor divides ``uint8`` by 255
  before its ImageNet normalisation, whereas float input would be taken as already in 0..1. With
  the input already 1024 x 1024 the predictor's own (bilinear) resize is the identity, so our
  interpolation is the one that counts and the box coordinates are explicit: the prompt box is
  scaled by 1024 / crop size (see :mod:`hrf_batch.segment.prompts` for the pixel-edge convention, which
  is also SAM 2's). The grey value is repeated into three channels. A crop that is not square
  (only for images smaller than the crop size) is stretched to the square input, as SAM 2's own
  resize would; the box is scaled per axis to match.
* ``multimask_output=True``; the mask with the highest predicted IoU is kept.
* The 1024 x 1024 mask is area-averaged down to the crop (a crop pixel is in the mask when at least
  half of it is) and pasted into the B-scan.
* Crops are encoded in batches of ``batch_size`` with ``set_image_batch``/``predict_batch``; on a
  CPU batching gains nothing (about 4-5 s per crop with Hiera-T), on a GPU it does.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hrf_batch.errors import one_line
from hrf_batch.io.hashing import sha256_file
from hrf_batch.model.files import resolve_device
from hrf_batch.segment.prompts import Prompt, box_in_crop, crop, paste
from hrf_batch.segment.weights import SegmenterSetupError, how_to_install, require_checkpoint, sam2_spec

log = logging.getLogger(__name__)


def load_sam2(path: str | os.PathLike[str], size: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """SAM 2.1 of ``size`` with the weights of an official-format checkpoint (``{"model": state_dict}``).

    The architecture comes from the sam2 package's own config and builder; the weights are loaded
    here, strictly, so a damaged file or a file of another size gives a message saying so.
    """
    from sam2.build_sam import build_sam2  # importing sam2 sets up its config search path

    spec = sam2_spec(size)
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        # a file that is not a pickle at all can end in a bare KeyError inside the unpickler
        detail = "not a PyTorch file" if isinstance(exc, KeyError) else one_line(exc)
        raise SegmenterSetupError(f"{path} cannot be read as a SAM 2 checkpoint ({detail})",
                                  how_to_install(size)) from exc
    state = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise SegmenterSetupError(f"{path} holds no 'model' weights, so it is not an official SAM 2.1 checkpoint",
                                  how_to_install(size))
    model = build_sam2(spec.config, None, device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SegmenterSetupError(
            f"{path} does not fit {spec.name} ({one_line(exc)})",
            f"use {spec.filename} for size {spec.size!r}, or set the model size that matches the file") from exc
    return model.to(torch.device(device)).eval()


def upsample_crop(patch: np.ndarray, size: int) -> np.ndarray:
    """Grey crop (display scale 0..255) → ``(size, size, 3)`` uint8, bicubic, for SAM's encoder."""
    grey = torch.from_numpy(np.ascontiguousarray(np.nan_to_num(patch, nan=0.0), dtype=np.float32))
    up = F.interpolate(grey[None, None], size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    out = up.clamp_(0.0, 255.0).round_().to(torch.uint8).numpy()
    return np.repeat(out[:, :, None], 3, axis=2)


def downsample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask at SAM's input size → bool mask of ``shape``: a pixel is in when half of it is."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="area")[0, 0].numpy() >= 0.5


def sam_box(prompt: Prompt, size: int) -> np.ndarray:
    """The prompt box in the upsampled crop, as SAM's ``[x0, y0, x1, y1]``."""
    r0, c0, r1, c1 = box_in_crop(prompt, prompt.scale_to(size))
    return np.array([c0, r0, c1, r1], dtype=np.float32)


class Sam2Segmenter:
    """SAM 2.1 (Hiera tiny/small/base_plus/large) prompted with a box on an upsampled crop."""

    def __init__(self, checkpoint: str | os.PathLike[str] | None, size: str = "tiny", *,
                 device: str = "auto", batch_size: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        spec = sam2_spec(size)
        path = require_checkpoint(checkpoint, spec.size)
        self.name: str = spec.name
        self.size = spec.size
        self.checkpoint_path = path
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.checkpoint_sha256: str | None = sha256_file(path)
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = load_sam2(path, spec.size, self.device)
        self.input_size = int(self.model.image_size)
        self._predictor = SAM2ImagePredictor(self.model)
        log.info("loaded %s from %s on %s", self.name, path, self.device)

    @property
    def params(self) -> dict[str, Any]:
        """What besides the name and checkpoint decides the masks: stored with each run, part of its rerun key."""
        return {"input_size": self.input_size, "upsample": "bicubic", "multimask": "best-score",
                "downsample": "area>=0.5"}

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> list[np.ndarray]:
        """One bool mask of the B-scan's shape per (image, prompt)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        shapes = []
        for image in images:
            if np.ndim(image) != 2:
                raise ValueError(f"images must be single B-scans (H, W), got shape {np.shape(image)}")
            shapes.append(np.shape(image))
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            idx = range(start, min(start + self.batch_size, len(images)))
            crops = [upsample_crop(crop(np.asarray(images[i]), prompts[i]), self.input_size) for i in idx]
            boxes = [sam_box(prompts[i], self.input_size) for i in idx]
            for i, best in zip(idx, self._predict(crops, boxes)):
                small = downsample_mask(best, prompts[i].crop_shape)
                out.append(paste(small, prompts[i], shapes[i]))
        return out

    def _predict(self, crops: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Encode the crops together, prompt each with its box, keep each one's best mask."""
        try:
            with torch.inference_mode():
                self._predictor.set_image_batch(crops)
                masks, scores, _ = self._predictor.predict_batch(box_batch=boxes, multimask_output=True)
        finally:
            self._predictor.reset_predictor()  # do not keep a batch of embeddings alive
        return [np.asarray(m[int(np.argmax(s))]) > 0.5 for m, s in zip(masks, scores)]
