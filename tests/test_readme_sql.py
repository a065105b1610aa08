"""The README's "SQL examples", run as written on both backends against results built to know the answers."""

from __future__ import annotations

import math
import re
from datetime import date

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from test_store_anatomy import AXIAL_MM, GRID_AREA, LATERAL_MM, make_anatomy, make_meta, make_result

from hrf_batch.results import SUBFIELDS
from hrf_batch.store import open_store

from conftest import PROJECT_ROOT

#: (patient, eye, visit) -> (lesions as (B-scan, zone, subfield, area px), whether a fovea was found,
#: mean thickness per subfield)
COHORT = {
    ("P001", "OD", date(2024, 1, 10)): (
        [(0, "outer-retina", "C0", 5), (0, "inner-retina", "C0", 3), (1, "outer-retina", "N1", 7),
         (2, "elm-bm", "T2", 4)],
        True, {"C0": 262.5, "N1": 318.0, "T1": 301.25},
    ),
    ("P001", "OD", date(2024, 4, 10)): ([(1, "outer-retina", "C0", 6)], True, {"C0": 270.0}),
    ("P001", "OD", date(2024, 7, 10)): ([(0, "outer-retina", "unknown", 9)], False, {}),  # no fovea: no ETDRS rows
    ("P001", "OS", date(2024, 1, 10)): ([(2, "below-bm", "I2", 2)], True, {"I2": 280.0}),
    ("P002", "OD", date(2024, 2, 1)): (
        [(0, "outer-retina", "S1", 8), (1, "outer-retina", "S1", 3)], True, {"S1": 333.0},
    ),
}


def sql_examples() -> list[str]:
    """The statements of the ```sql blocks under the README's "SQL examples" heading."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## SQL examples\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert match, "the README lost its SQL examples section"
    blocks = re.findall(r"```sql\n(.*?)```", match.group(1), flags=re.S)
    return [q.strip() for block in blocks for q in block.split(";") if q.strip()]


def run_queries(url: str) -> list[list[tuple]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [[tuple(row) for row in conn.execute(text(query))] for query in sql_examples()]
    finally:
        engine.dispose()


def fill(url: str) -> None:
    with open_store(url) as store:
        for k, ((patient, eye, visit), (lesions, fovea, thickness)) in enumerate(COHORT.items()):
            anatomy = make_anatomy(fovea=fovea, thickness=thickness, seed=k)
            meta = make_meta(patient, eye, visit, sha="abcdef"[k])
            store.save_volume_result(make_result(meta, lesions, anatomy=anatomy))


def index_in_bscan(found: list[tuple], k: int) -> int:
    """The lesion index make_result gives the k-th lesion: its rank among the lesions of its B-scan."""
    return sum(other[0] == found[k][0] for other in found[:k])


def mm2(px: int) -> float:
    return px * LATERAL_MM * AXIAL_MM


def test_readme_has_two_to_four_sql_examples() -> None:
    assert 2 <= len(sql_examples()) <= 4


def test_readme_sql_examples_give_the_designed_answers(store_url: str) -> None:
    fill(store_url)
    etdrs, outer, lesions, _review = run_queries(store_url)

    want_etdrs = []
    for (patient, eye, visit), (found, fovea, thickness) in sorted(COHORT.items(), key=lambda kv: kv[0][2]):
        if patient != "P001" or eye != "OD" or not fovea:
            continue
        for subfield in sorted(SUBFIELDS):
            n = sum(s == subfield for _b, _z, s, _a in found)
            want_etdrs.append((visit.isoformat(), subfield, n, n / GRID_AREA[subfield], thickness.get(subfield)))
    got = [(str(d), s, n, density, t) for d, s, n, density, t in etdrs]
    assert [row[:3] for row in got] == [row[:3] for row in want_etdrs]
    for g, w in zip(got, want_etdrs):
        assert g[3] == pytest.approx(w[3], abs=1e-9)
        assert g[4] == (None if w[4] is None else pytest.approx(w[4]))
    assert [row[2] for row in got if row[1] == "C0"] == [2, 1]  # two central HRF at the first visit, one later

    want_outer = sorted(
        (patient, eye, visit.isoformat(), sum(z == "outer-retina" for _b, z, _s, _a in found),
         mm2(sum(a for _b, z, _s, a in found if z == "outer-retina")))
        for (patient, eye, visit), (found, _f, _t) in COHORT.items()
    )
    got_outer = [(p, e, str(d), n, area) for p, e, d, n, area in outer]
    assert [row[:4] for row in got_outer] == [row[:4] for row in want_outer]
    assert all(math.isclose(g[4], w[4], abs_tol=1e-9) for g, w in zip(got_outer, want_outer))
    assert [row[3] for row in got_outer if row[0] == "P001" and row[1] == "OD"] == [2, 1, 1]

    want_lesions = [row[:3] + row[4:] for row in sorted(
        (visit.isoformat(), eye, b, index_in_bscan(found, k), z, s, mm2(a))
        for (patient, eye, visit), (found, _f, _t) in COHORT.items() if patient == "P001"
        for k, (b, z, s, a) in enumerate(found)
    )]
    got_lesions = [(str(d), e, b, z, s, area) for d, e, b, z, s, area in lesions]
    assert [row[:5] for row in got_lesions] == [row[:5] for row in want_lesions]
    assert [row[5] for row in got_lesions] == pytest.approx([row[5] for row in want_lesions])


def test_readme_review_example_gives_the_tool_against_each_grader(store_url: str) -> None:
    """P002's volume has one lesion on B-scans 0 and 1: AB accepts the first, rejects the second and says
    "yes" with an added HRF on B-scan 2; CD only answers "no" on B-scan 2."""
    fill(store_url)
    with open_store(store_url) as store:
        (volume,) = store.volume_results("P002", masks=False)
        run = volume.run.run_id
        store.save_lesion_verdict(run, 0, 0, "AB", "accept")
        store.save_lesion_verdict(run, 1, 0, "AB", "reject")
        added = np.zeros(volume.bscan_shape, dtype=bool)
        added[4:6, 3:5] = True
        store.save_added_lesion(run, 2, "AB", (4, 3), added, "region-growing")
        store.save_bscan_verdict(run, 2, "AB", True)
        store.save_bscan_verdict(run, 2, "CD", False)
    review = [(p, str(d), *rest) for p, d, *rest in run_queries(store_url)[3]]
    # AB: tool+/grader+ on B0, tool+/grader- on B1, tool-/grader+ on B2; counts 1/1, 1/0, 0/1
    assert review == [("P002", "2024-02-01", "OD", "AB", 3, 0.5, 0.0, 0.5, 0.5, pytest.approx(2 / 3)),
                      ("P002", "2024-02-01", "OD", "CD", 1, None, 1.0, None, None, 0.0)]
