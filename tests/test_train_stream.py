"""Training at study scale: streamed B-scans give the same model as in-memory ones, the volume cache
stays bounded, resume is exact, two DDP processes (as torchrun starts them) write one loadable
model, AMP on CUDA."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hrf_batch.cli import main
from hrf_batch.errors import HrfBatchError, LabelError
from hrf_batch.io.labels import load_csv_labels, load_study_labels
from hrf_batch.model.classify import load_classifier
from hrf_batch.training import train as train_mod
from hrf_batch.training.distributed import Processes, processes_from_env
from hrf_batch.training.source import InMemory, norm_stats
from hrf_batch.training.stream import VolumeCache, stream_csv_labels, stream_study_labels
from hrf_batch.training.train import TrainConfig, split_by_patient, train_model

from conftest import TINY_TRAIN


@pytest.fixture(scope="module")
def study(train_study: Path) -> Path:
    return train_study


@pytest.fixture(scope="module")
def labels_csv(study: Path) -> Path:
    """The B-scans of the study's single-file volumes as a labels CSV, rows in reverse order (the
    loaders sort them)."""
    with open(study / "ground_truth/manifest.csv", newline="") as fh:
        rows = [[r["source"], r["bscan_index"], r["hrf_count"], r["eye"]] for r in csv.DictReader(fh)
                if (study / r["source"]).is_file()]
    path = study / "labels.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["file", "bscan_index", "count", "eye"], *rows[::-1]])
    return path


def _both_classes_seed(counts: np.ndarray, patients: np.ndarray, val_fraction: float) -> int:
    seeds = [s for s in range(40) if len(set((counts[split_by_patient(patients, val_fraction, s)[1]] > 0).tolist())) == 2]
    assert seeds, "the test study has no split whose validation holds both classes"
    return seeds[0]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_classifier(str(model_dir), "cpu").model.state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


def test_streamed_study_lists_the_same_bscans_as_in_memory(study: Path) -> None:
    memory, streamed = load_study_labels(study), stream_study_labels(study, cache_bytes=1)
    assert len(streamed) == len(memory) == 24
    assert streamed.counts.tolist() == memory.counts.tolist() and streamed.patients.tolist() == memory.patients.tolist()
    assert streamed.keys == memory.keys
    assert streamed.shapes.tolist() == InMemory(memory).shapes.tolist()
    for i in range(len(memory)):
        img = streamed.image(i)
        assert img.dtype == np.uint8 and np.array_equal(img, memory.images[i])
    assert streamed.cache.misses == 8  # read in order: each of the 8 volumes once, though only one is kept
    assert norm_stats(streamed) == norm_stats(InMemory(memory))


def test_streamed_csv_lists_the_same_bscans_as_in_memory(study: Path, labels_csv: Path) -> None:
    memory, streamed = load_csv_labels(labels_csv, study), stream_csv_labels(labels_csv, study)
    assert streamed.counts.tolist() == memory.counts.tolist() and streamed.patients.tolist() == memory.patients.tolist()
    assert all(np.array_equal(streamed.image(i), memory.images[i]) for i in range(len(memory)))
    bad = labels_csv.with_name("bad.csv")
    file, _, count, eye = labels_csv.read_text().splitlines()[1].split(",")
    bad.write_text(f"file,bscan_index,count,eye\n{file},9,{count},{eye}\n")
    with pytest.raises(LabelError, match="out of range"):
        stream_csv_labels(bad, study)


def test_streamed_training_gives_the_same_model_as_in_memory(tmp_path: Path, study: Path) -> None:
    memory = load_study_labels(study)
    seed = _both_classes_seed(memory.counts, memory.patients, 0.5)
    cfg = TrainConfig(steps=6, eval_every=3, val_fraction=0.5, seed=seed, **TINY_TRAIN)
    streamed = stream_study_labels(study, cache_bytes=1)  # one volume kept: batches re-read their files
    a = train_model(memory, cfg, tmp_path / "memory", progress=False)
    b = train_model(streamed, cfg, tmp_path / "streamed", progress=False, workers=1)  # batches read ahead elsewhere
    assert streamed.cache.misses >= 8  # normalisation and validation passes read the volumes in this process
    assert a is not None and b is not None and a.model_id == b.model_id
    _assert_same_weights(tmp_path / "memory", tmp_path / "streamed")
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("memory", "streamed"))
    assert ca["norm_mean"] == cb["norm_mean"] and ca["calibration"] == cb["calibration"] and ca["metrics"] == cb["metrics"]
    assert ca["training"]["history"] == cb["training"]["history"]


def test_volume_cache_stays_within_its_bytes(study: Path) -> None:
    streamed = stream_study_labels(study)
    volume_bytes = 3 * 64 * 96
    streamed.cache = VolumeCache(max_bytes=2 * volume_bytes)
    order = np.random.default_rng(0).permutation(len(streamed))
    for i in order.tolist():
        streamed.image(i)
        assert streamed.cache.nbytes <= 2 * volume_bytes
    assert streamed.cache.hits + streamed.cache.misses == len(streamed) and streamed.cache.hits > 0
    ref = streamed.refs[0]
    with pytest.raises(LabelError, match="changed while training"):
        dataclasses.replace(ref, n_bscans=ref.n_bscans + 1).read()
    with pytest.raises(LabelError, match="no longer holds"):
        dataclasses.replace(ref, position=5).read()


def test_streamed_resume_continues_exactly(tmp_path: Path, study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(steps=6, eval_every=2, **TINY_TRAIN)
    train_model(stream_study_labels(study), cfg, tmp_path / "straight", progress=False)
    real_step, calls = train_mod._train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the state on disk is that of step 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_model(stream_study_labels(study), cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_mod, "_train_step", real_step)
    assert torch.load(tmp_path / "resumed/train_state.pt", weights_only=False)["step"] == 2
    train_model(stream_study_labels(study), cfg, tmp_path / "resumed", progress=False, resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_processes_from_torchrun_variables() -> None:
    assert processes_from_env({}) == Processes(0, 1, 0)
    procs = processes_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (procs.rank, procs.world_size, procs.local_rank, procs.is_main, procs.distributed) == (3, 4, 1, False, True)
    with pytest.raises(HrfBatchError, match="must be numbers"):
        processes_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(HrfBatchError, match="impossible"):
        processes_from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_train_command_streams_to_the_same_model(tmp_path: Path, study: Path, labels_csv: Path) -> None:
    runner = CliRunner()
    args = ["train", str(study), "--labels", str(labels_csv), "--preset", "cct-tiny", "--steps", "2", "--eval-every",
            "2", "--batch-size", "4", "--device", "cpu"]
    loaded = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    streamed = runner.invoke(main, [*args, "--out", str(tmp_path / "b"), "--stream", "--cache-mb", "1"])
    assert loaded.exit_code == 0 and streamed.exit_code == 0, loaded.output + streamed.output
    ids = [m for out in (loaded.output, streamed.output) for m in re.findall(r"saved (cct-\w+) to", out)]
    assert len(ids) == 2 and ids[0] == ids[1]
    missing = runner.invoke(main, [*args[:2], "--out", str(tmp_path / "c"), "--stream", "--labels", str(tmp_path / "none.csv")])
    assert missing.exit_code == 1 and "cannot read labels file" in missing.output


def _launch_two(args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two CPU processes of one training run, with the variables torchrun sets (without its agent
    process, which would be a third torch import on a small machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "hrf_batch", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=300)) for p in procs]
    for p, d in zip(procs, done):
        d.returncode = p.returncode
    return done


@pytest.mark.slow
def test_two_distributed_cpu_processes_write_one_loadable_model(tmp_path: Path, study: Path) -> None:
    out = tmp_path / "ddp"
    args = ["train", str(study), "--out", str(out), "--preset", "cct-tiny", "--steps", "4", "--eval-every", "2",
            "--batch-size", "2", "--device", "cpu", "--stream"]
    first = _launch_two(args)
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-2000:] + first[1].stderr[-2000:]
    assert "saved cct-" in first[0].stdout and first[1].stdout == ""  # process 0 reports and writes, 1 stays quiet
    clf = load_classifier(str(out), "cpu")
    assert json.loads((out / "config.json").read_text())["training"]["processes"] == 2
    assert clf.model_id in first[0].stdout
    resumed = _launch_two([*args, "--resume"])
    assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr[-2000:] + resumed[1].stderr[-2000:]
    assert "0/4" in first[0].stderr and "0/4" not in resumed[0].stderr  # the resumed bar starts at the saved step 4
    assert load_classifier(str(out), "cpu").model_id == clf.model_id
    with pytest.raises(HrfBatchError, match="number of processes"):  # the state of 2 processes, resumed by one
        train_model(stream_study_labels(study), TrainConfig(steps=4, eval_every=2, **{**TINY_TRAIN, "batch_size": 2}), out,
                    progress=False, resume=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_step_on_cuda_is_bfloat16_and_finite(study: Path) -> None:
    cfg = TrainConfig(steps=2, eval_every=2, **{**TINY_TRAIN, "device": "cuda"})
    device = torch.device("cuda")
    att = train_mod._new_attempt(cfg, 0, device, Processes())
    dtypes: set[torch.dtype] = set()
    for module in att.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    memory = InMemory(load_study_labels(study))
    x = torch.from_numpy(np.stack([memory.image(i) for i in range(4)]).astype(np.float32)).unsqueeze(1)
    loss = train_mod._train_step(att, cfg, x, memory.counts[:4], (100.0, 50.0), device)
    assert np.isfinite(loss) and dtypes == {torch.bfloat16} and att.step == 1  # every Linear ran in bfloat16
