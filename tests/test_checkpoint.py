"""Model files: round trips, the model id, and every way a model folder is refused."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from hrf_batch import __version__
from hrf_batch.errors import HrfBatchError
from hrf_batch.model.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    ModelFileError,
    build_model,
    load_model,
    resolve_device,
    save_model,
)
from hrf_batch.model.nets import build_preset


def _tiny(task: str = "3class", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_preset("cct-tiny", task=task, pos_embed="learned-2d", **overrides)
    with torch.no_grad():  # move BatchNorm statistics off their defaults so they must round-trip
        model.train()(torch.randn(4, 1, 64, 96))
    return model.eval()


def _config(model: torch.nn.Module, **fields) -> ModelConfig:
    defaults = dict(preset="cct-tiny", norm_mean=41.5, norm_std=52.25, metrics={"auroc": 0.9, "ap": None},
                    training={"n_bscans": 12, "sources": ["synthetic"]})
    return ModelConfig.for_model(model, **{**defaults, **fields})


def _edit_config(directory: Path, edit) -> None:
    path = directory / CONFIG_FILE
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def test_round_trip_gives_identical_outputs_and_a_hash_based_id(tmp_path):
    model = _tiny()
    info = save_model(model, _config(model), tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    sha = hashlib.sha256((tmp_path / "m" / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert info.sha256 == sha and info.model_id == f"cct-{sha[:12]}"
    assert re.fullmatch(r"cct-[0-9a-f]{12}", info.model_id)
    loaded, loaded_info = load_model(tmp_path / "m")
    assert loaded_info.model_id == info.model_id and loaded_info.path == tmp_path / "m"
    assert not loaded.training
    x = torch.randn(2, 1, 496, 512)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    config = loaded_info.config
    assert (config.arch, config.task, config.preset) == ("cct", "3class", "cct-tiny")
    assert config.kwargs == json.loads(json.dumps(model.arch_kwargs))  # all kwargs, not just the preset's
    assert (config.norm_mean, config.norm_std) == (41.5, 52.25)
    assert config.training["n_bscans"] == 12 and config.metrics == {"auroc": 0.9, "ap": None}
    assert config.code_version == __version__ and config.created.endswith("+00:00")
    record = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert record["weights_sha256"] == sha and record["model_id"] == info.model_id


def test_same_weights_give_the_same_id_and_files_can_be_named_directly(tmp_path):
    model = _tiny()
    first = save_model(model, _config(model), tmp_path / "a")
    second = save_model(model, _config(model, created="2025-01-01T00:00:00+00:00"), tmp_path / "b")
    again = {save_model(model, _config(model), tmp_path / f"again{i}").model_id for i in range(4)}
    assert first.model_id == second.model_id and again == {first.model_id}
    _, info = load_model(tmp_path / "b" / CONFIG_FILE)
    assert info.model_id == first.model_id and info.config.created == "2025-01-01T00:00:00+00:00"
    with torch.no_grad():
        model.head.bias += 0.01
    assert save_model(model, _config(model), tmp_path / "c").model_id != first.model_id


def test_mil_round_trip_without_the_random_init_warning(tmp_path, caplog):
    torch.manual_seed(0)
    model = build_preset("mil-alexnet", task="regression", warn_random_init=False).eval()
    save_model(model, ModelConfig.for_model(model), tmp_path / "mil")
    with caplog.at_level(logging.WARNING):
        loaded, info = load_model(tmp_path / "mil", device="auto")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert info.model_id.startswith("mil-")
    x = torch.randn(1, 1, 128, 192)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_build_model_needs_only_the_config():
    model = build_model(ModelConfig(arch="cct", task="binary", kwargs={"dim": 32, "depth": 1, "heads": 2}))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1)
    assert model.arch_kwargs["dim"] == 32


def test_tampered_weights_are_refused_naming_the_hash(tmp_path):
    model = _tiny()
    save_model(model, _config(model), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="hash") as err:
        load_model(tmp_path / "m")
    assert "sha256" in str(err.value) and err.value.hint


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["kwargs"].update(dim=32), "mis-shaped tensors"),
    (lambda r: r["kwargs"].update(depth=2), "missing tensors blocks.1"),
    (lambda r: r["kwargs"].update(pos_embed="sincos-2d"), "unexpected tensors pos_embed.weight"),
    (lambda r: r.update(task="binary"), "head.weight"),
])
def test_config_that_does_not_fit_the_weights_is_refused(tmp_path, edit, expected):
    model = _tiny()
    save_model(model, _config(model), tmp_path / "m")
    _edit_config(tmp_path / "m", edit)
    with pytest.raises(ModelFileError, match="does not match the weights") as err:
        load_model(tmp_path / "m")
    assert expected in str(err.value) and err.value.hint


def test_unknown_architecture_is_refused(tmp_path):
    model = _tiny()
    save_model(model, _config(model), tmp_path / "m")
    _edit_config(tmp_path / "m", lambda r: r.update(arch="vit"))
    with pytest.raises(ModelFileError, match="unknown architecture 'vit'") as err:
        load_model(tmp_path / "m")
    assert "cct" in err.value.hint and "mil" in err.value.hint
    with pytest.raises(ModelFileError, match="unknown architecture"):
        build_model(ModelConfig(arch="resnet"))


def test_missing_or_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="model folder not found"):
        load_model(tmp_path / "nowhere")
    model = _tiny()
    save_model(model, _config(model), tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).rename(tmp_path / "config.bak")
    with pytest.raises(ModelFileError, match=f"missing {CONFIG_FILE}"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelFileError, match="not a readable JSON"):
        load_model(tmp_path / "m")
    (tmp_path / "config.bak").rename(tmp_path / "m" / CONFIG_FILE)
    _edit_config(tmp_path / "m", lambda r: r.update(format_version=99))
    with pytest.raises(ModelFileError, match="format version 99"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFileError, match=f"missing {WEIGHTS_FILE}"):
        load_model(tmp_path / "m")


def test_save_refuses_a_config_that_does_not_describe_the_model(tmp_path):
    model = _tiny()
    with pytest.raises(ModelFileError, match="differ from the model"):
        save_model(model, ModelConfig(arch="cct", task="3class", kwargs={"dim": 32}), tmp_path / "a")
    with pytest.raises(ModelFileError, match="cct/binary"):
        save_model(model, ModelConfig(arch="cct", task="binary"), tmp_path / "b")
    with pytest.raises(ModelFileError, match="norm_std"):
        save_model(model, _config(model, norm_std=0.0), tmp_path / "c")
    with pytest.raises(ModelFileError, match="JSON"):
        save_model(model, _config(model, metrics={"auroc": float("nan")}), tmp_path / "d")
    save_model(model, _config(model), tmp_path / "e")
    with pytest.raises(ModelFileError, match="already holds a model"):
        save_model(model, _config(model), tmp_path / "e")
    assert save_model(model, _config(model), tmp_path / "e", overwrite=True).path == tmp_path / "e"
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()  # nothing half-written


def test_auto_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(HrfBatchError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(HrfBatchError, match="unknown device"):
        resolve_device("gpu-please")
