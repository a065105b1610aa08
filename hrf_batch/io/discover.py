"""Study discovery: walk a folder, find every OCT source, and never stop on a bad file.

Each file ends in exactly one place: a :class:`Source` to read, or a :class:`FileIssue` that says
why it was skipped (not OCT) or failed (looks like OCT but cannot be read). Single-frame DICOM
instances are grouped into one source per series; TIFFs named by a HEYEX XML export and DICOM
localizers are reported as skipped, since the OCT series that references them reads them.

The walk itself leaves a record too: a folder it cannot list, a broken symbolic link, a link back to
a folder already searched (each real folder is searched once, so a link loop ends) and a FIFO,
socket or device, which is never opened (reading a FIFO would wait forever).

File names need not be UTF-8. Paths keep their real bytes for reading; :func:`display_text` is the
form that goes into the database, the CSVs, the PDFs and the console.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Iterable, Iterator

from hrf_batch.errors import HrfBatchError, NotOctError, ReadError, one_line
from hrf_batch.io.readers import OCT_SUFFIXES, SUPPORTED, read_head, read_source, sniff
from hrf_batch.io.volume import Volume, VolumeMeta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One OCT file, or the files of one single-frame DICOM series."""

    format: str
    paths: tuple[Path, ...]

    @property
    def path(self) -> Path:
        return self.paths[0]


@dataclass(frozen=True)
class FileIssue:
    """A file that gave no volume: ``kind`` is 'skipped' (not OCT) or 'error' (unreadable OCT)."""

    path: Path
    reason: str
    kind: str


@dataclass
class Discovery:
    sources: list[Source] = field(default_factory=list)
    issues: list[FileIssue] = field(default_factory=list)


def display_text(text: str | bytes | os.PathLike[str]) -> str:
    """Text that every database, CSV and console takes: a byte of a file name that is not UTF-8
    (a lone surrogate from ``os.fsdecode``) becomes ``\\xNN``, a NUL becomes ``\\x00``.

    Valid text comes back unchanged, so applying it twice changes nothing; :func:`path_from_display`
    finds the real path again.
    """
    value = os.fspath(text)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    try:
        shown = value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produced: show its code point instead
        shown = value.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return shown.replace("\0", "\\x00")


_BYTE_ESCAPE = re.compile(r"\\x([89a-f][0-9a-f])")


def path_from_display(shown: str) -> Path:
    """The real path behind a stored :func:`display_text` path: the path itself when it exists, else the
    one with each ``\\xNN`` (NN ≥ 80, what ``display_text`` writes for a non-UTF-8 byte) turned back
    into its byte. Callers check the file's sha256 before they trust what they find."""
    path = Path(shown)
    if path.exists() or not _BYTE_ESCAPE.search(shown):
        return path
    raw = _BYTE_ESCAPE.sub(lambda m: os.fsdecode(bytes([int(m.group(1), 16)])), shown)
    return Path(raw)


def _os_reason(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"))


def _special_kind(mode: int) -> str:
    return next((what for test, what in _SPECIAL if test(mode)), "not a regular file")


def _walk(root: Path, disc: Discovery) -> list[Path]:
    """The regular files under ``root`` (hidden names left out), sorted; a record for everything else.

    Every real folder is searched once (by device and inode), so a symbolic link to an ancestor ends
    the loop instead of the walk, and two links to one folder do not read its files twice. Nothing
    that is not a regular file is opened.
    """
    files: list[Path] = []
    root_stat = root.stat()
    seen = {(root_stat.st_dev, root_stat.st_ino)}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            if folder == root:
                raise HrfBatchError(f"study folder {display_text(root)} cannot be read ({_os_reason(exc)})",
                                    "check that you may read the folder") from exc
            disc.issues.append(FileIssue(
                folder, f"{folder}: folder cannot be read ({_os_reason(exc)}); the files in it are left out — "
                "check that you may read it", "error"))
            continue
        folders = []
        for entry in entries:
            path = Path(entry.path)
            kind = _entry_kind(entry, path, disc)
            if kind == "file":
                files.append(path)
            elif kind is not None:  # a folder: (device, inode) of what it really is
                if kind in seen:
                    disc.issues.append(FileIssue(
                        path, f"{path}: link to a folder that is already searched (a link loop, or a second link to "
                        "it); its files are read once", "skipped"))
                    continue
                seen.add(kind)
                folders.append(path)
        pending.extend(reversed(folders))  # depth first, in name order
    return sorted(files)


def _entry_kind(entry: os.DirEntry[str], path: Path, disc: Discovery) -> str | tuple[int, int] | None:
    """'file', a folder's (device, inode), or None after recording why the entry gives nothing."""
    is_link = False
    try:
        is_link = entry.is_symlink()
        info = entry.stat(follow_symlinks=True)
    except OSError as exc:
        if is_link and exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            target = _link_target(path)
            why = "is part of a loop of links" if exc.errno == errno.ELOOP else "points to nothing"
            disc.issues.append(FileIssue(
                path, f"{path}: symbolic link to {target} {why}; whatever it should reach is left out — fix or remove "
                "the link", "error"))
        else:
            disc.issues.append(FileIssue(path, f"{path}: cannot be examined ({_os_reason(exc)})", "error"))
        return None
    if stat.S_ISDIR(info.st_mode):
        return (info.st_dev, info.st_ino)
    if stat.S_ISREG(info.st_mode):
        return "file"
    what = _special_kind(info.st_mode)
    via = " (through a symbolic link)" if is_link else ""
    disc.issues.append(FileIssue(path, f"{path}: {what}{via}, not a file; never opened", "skipped"))
    return None


def _link_target(path: Path) -> str:
    try:
        return display_text(os.readlink(path))
    except OSError as exc:
        return f"an unreadable target ({_os_reason(exc)})"


def _classify(path: Path, disc: Discovery, dicoms: list[Path], xmls: list[Path], others: list[Path]) -> None:
    try:
        head = read_head(path)
    except ReadError as exc:
        disc.issues.append(FileIssue(path, str(exc), "error"))
        return
    suffix = path.suffix.lower()
    if not head:
        kind = "error" if suffix in OCT_SUFFIXES else "skipped"
        disc.issues.append(FileIssue(path, f"{path}: file is empty (0 bytes)", kind))
        return
    fmt = sniff(head)
    if fmt == "dicom":
        dicoms.append(path)
    elif fmt == "heyex-xml":
        xmls.append(path)
    elif fmt is not None:
        disc.sources.append(Source(fmt, (path,)))
    elif suffix in OCT_SUFFIXES - {""}:
        disc.issues.append(FileIssue(path, f"{path}: named like an OCT file ({suffix}) but its content is no known OCT format — supported: {SUPPORTED}", "error"))
    else:
        others.append(path)


def _group_dicoms(dicoms: list[Path], disc: Discovery) -> set[Path]:
    """One source per multi-frame file and per folder of single-frame instances of one series."""
    from hrf_batch.io.readers.dicom_oct import peek_dicom

    series: dict[str, list[Path]] = defaultdict(list)
    localizers: set[Path] = set()
    for path in dicoms:
        try:
            peek = peek_dicom(path)
        except ReadError as exc:
            disc.issues.append(FileIssue(path, str(exc), "error"))
            continue
        if peek is None:
            disc.issues.append(FileIssue(path, f"{path}: DICOM header could not be parsed", "error"))
        elif peek.is_oct and peek.n_frames == 1:
            series[f"{path.parent}|{peek.series_uid}"].append(path)
        elif peek.is_oct:
            disc.sources.append(Source("dicom-oct", (path,)))
        elif peek.is_localizer:
            localizers.add(path)
        else:
            disc.issues.append(FileIssue(path, f"{path}: DICOM is not OCT (SOP class {peek.sop_class_uid})", "skipped"))
    disc.sources.extend(Source("dicom-oct", tuple(sorted(paths))) for paths in series.values())
    return localizers


def _claim_xml(xmls: list[Path], disc: Discovery) -> set[Path]:
    from hrf_batch.io.readers.heyex_xml import referenced_files

    claimed: set[Path] = set()
    for path in xmls:
        try:
            claimed.update(referenced_files(path))
        except ReadError as exc:
            disc.issues.append(FileIssue(path, str(exc), "error"))
            continue
        disc.sources.append(Source("heyex-xml", (path,)))
    return claimed


def discover(study_dir: Path) -> Discovery:
    """Find every OCT source under ``study_dir`` (recursively, hidden folders excluded)."""
    root = Path(study_dir)
    if not root.is_dir():
        raise HrfBatchError(f"study folder {root} does not exist or is not a folder", "pass the folder that holds the OCT exports")
    disc = Discovery()
    dicoms: list[Path] = []
    xmls: list[Path] = []
    others: list[Path] = []
    for path in _walk(root, disc):
        _classify(path, disc, dicoms, xmls, others)
    localizers = _group_dicoms(dicoms, disc)
    claimed = _claim_xml(xmls, disc)
    for path in others:
        if path not in claimed:
            disc.issues.append(FileIssue(path, f"{path}: not an OCT file", "skipped"))
    for path in sorted(localizers):
        disc.issues.append(FileIssue(path, f"{path}: DICOM localizer image, read with the OCT series that references it", "skipped"))
    disc.sources.sort(key=lambda s: str(s.path))
    return disc


def read_sources(sources: Iterable[Source]) -> Iterator[Volume | FileIssue]:
    """Read sources one by one; a file that fails becomes a FileIssue and the walk goes on."""
    for source in sources:
        try:
            yield from read_source(source.format, source.paths)
        except NotOctError as exc:
            yield FileIssue(source.path, str(exc), "skipped")
        except HrfBatchError as exc:
            yield FileIssue(source.path, str(exc), "error")
        except MemoryError:  # readers check sizes first; this is a file that is legitimately too big here
            log.exception("out of memory reading %s", source.path)
            reason = "reading it needs more memory than is free"
            hint = "read it on a machine with more memory, or remove it from the study folder"
            yield FileIssue(source.path, f"{source.path}: {reason} — {hint}", "error")
        except Exception as exc:  # a reader bug on one file must not stop a study; it is recorded, not hidden
            log.exception("unexpected failure reading %s", source.path)
            reason = f"the {source.format} reader failed on this file ({one_line(exc, 160)})"
            hint = "the file may be damaged; the log has the details — please report it if the device software opens the file"
            yield FileIssue(source.path, f"{source.path}: {reason} — {hint}", "error")


VisitKey = tuple[str, date | None, str]


def group_by_visit(metas: Iterable[VolumeMeta]) -> dict[VisitKey, list[VolumeMeta]]:
    """Group volumes by (patient id, visit date, eye), in sorted order."""
    groups: dict[VisitKey, list[VolumeMeta]] = defaultdict(list)
    for meta in metas:
        groups[(meta.patient_id, meta.visit_date, meta.eye)].append(meta)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or date.min, kv[0][2])))
