"""What `hrf-batch models` shows: the model folders available, their ids and purpose, and SAM 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hrf_batch.io.hashing import sha256_file
from hrf_batch.model.files import CONFIG_FILE, WEIGHTS_FILE, model_id_for

CARD_FILE = "MODEL_CARD.md"


def _purpose(folder: Path, record: dict[str, Any]) -> str:
    """First non-heading line of the model card, else the training source."""
    card = folder / CARD_FILE
    if card.is_file():
        for line in card.read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text and not text.startswith("#"):
                return text
    source = record.get("training", {}).get("source", "")
    return f"trained on {source}" if source else "(no model card)"


def describe_model(folder: Path) -> dict[str, Any]:
    """Id (from the weights' hash, checked against the config), task and validation metrics."""
    record = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    sha = sha256_file(folder / WEIGHTS_FILE)
    model_id = model_id_for(record.get("arch", "?"), sha)
    metrics = record.get("metrics", {})
    return {
        "path": str(folder), "model_id": model_id, "intact": sha == record.get("weights_sha256"),
        "preset": record.get("preset"), "task": record.get("task"), "purpose": _purpose(folder, record),
        "val_auroc": metrics.get("auroc"), "threshold": metrics.get("threshold"),
    }


def list_models(root: Path) -> list[dict[str, Any]]:
    """Every model folder (a folder with config.json and weights) directly under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [describe_model(f) for f in sorted(root.iterdir())
            if (f / CONFIG_FILE).is_file() and (f / WEIGHTS_FILE).is_file()]
