"""Download or copy an official SAM 2.1 checkpoint into the folder hrf-batch looks in.

The weights cannot ship with hrf-batch, so ``hrf-batch models fetch sam2`` gets them: from the
official address, or (``--from FILE``) from a copy fetched on another machine when this one is
offline. Either way the file is loaded as the asked size (so a truncated download, a stray file or
a file of another size is never installed), written to a temporary name inside the target folder and
only then renamed to its official name; a rename inside one folder is atomic, so the folder never
holds a half-written checkpoint under that name, and a failed attempt leaves nothing behind.

Target folder: the folder given, else the configured ``sam2_checkpoint`` when that is a folder,
else :func:`~hrf_batch.segment.weights.default_checkpoint_dir`. No torch at import time: the model
is built only to check a file.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hrf_batch.errors import HrfBatchError, one_line
from hrf_batch.io.hashing import sha256_file
from hrf_batch.segment.weights import SegmenterSetupError, default_checkpoint_dir, require_checkpoint, sam2_spec

DOWNLOAD_TIMEOUT_S = 30.0  # per connect / read; an official file takes minutes, but never a silent minute
_CHUNK = 1 << 20


class DownloadError(HrfBatchError):
    """A checkpoint could not be downloaded: no network, refused, HTTP error, cut short."""


@dataclass(frozen=True)
class Installed:
    """What an install did: ``action`` is "installed", "replaced", "unchanged" or "present"
    (already there, nothing downloaded)."""

    path: Path
    sha256: str
    action: str


def target_dir(checkpoint_setting: str | os.PathLike[str] | None = None) -> Path:
    """Where a fetched checkpoint goes: the configured ``sam2_checkpoint`` when it is a folder (so
    ``hrf-batch models`` finds it there), else the default folder."""
    if checkpoint_setting is not None and str(checkpoint_setting) != "":
        configured = Path(checkpoint_setting).expanduser()
        if configured.is_dir():
            return configured
    return default_checkpoint_dir()


def fetch_command(size: str, target: Path) -> str:
    """The command that installs a copy fetched elsewhere (quoted in messages)."""
    to = "" if target == default_checkpoint_dir() else f" --to {target}"
    return f"hrf-batch models fetch sam2 --size {sam2_spec(size).size} --from FILE{to}"


def offline_hint(size: str, folder: Path) -> str:
    """How to install the checkpoint when this machine cannot download it (several lines)."""
    spec = sam2_spec(size)
    return (f"To install it without a connection here:\n"
            f"  1. on a machine with internet access, download\n"
            f"       {spec.url}\n"
            f"  2. copy the file to this machine and run\n"
            f"       {fetch_command(spec.size, folder)}\n"
            f"     with FILE the copied file; it is checked, then installed as {folder / spec.filename}")


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Write the body at ``url`` to ``dest`` (overwritten), with a byte progress bar.

    Raises DownloadError with the reason in one line (no hint: the caller knows what to suggest);
    a body shorter than its Content-Length counts as a failure, not as a file.
    """
    parts = urllib.parse.urlsplit(url)
    host, name = parts.netloc or url, parts.path.rsplit("/", 1)[-1] or url  # the bar names the file, not the temp
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            got = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                      disable=not progress, leave=False) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    got += len(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{host} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot reach {host} ({one_line(exc.reason) if exc.reason else one_line(exc)})") from exc
    except TimeoutError as exc:
        raise DownloadError(f"no answer from {host} within {timeout:g} s") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"the transfer from {host} broke off ({one_line(exc)})") from exc
    if total is not None and got != total:
        raise DownloadError(f"the transfer from {host} stopped after {got} of {total} bytes")


def check_loads(path: Path, size: str) -> None:
    """Build SAM 2.1 of ``size`` and load ``path`` into it strictly: the only reliable proof that a
    file is a complete checkpoint of that size. Raises the loader's SegmenterSetupError."""
    from hrf_batch.segment.sam import load_sam2  # torch and sam2 load only here

    require_checkpoint(path, size)  # not a zip archive: refused here, before torch's unpickler sees it
    load_sam2(path, size, "cpu")


@contextmanager
def _temp_file(folder: Path, filename: str) -> Iterator[Path]:
    """A new empty hidden file in ``folder`` (so the final rename never crosses file systems).

    On the way out the file is removed unless it was renamed into place, and so are the folders
    created for it when they are still empty: a failed attempt leaves nothing behind.
    """
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".part")
    except OSError as exc:
        raise SegmenterSetupError(f"cannot write a checkpoint into {folder} ({exc.strerror or one_line(exc)})",
                                  "pass --to DIR with a folder you can write to, and point the "
                                  "sam2_checkpoint setting at it") from exc
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)  # gone already when it was renamed into place
        for made in created:  # deepest first; stops at the first one that is not empty
            try:
                made.rmdir()
            except OSError:
                break


def _action(target: Path, digest: str, *, force: bool) -> str:
    """What installing a file of sha256 ``digest`` at ``target`` means: "installed" (nothing there),
    "unchanged" (the same file is there) or "replaced" (a different one, only with ``force``)."""
    if not target.exists():
        return "installed"
    if target.is_file() and sha256_file(target) == digest:
        return "unchanged"
    if not force:
        raise SegmenterSetupError(f"{target} already holds a different file",
                                  "pass --force to replace it with the new one")
    return "replaced"


def _rename(temp: Path, target: Path) -> None:
    """Put a checked temporary file in place under its official name, in one atomic step."""
    try:
        temp.chmod(0o644)  # mkstemp makes it private; a checkpoint is not a secret
        os.replace(temp, target)
    except OSError as exc:
        raise SegmenterSetupError(f"cannot put the checkpoint at {target} ({exc.strerror or one_line(exc)})",
                                  "remove what is there, or pass --to DIR with another folder") from exc


def install(src: Path, size: str, folder: Path, *, force: bool = False) -> Installed:
    """Install a checkpoint fetched elsewhere as the official file of ``size`` in ``folder``.

    ``src`` is checked first (so a refusal names the user's file), then copied to a temporary file
    in ``folder``; the copy must have the checked file's sha256 before it is renamed into place.
    """
    spec = sam2_spec(size)
    target = folder / spec.filename
    check_loads(src, spec.size)
    digest = sha256_file(src)
    action = _action(target, digest, force=force)
    if action == "unchanged":
        return Installed(target, digest, action)
    with _temp_file(folder, spec.filename) as temp:
        try:
            shutil.copyfile(src, temp)
        except OSError as exc:
            raise SegmenterSetupError(f"cannot copy {src} to {folder} ({exc.strerror or one_line(exc)})",
                                      "check the permissions and the free space, or pass --to DIR") from exc
        if sha256_file(temp) != digest:
            raise SegmenterSetupError(f"{src} changed while it was copied", "run the command again")
        _rename(temp, target)
    return Installed(target, digest, action)


def fetch(size: str, folder: Path, *, force: bool = False, progress: bool = True,
          timeout: float = DOWNLOAD_TIMEOUT_S) -> Installed:
    """Download the official checkpoint of ``size`` to a temporary file in ``folder``, check that it
    loads and rename it into place. An existing file is kept (action "present") unless ``force``:
    nothing is downloaded twice.

    On a network failure the DownloadError's hint gives the address to fetch on another machine and
    the ``--from`` command that installs that copy here.
    """
    spec = sam2_spec(size)
    target = folder / spec.filename
    if target.is_file() and not force:
        return Installed(target, sha256_file(target), "present")
    with _temp_file(folder, spec.filename) as temp:
        try:
            download(spec.url, temp, progress=progress, timeout=timeout)
        except DownloadError as exc:
            raise DownloadError(f"could not download {spec.filename}: {exc.problem}",
                                offline_hint(spec.size, folder)) from exc
        try:
            check_loads(temp, spec.size)
        except SegmenterSetupError as exc:  # name the address, not the temporary file that is about to go
            raise SegmenterSetupError(
                f"the file downloaded from {spec.url} was refused: {exc.problem.replace(str(temp), 'it')}",
                "nothing was installed; try again later\n" + offline_hint(spec.size, folder)) from exc
        digest = sha256_file(temp)
        action = _action(target, digest, force=force)
        if action != "unchanged":
            _rename(temp, target)
    return Installed(target, digest, action)
