"""A regular (non-editable) install works: the wheel carries the shipped model and the CLI runs.

The editable install used for development hides packaging mistakes (package data missing from the
wheel, code that reads files relative to the checkout). This test builds the tracked sources into a
fresh venv that borrows the running interpreter's dependencies, then runs the installed CLI from
an empty folder, so only what the wheel installed can be used.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

SKIPPED_TOP_LEVEL = {"tests", "benchmarks"}  # not part of the package; keeps the copy small
TIMEOUT_S = 300


def _env() -> dict[str, str]:
    """Environment for the installed CLI: CPU only, no PYTHONPATH and no HRF_BATCH_* overrides,
    so nothing outside the new venv can decide what gets imported or which model is used."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("HRF_BATCH_")}
    env.update(CUDA_VISIBLE_DEVICES="", SAM2_BUILD_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout, capturing text output (assertions show it on failure)."""
    return subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, after asserting exit code 0 (with its output in the message)."""
    assert result.returncode == 0, f"{result.args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _copy_tracked_sources(dest: Path) -> None:
    """Copy the git-tracked files (minus tests and benchmarks), so the build writes build/ and
    *.egg-info into the copy, never into the real checkout."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True,
                            timeout=60).stdout.decode("utf-8")
    for rel in filter(None, listed.split("\0")):
        source = PROJECT_ROOT / rel
        if rel.split("/", 1)[0] in SKIPPED_TOP_LEVEL or not source.is_file():  # deleted in the work tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _make_venv(venv: Path) -> tuple[Path, Path]:
    """A pip-less venv whose extra sys.path entry is the running interpreter's site-packages.

    A path listed in a .pth file is a plain sys.path entry: the .pth files inside it (the editable
    install's finder) are not processed, so hrf_batch is importable only once installed here.
    Returns the venv's python and its own site-packages.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_packages = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  cwd=venv)).strip())
    (site_packages / "_outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n",
                                                            encoding="utf-8")
    return python, site_packages


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.slow
def test_regular_install_runs_shipped_model(tmp_path: Path) -> None:
    """Install the tracked sources (not editable) and ingest a tiny study with the default model."""
    source = tmp_path / "src"
    _copy_tracked_sources(source)
    python, site_packages = _make_venv(tmp_path / "venv")
    work = tmp_path / "work"  # empty cwd: neither the checkout nor the copy is on sys.path
    work.mkdir()

    # The outer site-packages already holds the editable install's hrf-batch metadata:
    # --ignore-installed keeps pip from trying to uninstall it there.
    _ok(_run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
              "--no-cache-dir", "--ignore-installed", "--quiet", source], cwd=work))

    probe = json.loads(_ok(_run([python, "-c", "import hrf_batch, json, sys; print(json.dumps("
                                 "{'file': hrf_batch.__file__, 'finders': [repr(f) for f in sys.meta_path]}))"],
                                cwd=work)))
    assert _inside(probe["file"], site_packages), f"hrf_batch imported from {probe['file']}, not {site_packages}"
    assert not any("editable" in f.lower() for f in probe["finders"]), probe["finders"]

    cli = python.parent / ("hrf-batch.exe" if os.name == "nt" else "hrf-batch")
    listing = json.loads(_ok(_run([cli, "models", "--json"], cwd=work)))
    expected = (site_packages / "hrf_batch" / "model" / "shipped" / "cct-lite-synth").resolve()
    shipped = [m for m in listing["models"] if Path(m["path"]).resolve() == expected]
    assert len(shipped) == 1, f"shipped model not in the new venv's site-packages: {listing['models']}"
    model = shipped[0]
    assert model["intact"], model
    assert Path(listing["default_model"]).resolve() == Path(model["path"]).resolve(), listing["default_model"]

    _ok(_run([cli, "synth", "study", "--patients", "1", "--visits", "1", "--bscans", "2",
              "--width", "96", "--height", "64", "--seed", "3"], cwd=work))
    _ok(_run([cli, "ingest", "study", "--db", "db.sqlite", "--device", "cpu", "--segmenter", "region",
              "--max-iterations", "1", "--quiet"], cwd=work))

    with sqlite3.connect(work / "db.sqlite") as db:
        n_volumes = db.execute("SELECT COUNT(*) FROM volumes").fetchone()[0]
        runs = db.execute("SELECT model_id, status FROM runs").fetchall()
    assert n_volumes >= 1
    assert len(runs) == n_volumes, runs
    assert all(row == (model["model_id"], "done") for row in runs), (model["model_id"], runs)
