"""`hrf-batch models fetch sam2`: download from a local HTTP server, install a copy with --from,
refuse broken or foreign files, and fail cleanly offline without leaving anything behind.

The checkpoint is a random-initialised SAM 2.1 Hiera-T saved like the official files, built once.
"""

from __future__ import annotations

import functools
import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from hrf_batch.cli import SAM2_SIZES, main
from hrf_batch.io.hashing import sha256_file as sha256_of
from hrf_batch.segment import CHECKPOINT_ENV, SAM2_MODELS, default_checkpoint_dir, sam2_status, weights

TINY_FILE = "sam2.1_hiera_tiny.pt"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty default checkpoint folder and no configured checkpoint, whatever the developer has."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    monkeypatch.delenv("HRF_BATCH_SAM2_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./hrf-batch.toml of the developer's
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a random-initialised Hiera-T saved exactly like the official files, a second
    valid checkpoint that differs in one tensor, and two files that are not checkpoints."""
    import torch
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    state = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu").state_dict()
    folder = tmp_path_factory.mktemp("served")
    torch.save({"model": state}, folder / TINY_FILE)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    torch.save({"model": state}, folder / "other_tiny.pt")
    (folder / "notes.pt").write_text("not a checkpoint\n")
    (folder / "hi.pt").write_text("hi\n")  # torch's unpickler fails on it with a KeyError
    data = (folder / TINY_FILE).read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    return folder


@contextmanager
def _serve(handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server on a random port in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _files(folder: Path) -> Callable[..., http.server.BaseHTTPRequestHandler]:
    return functools.partial(_QuietHandler, directory=str(folder))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture()
def base_url(served: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The download base pointed at a local server holding the checkpoint."""
    with _serve(_files(served)) as url:
        monkeypatch.setattr(weights, "DOWNLOAD_BASE", url)
        yield url


def _fetch(*args: str):
    return CliRunner().invoke(main, ["models", "fetch", "sam2", *args])


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_size_choices_match_the_models() -> None:
    assert SAM2_SIZES == tuple(SAM2_MODELS)


def test_fetch_module_does_not_import_torch() -> None:
    """`hrf-batch models` must stay instant: torch loads only to check a file."""
    code = "import sys, hrf_batch.segment.fetch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_offline_fails_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(weights, "DOWNLOAD_BASE", f"http://127.0.0.1:{port}/sam2/")
    result = _fetch("--size", "tiny")
    assert result.exit_code == 1, result.output
    assert f"could not download {TINY_FILE}: cannot reach 127.0.0.1:{port}" in result.output
    assert f"http://127.0.0.1:{port}/sam2/{TINY_FILE}" in result.output
    assert "hrf-batch models fetch sam2 --size tiny --from FILE" in result.output
    assert str(default_checkpoint_dir() / TINY_FILE) in result.output
    assert "Traceback" not in result.output
    assert not default_checkpoint_dir().exists()  # neither a temp file nor the folders made for it


def test_http_404_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    with _serve(_files(empty)) as url:
        monkeypatch.setattr(weights, "DOWNLOAD_BASE", url)
        result = _fetch("--to", str(target))
    assert result.exit_code == 1, result.output
    assert "answered HTTP 404" in result.output
    assert f"--from FILE --to {target}" in result.output
    assert _left_in(target) == []


class _CutShortHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 10 and hangs up."""

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04" + bytes(6))
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def test_a_transfer_cut_short_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _serve(_CutShortHandler) as url:
        monkeypatch.setattr(weights, "DOWNLOAD_BASE", url)
        result = _fetch("--to", str(tmp_path / "new" / "folder"))
    assert result.exit_code == 1, result.output
    assert "broke off" in result.output or "stopped after" in result.output
    assert not (tmp_path / "new").exists()


def test_download_installs_and_models_reports_ready(base_url: str, served: Path) -> None:
    assert sam2_status(None, "tiny")["ready"] is False
    result = _fetch("--size", "tiny")
    assert result.exit_code == 0, result.output
    installed = default_checkpoint_dir() / TINY_FILE
    assert _left_in(default_checkpoint_dir()) == [TINY_FILE]
    assert sha256_of(installed) == sha256_of(served / TINY_FILE)
    assert f"sha256 {sha256_of(installed)}" in result.output and "ready" in result.output
    assert sam2_status(None, "tiny")["ready"] is True
    listing = CliRunner().invoke(main, ["models"])
    assert listing.exit_code == 0 and "SAM 2 (sam2.1-hiera-tiny): ready" in listing.output
    again = _fetch("--size", "tiny")  # nothing downloaded twice
    assert again.exit_code == 0 and "already installed" in again.output


def test_download_of_a_non_checkpoint_is_not_installed(base_url: str, served: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    half = weights.Sam2Spec("tiny", SAM2_MODELS["tiny"].config, "truncated.pt")  # served whole: half a checkpoint
    monkeypatch.setitem(SAM2_MODELS, "tiny", half)
    result = _fetch("--size", "tiny")
    assert result.exit_code == 1, result.output
    assert f"the file downloaded from {base_url}truncated.pt was refused: it cannot be read" in result.output
    assert "--from FILE" in result.output and ".part" not in result.output
    assert not default_checkpoint_dir().exists()


def test_from_file_installs_and_repeats_are_safe(served: Path) -> None:
    target = default_checkpoint_dir() / TINY_FILE
    result = _fetch("--from", str(served / TINY_FILE))
    assert result.exit_code == 0, result.output
    assert f"installed {target}" in result.output
    assert f"sha256 {sha256_of(served / TINY_FILE)}" in result.output
    assert sam2_status(None, "tiny")["ready"] is True

    same = _fetch("--from", str(served / TINY_FILE))
    assert same.exit_code == 0 and "already installed (same sha256)" in same.output

    other = _fetch("--from", str(served / "other_tiny.pt"))
    assert other.exit_code == 1 and "--force" in other.output
    assert sha256_of(target) == sha256_of(served / TINY_FILE)

    forced = _fetch("--from", str(served / "other_tiny.pt"), "--force")
    assert forced.exit_code == 0, forced.output
    assert "replaced" in forced.output
    assert sha256_of(target) == sha256_of(served / "other_tiny.pt")
    assert _left_in(default_checkpoint_dir()) == [TINY_FILE]


@pytest.mark.parametrize(("name", "size", "says"), [
    ("notes.pt", "tiny", "is not a PyTorch checkpoint"),
    ("hi.pt", "tiny", "is not a PyTorch checkpoint"),
    ("truncated.pt", "tiny", "cannot be read as a SAM 2 checkpoint"),
    (TINY_FILE, "small", "does not fit sam2.1-hiera-small"),
])
def test_from_a_wrong_file_installs_nothing(served: Path, tmp_path: Path, name: str, size: str, says: str) -> None:
    target = tmp_path / "configured"
    target.mkdir()
    result = _fetch("--from", str(served / name), "--size", size, "--to", str(target))
    assert result.exit_code == 1, result.output
    assert says in result.output and "Traceback" not in result.output
    assert _left_in(target) == []


def test_configured_folder_is_the_default_target(served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv(CHECKPOINT_ENV, str(folder))
    result = _fetch("--from", str(served / TINY_FILE))
    assert result.exit_code == 0, result.output
    assert _left_in(folder) == [TINY_FILE] and not default_checkpoint_dir().exists()
    assert sam2_status(str(folder), "tiny")["ready"] is True
