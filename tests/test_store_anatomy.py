"""Anatomy in the study database: migration 0003, the ETDRS and layer-zone burden views on both backends,
round trips of layer lines, fovea and thickness, the upgrade of a 0002 database and the cohort CSVs."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from hrf_batch.anatomy.etdrs import subfield_areas_mm2
from hrf_batch.io.volume import LayerLines
from hrf_batch.report import export_cohort
from hrf_batch.results import (
    SUBFIELDS,
    ZONE_UNKNOWN,
    ZONES,
    BScanResult,
    Fovea,
    Lesion,
    RunInfo,
    VolumeAnatomy,
    VolumeResult,
)
from hrf_batch.store import SchemaOutdatedError, StoreError, head_revision, open_store, upgrade
from hrf_batch.store.codec import decode_layers, encode_layers
from hrf_batch.store.schema import VERSION_TABLE, Base

from conftest import make_test_volume
from conftest_store import row_counts

ASSETS = Path(__file__).with_name("assets")
SHAPE = (40, 64)
LATERAL_MM, AXIAL_MM = 0.01182, 0.00387  # make_test_volume's spacing
GRID_AREA = subfield_areas_mm2()  # the grid the pipeline places lesions on (values checked in test_fovea_etdrs)
TABLES = ("patients", "visits", "volumes", "runs", "bscans", "lesions")


def make_meta(patient: str, eye: str, visit: date | None, sha: str):
    meta = make_test_volume(n=3, height=SHAPE[0], width=SHAPE[1], eye=eye).meta
    return dataclasses.replace(meta, patient_id=patient, visit_date=visit, source_sha256=sha * 64,
                               source_path=f"/study/{sha}.vol")


def make_run(model: str = "cct-1a2b") -> RunInfo:
    return RunInfo(model_id=model, segmenter="region-growing", segmenter_checkpoint_sha256=None,
                   parameters={"threshold": 0.05}, code_version="0.2.0", device="cpu")


def make_anatomy(fovea: bool = True, thickness: dict[str, float] | None = None, seed: int = 0) -> VolumeAnatomy:
    """Layer lines with a few unknown A-scans, a fovea (or a note why none), a thickness map."""
    rng = np.random.default_rng(seed)
    ilm = (5 + rng.random((3, SHAPE[1])) * 3).astype(np.float32)
    rows = {"ILM": ilm, "OPL": ilm + 12.37, "BM": ilm + 25.0}
    rows["OPL"][1, 10:20] = np.nan
    thickness_um = ((rows["BM"] - rows["ILM"]) * AXIAL_MM * 1000).astype(np.float32)
    thickness_um[0, :8] = np.nan
    return VolumeAnatomy(
        layers=LayerLines(rows, "estimated"),
        fovea=Fovea(1.25, 31.5, 0.58, 0.42, "thickness-map") if fovea else None,
        fovea_note="deepest point of the thickness map" if fovea else "line scan: no fovea",
        thickness_um=thickness_um,
        etdrs_thickness_um=dict(thickness or {}),
    )


def make_result(meta, lesions, *, anatomy: VolumeAnatomy | None = None, run: RunInfo | None = None) -> VolumeResult:
    """``lesions``: (B-scan index, zone, subfield, area px), each a one-row box at its own row."""
    per_bscan: dict[int, list[Lesion]] = defaultdict(list)
    masks = {i: np.zeros(SHAPE, dtype=bool) for i in range(3)}
    for index, zone, subfield, area in lesions:
        row = 2 * len(per_bscan[index])
        masks[index][row, :area] = True
        per_bscan[index].append(Lesion(index, (float(row), (area - 1) / 2), (row, 0, row + 1, area), area,
                                       np.ones((1, area), dtype=bool), zone=zone, subfield=subfield))
    bscans = tuple(
        BScanResult(index=i, scores=(0.9,) * (1 + len(per_bscan[i])), relevance_peaks=((3, 3),) * len(per_bscan[i]),
                    mask=masks[i], lesions=tuple(per_bscan[i]))
        for i in range(3)
    )
    return VolumeResult(meta=meta, bscan_shape=SHAPE, bscans=bscans, run=run or make_run(), anatomy=anatomy)


#: The designed study: (patient, eye, visit, sha) -> (lesions, anatomy)
STUDY = {
    # two volumes with a fovea at one visit: counts add up, densities and thicknesses are per volume
    ("P1", "OD", date(2024, 1, 10), "b"): (
        [(0, "inner-retina", "C0", 4), (0, "outer-retina", "C0", 6), (1, "outer-retina", "N1", 9),
         (2, "elm-bm", "S2", 3), (2, "unknown", "outside", 5)],
        make_anatomy(thickness={"C0": 251.5, "N1": 320.25, "S1": 330.0}, seed=1),
    ),
    ("P1", "OD", date(2024, 1, 10), "c"): (
        [(1, "outer-retina", "C0", 7), (1, "above-ilm", "T2", 2)],
        make_anatomy(thickness={"C0": 260.0, "N1": 310.0}, seed=2),
    ),
    # no fovea: in the layer view, not in the ETDRS view
    ("P1", "OD", date(2024, 6, 1), "d"): ([(0, "outer-retina", "unknown", 8)], make_anatomy(fovea=False, seed=3)),
    # stored without anatomy: every lesion in the 'unknown' zone
    ("P1", "OS", date(2024, 1, 10), "e"): ([(0, "unknown", "unknown", 4), (2, "unknown", "unknown", 6)], None),
    # an undated visit
    ("P2", "OS", None, "f"): ([(0, "below-bm", "I1", 11), (1, "inner-retina", "I1", 5)],
                              make_anatomy(thickness={"I1": 299.0}, seed=4)),
}


def save_study(url: str) -> None:
    with open_store(url) as store:
        for (patient, eye, visit, sha), (lesions, anatomy) in STUDY.items():
            store.save_volume_result(make_result(make_meta(patient, eye, visit, sha), lesions, anatomy=anatomy))
        # an older run of volume f, replaced by the one above as the latest done run
        first = make_result(make_meta("P2", "OS", None, "f"), [(0, "outer-retina", "C0", 3)],
                            anatomy=make_anatomy(thickness={"C0": 1.0}), run=make_run("cct-0000"))
        store.save_volume_result(first)
        store.save_volume_result(make_result(make_meta("P2", "OS", None, "f"), STUDY[("P2", "OS", None, "f")][0],
                                             anatomy=STUDY[("P2", "OS", None, "f")][1], run=make_run("cct-ffff")))


def expected_views() -> tuple[dict, dict]:
    """The ETDRS and layer rows the designed study must give, computed from its inputs."""
    etdrs: dict = {}
    layers: dict = {}
    groups: dict = defaultdict(list)
    for (patient, eye, visit, _sha), (lesions, anatomy) in STUDY.items():
        groups[(patient, visit, eye)].append((lesions, anatomy))
    for key, volumes in groups.items():
        for zone in (*ZONES, ZONE_UNKNOWN):
            found = [les for lesions, _a in volumes for les in lesions if les[1] == zone]
            layers[(*key, zone)] = (len(volumes), len(found), sum(a for *_z, a in found) * LATERAL_MM * AXIAL_MM)
        foveal = [(lesions, a) for lesions, a in volumes if a is not None and a.fovea is not None]
        if not foveal:
            continue
        for subfield in SUBFIELDS:
            found = [les for lesions, _a in foveal for les in lesions if les[2] == subfield]
            thickness = [a.etdrs_thickness_um[subfield] for _l, a in foveal if subfield in a.etdrs_thickness_um]
            etdrs[(*key, subfield)] = (
                len(foveal), len(found), sum(a for *_z, a in found) * LATERAL_MM * AXIAL_MM,
                len(found) / (len(foveal) * GRID_AREA[subfield]),
                sum(thickness) / len(thickness) if thickness else None,
            )
    return etdrs, layers


def test_migrated_schema_is_at_0003_and_matches_the_models(store_url: str) -> None:
    open_store(store_url).close()
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            assert context.get_current_revision() == head_revision() == "0005"
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_anatomy_and_lesion_places_round_trip(store_url: str) -> None:
    (patient, eye, visit, sha), (lesions, anatomy) = next(iter(STUDY.items()))
    result = make_result(make_meta(patient, eye, visit, sha), lesions, anatomy=anatomy)
    with open_store(store_url) as store:
        store.save_volume_result(result)
        store.save_volume_result(make_result(make_meta("P3", "OD", visit, "x"), [(0, "elm-bm", "C0", 2)]))
        (full,) = store.volume_results(patient)
        (light,) = store.volume_results(patient, masks=False)
        (old,) = store.volume_results("P3")
    got = full.anatomy
    assert (got.layer_source, got.layer_names) == ("estimated", ("ILM", "OPL", "BM"))
    for name, rows in anatomy.layers.rows.items():
        assert np.array_equal(np.isnan(got.layers[name]), np.isnan(rows)) and got.layers[name].dtype == np.float32
        assert np.nanmax(np.abs(got.layers[name] - rows)) <= 0.05 + 1e-6
    assert got.fovea is not None and dataclasses.astuple(got.fovea) == (1.25, 31.5, 0.58, 0.42, "thickness-map")
    assert got.fovea_note == anatomy.fovea_note
    assert got.mean_thickness_um == pytest.approx(float(np.nanmean(anatomy.thickness_um.astype(np.float64))))
    assert got.etdrs_thickness_um == {"C0": 251.5, "S1": 330.0, "N1": 320.25}
    assert list(got.etdrs_thickness_um) == ["C0", "S1", "N1"]  # grid order, not insertion or alphabet
    stored = [(les.zone, les.subfield, les.area_px) for b in full.bscans for les in b.lesions]
    assert stored == [(z, s, a) for _i, z, s, a in lesions]
    assert light.anatomy.layers is None and light.anatomy.layer_names == got.layer_names
    assert light.anatomy.fovea == got.fovea
    assert old.anatomy is None and old.bscans[0].lesions[0].zone == "elm-bm"


def test_device_lines_completed_by_the_estimate_say_which_were_estimated(store_url: str) -> None:
    anatomy = make_anatomy()
    device = LayerLines(anatomy.layers.rows, "device", estimated=("OPL",))
    result = make_result(make_meta("P9", "OS", date(2024, 2, 2), "d"), [(0, "inner-retina", "C0", 3)],
                         anatomy=dataclasses.replace(anatomy, layers=device))
    with open_store(store_url) as store:
        store.save_volume_result(result)
        (light,) = store.volume_results("P9", masks=False)
    assert (light.anatomy.layer_source, light.anatomy.estimated_layer_names) == ("device", ("OPL",))


def test_places_the_tables_would_refuse_are_refused_before_writing(store_url: str) -> None:
    meta = make_meta("P1", "OD", date(2024, 1, 10), "b")
    bad_width = dataclasses.replace(make_anatomy(), layers=LayerLines({"ILM": np.zeros((3, 10), np.float32)}, "device"))
    bad_subfield = dataclasses.replace(make_anatomy(), etdrs_thickness_um={"C9": 250.0})
    bad_fovea = dataclasses.replace(make_anatomy(), fovea=Fovea(1.0, math.nan, None, None, "thickness-map"))
    with open_store(store_url) as store:
        with pytest.raises(StoreError, match="zone 'retina'"):
            store.save_volume_result(make_result(meta, [(0, "retina", "C0", 2)]))
        with pytest.raises(StoreError, match="subfield 'X1'"):
            store.save_volume_result(make_result(meta, [(0, "elm-bm", "X1", 2)]))
        with pytest.raises(StoreError, match=r"layer ILM has shape \(3, 10\)"):
            store.save_volume_result(make_result(meta, [], anatomy=bad_width))
        with pytest.raises(StoreError, match="'C9'"):
            store.save_volume_result(make_result(meta, [], anatomy=bad_subfield))
        with pytest.raises(StoreError, match="not finite") as info:
            store.save_volume_result(make_result(meta, [], anatomy=bad_fovea))
        assert "report it" in info.value.hint
        assert store.list_patients() == []


def test_etdrs_and_layer_views_give_the_designed_rows_on_both_backends(tmp_path: Path, pg_cluster) -> None:
    urls = {"sqlite": f"sqlite:///{tmp_path / 'study.sqlite'}", "postgresql": pg_cluster.create_database()}
    rows = {}
    for backend, url in urls.items():
        save_study(url)
        with open_store(url) as store:
            rows[backend] = {view: store.view_rows(view) for view in ("hrf_burden_etdrs", "hrf_burden_layer")}
            summary = store.patient_summary("P1")
    assert rows["sqlite"] == rows["postgresql"]
    etdrs, layers = expected_views()
    got_etdrs = {(r.patient_id, r.visit_date, r.eye, r.subfield): r for r in rows["sqlite"]["hrf_burden_etdrs"]}
    assert set(got_etdrs) == set(etdrs)
    for key, (n_volumes, count, area, density, thickness) in etdrs.items():
        row = got_etdrs[key]
        assert (row.n_volumes, row.hrf_count) == (n_volumes, count), key
        assert row.hrf_area_mm2 == pytest.approx(area, abs=2e-9) and row.density_per_mm2 == pytest.approx(density)
        assert row.mean_thickness_um == (None if thickness is None else pytest.approx(thickness)), key
    got_layers = {(r.patient_id, r.visit_date, r.eye, r.zone): r for r in rows["sqlite"]["hrf_burden_layer"]}
    assert set(got_layers) == set(layers)
    for key, (n_volumes, count, area) in layers.items():
        row = got_layers[key]
        assert (row.n_volumes, row.hrf_count) == (n_volumes, count), key
        assert row.hrf_area_mm2 == pytest.approx(area, abs=2e-9), key
    # spot checks of the definitions: two volumes share the density, the older run of P2 is not counted
    c0 = got_etdrs[("P1", date(2024, 1, 10), "OD", "C0")]
    assert (c0.hrf_count, c0.n_volumes, c0.mean_thickness_um) == (3, 2, pytest.approx(255.75))
    assert c0.density_per_mm2 == pytest.approx(3 / (2 * math.pi * 0.25))
    assert got_etdrs[("P2", None, "OS", "C0")].hrf_count == 0
    assert got_etdrs[("P2", None, "OS", "I1")].density_per_mm2 == pytest.approx(2 / (math.pi * 2 / 4))
    assert [r.subfield for r in summary.etdrs] == list(SUBFIELDS)  # only the first visit has a fovea
    assert [r.zone for r in summary.layers] == [*ZONES, ZONE_UNKNOWN] * 3  # two OD visits, one OS


def _load_asset_script():
    spec = importlib.util.spec_from_file_location("make_store_0002", ASSETS / "make_store_0002.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_upgraded(url: str) -> None:
    with open_store(url) as store:
        (volume_a, volume_b) = store.volume_results("OLD02")
        layers = store.view_rows("hrf_burden_layer")
        assert store.view_rows("hrf_burden_etdrs") == []  # no run had a fovea
    lesions = [les for v in (volume_a, volume_b) for b in v.bscans for les in b.lesions]
    assert len(lesions) == 4 and {(les.zone, les.subfield) for les in lesions} == {("unknown", "unknown")}
    assert volume_a.anatomy is None and volume_b.anatomy is None and volume_b.run.code_version == "0.1.0"
    by_visit = {(r.visit_date, r.zone): (r.n_volumes, r.hrf_count) for r in layers}
    assert by_visit[(date(2021, 3, 4), "unknown")] == (1, 3) and by_visit[(date(2021, 9, 10), "unknown")] == (1, 1)
    assert by_visit[(date(2021, 3, 4), "outer-retina")] == (1, 0) and len(by_visit) == 12


def test_a_0002_sqlite_database_upgrades_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    shutil.copy(ASSETS / "store_0002.sqlite", path)
    url = f"sqlite:///{path}"
    before = row_counts(url, TABLES)
    assert before == {"patients": 1, "visits": 2, "volumes": 2, "runs": 3, "bscans": 4, "lesions": 4}
    with pytest.raises(SchemaOutdatedError) as info:
        open_store(url)
    assert (info.value.current, info.value.head) == ("0002", "0005")
    assert upgrade(url) == "0005"
    assert row_counts(url, TABLES) == before
    engine = create_engine(url)
    with engine.connect() as conn:
        places = conn.execute(text("SELECT DISTINCT zone, etdrs_subfield FROM lesions")).all()
    engine.dispose()
    assert [tuple(p) for p in places] == [("unknown", "unknown")]
    _check_upgraded(url)


def test_a_0002_postgresql_database_upgrades_keeping_every_row(pg_cluster) -> None:
    url = pg_cluster.create_database()
    assert upgrade(url, "0002") == "0002"
    engine = create_engine(url)
    with engine.begin() as conn:
        _load_asset_script().fill(conn)
    engine.dispose()
    before = row_counts(url, TABLES)
    assert upgrade(url) == "0005" and row_counts(url, TABLES) == before
    _check_upgraded(url)


def test_0003_downgrades_to_0002_keeping_the_lesions_and_upgrades_again(store_url: str) -> None:
    from alembic import command

    from hrf_batch.store.engine import _alembic_config, make_engine, resolve_url, writer

    (patient, eye, visit, sha), (lesions, anatomy) = next(iter(STUDY.items()))
    with open_store(store_url) as store:
        store.save_volume_result(make_result(make_meta(patient, eye, visit, sha), lesions, anatomy=anatomy))
    before = row_counts(store_url, TABLES)
    engine = make_engine(resolve_url(store_url))
    try:
        with writer(engine).begin() as conn:
            command.downgrade(_alembic_config(conn), "0002")
    finally:
        engine.dispose()
    assert row_counts(store_url, TABLES) == before
    assert upgrade(store_url) == "0005"
    with open_store(store_url) as store:
        (volume,) = store.volume_results(patient, masks=False)
    assert volume.anatomy is None and {les.zone for b in volume.bscans for les in b.lesions} == {"unknown"}


def test_the_check_constraints_hold_in_the_database(store_url: str) -> None:
    with open_store(store_url) as store:
        store.save_volume_result(make_result(make_meta("P1", "OD", None, "b"), [(0, "elm-bm", "C0", 2)]))
    engine = create_engine(store_url)
    try:
        for column, value in (("zone", "retina"), ("etdrs_subfield", "C9")):
            with pytest.raises(Exception, match="(?i)check"), engine.begin() as conn:
                conn.execute(text(f"UPDATE lesions SET {column} = :v"), {"v": value})
    finally:
        engine.dispose()


def test_layer_codec_is_within_a_twentieth_of_a_pixel() -> None:
    rng = np.random.default_rng(3)
    rows = (rng.random((4, 50)) * 495).astype(np.float32)
    rows[1, 3:9] = np.nan
    tall = (rng.random((2, 7)) * 4000).astype(np.float32)  # taller than int16 × 10 can hold
    back = decode_layers(encode_layers({"ILM": rows, "BM": tall, "RPE": np.full((4, 50), np.nan, np.float32)}))
    assert set(back) == {"ILM", "BM", "RPE"} and np.isnan(back["RPE"]).all()
    assert np.array_equal(np.isnan(back["ILM"]), np.isnan(rows))
    assert np.nanmax(np.abs(back["ILM"] - rows)) <= 0.05 + 1e-4 and np.abs(back["BM"] - tall).max() <= 0.05 + 1e-3
    with pytest.raises(StoreError, match="outside the B-scan"):
        encode_layers({"ILM": np.full((1, 3), -5000.0)})
    with pytest.raises(StoreError, match="npz"):
        decode_layers(b"not a zip")


def test_cohort_csvs_carry_the_anatomy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.sqlite'}"
    save_study(url)
    with open_store(url) as store:
        paths = export_cohort(store, tmp_path / "csv")
        views = {view: store.view_rows(view) for view in ("hrf_burden_etdrs", "hrf_burden_layer")}
        volumes = {v.volume_id: v for p in ("P1", "P2") for v in store.volume_results(p, masks=False)}
    names = [p.name for p in paths]
    assert {"hrf_etdrs.csv", "hrf_layers.csv"} <= set(names)
    csv = {p.stem: pd.read_csv(p, dtype={"visit_date": str}, keep_default_na=False, na_values=[""]) for p in paths}
    for stem, view, key in (("hrf_etdrs", "hrf_burden_etdrs", "subfield"), ("hrf_layers", "hrf_burden_layer", "zone")):
        frame = csv[stem]
        rows = views[view]
        assert len(frame) == len(rows)
        for column in frame.columns:
            expected = [getattr(r, column) for r in rows]
            expected = [v.isoformat() if isinstance(v, date) else v for v in expected]
            assert [None if pd.isna(x) else x for x in frame[column]] == expected, (stem, column)
        assert list(frame[key][:len(SUBFIELDS if key == "subfield" else ZONES)]) == \
            list(SUBFIELDS if key == "subfield" else ZONES)
    lesions = csv["hrf_lesions"]
    want = sorted((z, s) for lesions_, _a in STUDY.values() for _i, z, s, _p in lesions_)
    assert sorted(zip(lesions["zone"], lesions["etdrs_subfield"])) == want
    vols = csv["hrf_volumes"].set_index("volume_id")
    for volume_id, volume in volumes.items():
        row = vols.loc[volume_id]
        anatomy = volume.anatomy
        fovea = anatomy.fovea if anatomy else None
        assert (None if pd.isna(row["fovea_x_mm"]) else row["fovea_x_mm"]) == (fovea.x_mm if fovea else None)
        assert (None if pd.isna(row["fovea_method"]) else row["fovea_method"]) == (fovea.method if fovea else None)
        thickness = anatomy.mean_thickness_um if anatomy else None
        assert (None if pd.isna(row["mean_thickness_um"]) else row["mean_thickness_um"]) == thickness
