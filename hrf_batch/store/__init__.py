"""The study database: results in, plain dataclasses out (SQLite by default, PostgreSQL by URL).

Never imports torch. Typical use::

    store = open_store(None)                      # ./hrf_batch.sqlite, created at the newest schema
    if store.find_done_run_for(meta, run_info) is None:
        store.save_volume_result(result)          # one transaction per volume
    summary = store.patient_summary("P012")
"""

from hrf_batch.store.api import Store, open_store
from hrf_batch.store.codec import params_hash
from hrf_batch.store.engine import DEFAULT_SQLITE_FILE, display_url, head_revision, resolve_url, upgrade
from hrf_batch.store.errors import SchemaOutdatedError, StoreError
from hrf_batch.store.records import (
    IngestErrorRecord,
    PatientBurden,
    PatientRecord,
    PatientSummary,
    RunRecord,
    StoredBScan,
    StoredLesion,
    StoredVolume,
    VisitBurden,
    VolumeBurden,
)
from hrf_batch.store.write import utc_now

__all__ = [
    "DEFAULT_SQLITE_FILE",
    "IngestErrorRecord",
    "PatientBurden",
    "PatientRecord",
    "PatientSummary",
    "RunRecord",
    "SchemaOutdatedError",
    "Store",
    "StoreError",
    "StoredBScan",
    "StoredLesion",
    "StoredVolume",
    "VisitBurden",
    "VolumeBurden",
    "display_url",
    "utc_now",
    "head_revision",
    "open_store",
    "params_hash",
    "resolve_url",
    "upgrade",
]
