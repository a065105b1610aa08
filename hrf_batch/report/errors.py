"""Errors of the report package; the CLI shows them like every other HrfBatchError."""

from __future__ import annotations

import difflib

from hrf_batch.errors import HrfBatchError


class ReportError(HrfBatchError):
    """A report or export could not be written."""


class UnknownPatientError(ReportError):
    """The requested patient is not in the study database."""

    def __init__(self, patient_id: str, known: list[str], url: str) -> None:
        self.patient_id = patient_id
        self.known = known
        close = _close_matches(patient_id, known)
        listed = close or known[:5]
        shown = ", ".join(repr(k) if not k.strip() else k for k in listed)
        shown += f" … ({len(known)} in all)" if len(known) > len(listed) else ""
        problem = f"no patient {patient_id!r} in {url}; " + (
            (f"close matches: {shown}" if close else f"it holds {shown}") if known else "it holds no patients yet"
        )
        hint = (
            "pass one of these ids (they are case-sensitive), or point hrf-batch at the database that holds the patient"
            if known
            else "analyse the patient's study first, or point hrf-batch at the database that holds it"
        )
        super().__init__(problem, hint)


def _close_matches(patient_id: str, known: list[str]) -> list[str]:
    """Stored ids that look like ``patient_id`` (ignoring case, the commonest slip), best first."""
    if not patient_id.strip():
        return []
    by_lower: dict[str, list[str]] = {}
    for k in known:
        by_lower.setdefault(k.lower(), []).append(k)
    hits = difflib.get_close_matches(patient_id.lower(), list(by_lower), n=5, cutoff=0.6)
    return [k for hit in hits for k in by_lower[hit]][:5]
