"""Typed errors. Every message says what failed and what the user can do about it."""

from __future__ import annotations

from pathlib import Path


class HrfBatchError(Exception):
    """Base class: the CLI maps these to a one-line message and a non-zero exit code."""

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem} — {hint}" if hint else problem)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line and cut to ``limit`` characters, for messages
    that must stay one line (a third-party parser's text can span many)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ReadError(HrfBatchError):
    """A file could not be read as an OCT volume."""

    def __init__(self, path: Path | str, problem: str, hint: str = "") -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}", hint)

    @classmethod
    def unreadable(cls, path: Path | str, exc: OSError) -> ReadError:
        """The file could not be opened or read at all (missing, permissions, I/O error)."""
        return cls(path, f"cannot read file: {exc.strerror or one_line(exc)}", "check the path and permissions")


class NotOctError(ReadError):
    """The file is readable but holds no OCT image (e.g. a CT DICOM, a PDF, a stray TIFF)."""


class VolumeError(HrfBatchError):
    """A Volume was built with inconsistent data (a programming or file-content error)."""


class LabelError(HrfBatchError):
    """Labels are missing, malformed, or do not match the B-scans they name."""
