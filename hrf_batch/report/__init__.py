"""Per-patient PDF reports and cohort CSV exports from the study database (never imports torch).

Typical use::

    with open_store(url) as store:
        render_patient_report(store, "P012", Path("reports"))   # reports/P012_hrf_report.pdf
        export_cohort(store, Path("exports"))                   # hrf_patients.csv … hrf_lesions.csv

The HTML template and stylesheet live in ``hrf_batch/report/templates`` so an installed wheel finds them.
"""

from hrf_batch.report.errors import ReportError, UnknownPatientError
from hrf_batch.report.export import EXPORT_FILES, export_cohort
from hrf_batch.report.pdf import NOTICE, find_patient, render_patient_report

__all__ = [
    "EXPORT_FILES",
    "NOTICE",
    "ReportError",
    "UnknownPatientError",
    "export_cohort",
    "find_patient",
    "render_patient_report",
]
