"""The command line: help everywhere, version, `info` and `scan` on real files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrf_batch import __version__
from hrf_batch.cli import main
from hrf_batch.io.writers.e2e import write_e2e

from conftest import make_test_volume


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_all_commands(cmd, (*prefix, name)))
    return out


def test_every_command_has_help() -> None:
    runner = CliRunner()
    commands = _all_commands(main)
    assert {"info", "scan", "synth"} <= {c[0] for c in commands}
    for command in commands:
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, result.output
        cmd = main
        for part in command:
            cmd = cmd.commands[part]
        assert cmd.help and len(cmd.help.strip()) > 20, f"{' '.join(command)} has no real help text"


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_info_text_and_json(fixtures_dir: Path) -> None:
    path = fixtures_dir / "spectralis-raw-data/Willis_B_716_0.vol"
    text = CliRunner().invoke(main, ["info", str(path)])
    assert text.exit_code == 0, text.output
    assert "1 B-scans x 496 x 768 px" in text.output and "eye OD" in text.output
    assert "lateral 0.01182 mm, axial 0.00387 mm" in text.output and "2017-01-11" in text.output
    assert "1951" not in text.output  # birth date only with --show-identifiers
    data = json.loads(CliRunner().invoke(main, ["info", "--json", str(path)]).output)
    assert data["n_bscans"] == 1 and data["eye"] == "OD" and data["patient_id"] == "01234"
    assert data["positions"][0]["end_mm"][0] == pytest.approx(9.078, abs=1e-3)
    assert "birth_date" not in data
    shown = json.loads(CliRunner().invoke(main, ["info", "--json", "--show-identifiers", str(path)]).output)
    assert shown["birth_date"] == "1951-10-03"


def test_info_lists_every_series_of_an_e2e(tmp_path: Path) -> None:
    path = write_e2e([make_test_volume(3, eye="OD"), make_test_volume(2, eye="OS")], tmp_path / "x.e2e")
    data = json.loads(CliRunner().invoke(main, ["info", "--json", str(path)]).output)
    assert [d["eye"] for d in data] == ["OD", "OS"] and [d["n_bscans"] for d in data] == [3, 2]


@pytest.mark.parametrize("name", ["spectralis-raw-data/invalid.vol", "rse-panimg/e2e_minimized.E2E", "rse-panimg/corrupt.fds"])
def test_info_on_broken_file_is_one_clean_line(fixtures_dir: Path, name: str) -> None:
    result = CliRunner().invoke(main, ["info", str(fixtures_dir / name)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and Path(name).name in lines[0]
    assert "Traceback" not in result.output


def test_scan_fixtures(fixtures_dir: Path) -> None:
    result = CliRunner().invoke(main, ["scan", "--json", str(fixtures_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n_volumes"] == 6 and report["n_errors"] == 3
    patients = {v["patient_id"] for v in report["visits"]}
    assert {"01234", "Study-01", "1"} <= patients


def test_evaluate_segmentation_and_calibrate_commands(tmp_path: Path) -> None:
    from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

    from conftest import save_tiny_model

    save_tiny_model(tmp_path / "m")
    study = tmp_path / "study"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=3, width=128, height=96, seed=4))
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(study), "--model", str(tmp_path / "m"), "--device", "cpu", "--segmentation",
                                  "--segmenter", "region", "--max-iterations", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    seg = report["segmentation"]
    assert seg["segmenter"] == "region-growing" and seg["iterations_reported"] == [1, 2]
    assert seg["parameters"]["max_iterations"] == 2 and seg["parameters"]["segmenter_params"]["min_contrast"] == 30.0
    # the command reports what the library computes for the same settings, number for number
    from hrf_batch.evaluation.calibrate import calibrate
    from hrf_batch.evaluation.classification import evaluate_classifier
    from hrf_batch.evaluation.segmentation import evaluate_segmentation
    from hrf_batch.io.labels import load_study_labels
    from hrf_batch.model.classify import load_classifier
    from hrf_batch.pipeline import PipelineParams
    from hrf_batch.segment import make_segmenter

    clf = load_classifier(str(tmp_path / "m"), "cpu")
    direct = evaluate_segmentation(study, clf, make_segmenter("region"), PipelineParams(max_iterations=2))
    assert report["pointing_game"] == json.loads(json.dumps(direct.pop("pointing_game")))
    assert set(seg.pop("pipeline_seconds")) == set(direct.pop("pipeline_seconds")) == {"anatomy", "score", "explain", "segment"}
    assert seg == json.loads(json.dumps(direct, default=str))  # every number but the wall-clock times
    assert report["classification"] == json.loads(json.dumps(evaluate_classifier(clf, load_study_labels(study))))
    assert direct["after_2"]["n_gt_hrfs"] > 0  # the study has HRFs to score against
    result = runner.invoke(main, ["calibrate", str(study), "--segmenter", "region", "--boxes", "2,4", "--crops", "50,75"])
    assert result.exit_code == 0, result.output
    rows = calibrate(study, make_segmenter("region"), box_sizes=(2, 4), crop_sizes=(50, 75), limit_hrfs=300)
    pattern = re.compile(r"^([* ]) +(\d+) +(\d+) +([\d.]+) +([\d.]+) +([\d.]+)(  \(default\))?$")
    shown = [m.groups() for m in map(pattern.match, result.output.splitlines()) if m]
    assert [(int(b), int(c), float(d)) for _, b, c, d, *_ in shown] == \
        [(r["box_px"], r["crop_px"], round(r["dice"], 3)) for r in sorted(rows, key=lambda r: -r["dice"])]
    best = max(r["dice"] for r in rows)
    assert [star == "*" for star, *_ in shown] == [round(float(d), 3) == round(best, 3) for _, _, _, d, *_ in shown]
    assert [(b, c) for _, b, c, *_, note in shown if note] == [("4", "75")]  # the default setting is marked


def test_db_upgrade_command_migrates_an_old_database(tmp_path: Path) -> None:
    import shutil

    from hrf_batch.store import head_revision

    old = tmp_path / "old.sqlite"
    shutil.copy(Path(__file__).parent / "assets" / "store_0001.sqlite", old)
    runner = CliRunner()
    refused = runner.invoke(main, ["export", "--db", str(old), "--out", str(tmp_path / "csv")])
    assert refused.exit_code == 1 and "hrf-batch db upgrade" in refused.output
    result = runner.invoke(main, ["db", "upgrade", "--db", str(old)])
    assert result.exit_code == 0, result.output
    assert head_revision() in result.output
    exported = runner.invoke(main, ["export", "--db", str(old), "--out", str(tmp_path / "csv")])
    assert exported.exit_code == 0, exported.output


def test_train_device_follows_flag_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --device` > HRF_BATCH_DEVICE > auto, like every other command's settings."""
    from hrf_batch.errors import HrfBatchError
    from hrf_batch.synthetic.study import StudySpec, write_synthetic_study
    from hrf_batch.training import train as train_mod

    write_synthetic_study(tmp_path / "s", StudySpec(patients=2, visits=1, bscans=1, width=64, height=48, seed=1))
    seen: list[str] = []

    def fake_train(data, cfg, out_dir, **_kw):  # noqa: ANN001, ANN202 - stands in for the real signature
        seen.append(cfg.device)
        raise HrfBatchError("stopped by the test")

    monkeypatch.setattr(train_mod, "train_model", fake_train)
    runner = CliRunner()
    args = ["train", str(tmp_path / "s"), "--out", str(tmp_path / "m")]
    for env, flag, expected in (({}, [], "auto"), ({"HRF_BATCH_DEVICE": "cpu"}, [], "cpu"),
                                ({"HRF_BATCH_DEVICE": "cpu"}, ["--device", "cuda"], "cuda")):
        result = runner.invoke(main, args + flag, env={"HRF_BATCH_DEVICE": "", **env})
        assert result.exit_code == 1 and "stopped by the test" in result.output
        assert seen.pop() == expected
