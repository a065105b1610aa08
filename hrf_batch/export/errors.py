"""Why a volume could not be exported; the CLI shows these as one line, the exports list them per volume."""

from __future__ import annotations

from hrf_batch.errors import HrfBatchError


class ExportError(HrfBatchError):
    """A volume cannot be written in the requested format; the message says why and what to do."""


class SourceUnavailable(ExportError):
    """The analysed source file is gone, unreadable or changed: its volume cannot be exported."""
