"""Errors of the report package; the CLI shows them like every other HrfBatchError."""

from __future__ import annotations

from hrf_batch.errors import HrfBatchError


class ReportError(HrfBatchError):
    """A report or export could not be written."""


class UnknownPatientError(ReportError):
    """The requested patient is not in the study database."""

    def __init__(self, patient_id: str, known: list[str], url: str) -> None:
        self.patient_id = patient_id
        self.known = known
        shown = ", ".join(known[:5]) + (f" … ({len(known)} in all)" if len(known) > 5 else "")
        problem = f"no patient {patient_id!r} in {url}; " + (
            f"it holds {shown}" if known else "it holds no patients yet"
        )
        hint = (
            "pass one of these ids (they are case-sensitive), or point hrf-batch at the database that holds the patient"
            if known
            else "analyse the patient's study first, or point hrf-batch at the database that holds it"
        )
        super().__init__(problem, hint)
