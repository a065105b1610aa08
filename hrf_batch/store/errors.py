"""Errors of the storage layer; the CLI shows them like every other HrfBatchError."""

from __future__ import annotations

from hrf_batch.errors import HrfBatchError


class StoreError(HrfBatchError):
    """The study database could not be opened, read or written."""


class SchemaOutdatedError(StoreError):
    """The database was made by an older hrf-batch and needs `hrf-batch db upgrade` first."""

    def __init__(self, problem: str, hint: str, *, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(problem, hint)
