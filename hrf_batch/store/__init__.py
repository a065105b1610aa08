"""The study database: results in, plain dataclasses out (SQLite by default, PostgreSQL by URL).

Never imports torch. Typical use::

    store = open_store(None)                      # ./hrf_batch.sqlite, created at the newest schema
    if store.claim_volume(meta, run_info, n_bscans=n, bscan_shape=shape) is Claim.CLAIMED:
        try:                                      # no other process computes this volume meanwhile
            store.save_volume_result(compute(volume))  # one transaction per volume
        finally:
            store.release_volume(meta, run_info)
    summary = store.patient_summary("P012")
"""

from hrf_batch.store.api import Claim, Store, open_store
from hrf_batch.store.codec import params_hash
from hrf_batch.store.engine import DEFAULT_SQLITE_FILE, display_url, head_revision, resolve_url, upgrade
from hrf_batch.store.errors import SchemaOutdatedError, StoreError
from hrf_batch.store.records import (
    AddedLesion,
    BScanVerdict,
    EtdrsBurden,
    IngestErrorRecord,
    LayerBurden,
    LesionVerdict,
    PatientBurden,
    PatientRecord,
    PatientSummary,
    ReviewProgress,
    ReviewState,
    RunRecord,
    StoredAnatomy,
    StoredBScan,
    StoredFovea,
    StoredLesion,
    StoredVolume,
    VisitBurden,
    VolumeBurden,
)
from hrf_batch.store.schema import REVIEW_VERDICTS
from hrf_batch.store.write import utc_now

__all__ = [
    "AddedLesion",
    "BScanVerdict",
    "Claim",
    "DEFAULT_SQLITE_FILE",
    "REVIEW_VERDICTS",
    "EtdrsBurden",
    "IngestErrorRecord",
    "LayerBurden",
    "LesionVerdict",
    "PatientBurden",
    "PatientRecord",
    "PatientSummary",
    "ReviewProgress",
    "ReviewState",
    "RunRecord",
    "SchemaOutdatedError",
    "Store",
    "StoreError",
    "StoredAnatomy",
    "StoredBScan",
    "StoredFovea",
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
