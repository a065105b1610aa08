"""Read a whole study folder: discovery plus reading, grouped by patient, visit and eye.

Paths in the listing are :func:`~hrf_batch.io.discover.display_text`, the form the database stores, so
`scan` and `ingest` name a file with a name that is not UTF-8 the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from hrf_batch.io.discover import FileIssue, discover, display_text, group_by_visit, read_sources
from hrf_batch.io.volume import Volume, volume_summary


def iter_study(study_dir: Path) -> Iterator[Volume | FileIssue]:
    """Every volume in the study, then nothing is lost: skipped and unreadable files as FileIssues."""
    disc = discover(study_dir)
    yield from disc.issues
    yield from read_sources(disc.sources)


def scan_study(study_dir: Path) -> dict[str, Any]:
    """A JSON-ready listing of a study: volumes grouped by visit, and every file left out with why."""
    summaries: dict[str, dict[str, Any]] = {}
    metas = []
    issues = []
    for item in iter_study(study_dir):
        if isinstance(item, FileIssue):
            issues.append({"path": display_text(item.path), "kind": item.kind, "reason": display_text(item.reason)})
            continue
        summary = volume_summary(item, show_identifiers=False)
        summary.pop("positions")
        summary["source_path"] = display_text(summary["source_path"])
        summaries[f"{item.meta.source_path}#{item.meta.series_uid}"] = summary
        metas.append(item.meta)
    visits = [
        {
            "patient_id": patient,
            "visit_date": visit.isoformat() if visit else None,
            "eye": eye,
            "volumes": [summaries[f"{m.source_path}#{m.series_uid}"] for m in group],
        }
        for (patient, visit, eye), group in group_by_visit(metas).items()
    ]
    return {
        "visits": visits,
        "issues": issues,
        "n_volumes": len(metas),
        "n_errors": sum(i["kind"] == "error" for i in issues),
        "n_skipped": sum(i["kind"] == "skipped" for i in issues),
    }
