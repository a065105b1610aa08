"""The graders' verdicts as figures: the review views (migration 0005) on both backends, the tool against
each grader and graders against each other (`evaluate --reviewed`), and the check that a grader played
from the ground truth gives `evaluate --segmentation`'s figures on the same B-scans."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import inspect
from test_store_review import blob, make_result

from hrf_batch.cli import main
from hrf_batch.io.ground_truth import load_ground_truth
from hrf_batch.review.agreement import cohen_kappa, count_agreement, grader_vs_grader, reviewed_figures, tool_vs_grader
from hrf_batch.store import open_store, upgrade
from hrf_batch.store.engine import _alembic_config, make_engine, resolve_url, writer
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

from conftest import PROJECT_ROOT
from conftest_store import row_counts

LESIONS = (2, 0, 1, 3, 0)  # model lesions on B-scans 0..4


def load_grader_script():
    spec = importlib.util.spec_from_file_location("grade_from_truth", PROJECT_ROOT / "scripts" / "grade_from_truth.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grade_from_truth"] = module
    spec.loader.exec_module(module)
    return module


def review_two_graders(store) -> int:
    """AB finishes every B-scan, CD all but B-scan 0; the comments give what each B-scan means."""
    run = store.save_volume_result(make_result(LESIONS)).run_id
    store.save_lesion_verdict(run, 0, 0, "AB", "accept")  # B0: 1 of 2 accepted -> count 1
    store.save_lesion_verdict(run, 0, 1, "AB", "reject")
    store.save_bscan_verdict(run, 1, "AB", False)  # B1: no -> count 0
    store.save_lesion_verdict(run, 2, 0, "AB", "accept")  # B2: accepted + 1 added -> count 2
    store.save_added_lesion(run, 2, "AB", (21, 31), blob(20, 30), "region-growing")
    store.save_lesion_verdict(run, 3, 0, "AB", "accept")  # B3: "no" wins over the accept -> count 0
    store.save_bscan_verdict(run, 3, "AB", False)
    store.save_bscan_verdict(run, 4, "AB", True)  # B4: yes with nothing marked -> count unknown
    store.save_lesion_verdict(run, 0, 0, "CD", "accept")  # B0: one lesion undecided, no yes/no -> unfinished
    store.save_bscan_verdict(run, 1, "CD", False)
    store.save_lesion_verdict(run, 2, 0, "CD", "reject")  # B2: rejected + 1 added -> count 1
    store.save_added_lesion(run, 2, "CD", (31, 11), blob(30, 10), "region-growing")
    store.save_bscan_verdict(run, 2, "CD", True)
    store.save_lesion_verdict(run, 3, 0, "CD", "accept")  # B3: yes, 2 accepted, 1 undecided -> count unknown
    store.save_lesion_verdict(run, 3, 1, "CD", "accept")
    store.save_bscan_verdict(run, 3, "CD", True)
    store.save_bscan_verdict(run, 4, "CD", False)
    return run


def plain(value):
    """None and NaN both mean "undefined": compare them as one."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def test_the_review_bscan_view_derives_each_graders_truth(store_url: str) -> None:
    with open_store(store_url) as store:
        run = review_two_graders(store)
        rows = store.view_rows("hrf_review_bscans")
    got = {(r.grader, r.bscan_index): (r.finished, r.grader_has_hrf, r.grader_count, r.lesions_judged,
                                       r.lesions_confirmed, r.lesions_missed) for r in rows}
    assert got == {
        ("AB", 0): (True, True, 1, 2, 1, 0), ("AB", 1): (True, False, 0, 0, 0, 0), ("AB", 2): (True, True, 2, 1, 1, 1),
        ("AB", 3): (True, False, 0, 3, 0, 0), ("AB", 4): (True, True, None, 0, 0, 0),
        ("CD", 0): (False, None, None, 1, 1, 0), ("CD", 1): (True, False, 0, 0, 0, 0),
        ("CD", 2): (True, True, 1, 1, 0, 1), ("CD", 3): (True, True, None, 2, 2, 0), ("CD", 4): (True, False, 0, 0, 0, 0),
    }
    assert {r.run_id for r in rows} == {run} and rows[0].patient_id == "P1" and rows[0].model_id == "cct-old"
    assert [(r.lesions_undecided, r.bscan_verdict) for r in rows if r.grader == "CD"] == [
        (1, None), (0, False), (0, True), (1, True), (0, False)]


def test_tool_against_each_grader_and_the_agreement_view_give_the_same_figures(store_url: str) -> None:
    with open_store(store_url) as store:
        review_two_graders(store)
        rows = store.view_rows("hrf_review_bscans")
        view = {r.grader: r for r in store.view_rows("hrf_review_agreement")}
    ab = tool_vs_grader([r for r in rows if r.grader == "AB"])
    cd = tool_vs_grader([r for r in rows if r.grader == "CD"])
    assert (ab["tp_bscans"], ab["fn_bscans"], ab["fp_bscans"], ab["tn_bscans"]) == (2, 1, 1, 1)
    assert (ab["sensitivity"], ab["specificity"]) == (2 / 3, 1 / 2)
    assert (ab["lesion_precision"], ab["lesion_recall"]) == (2 / 6, 2 / 3)
    assert (ab["n_counted"], ab["mean_abs_count_error"], ab["count_bias"], ab["equal_count_share"]) == (4, 5 / 4, 3 / 4, 1 / 4)
    assert ab["false_lesions_per_hrf_free_bscan"] == 3 / 2
    assert (ab["volume_counts"]["mean_abs_error"], ab["volume_counts"]["mean_error"]) == (3.0, 3.0)
    assert (cd["n_bscans"], cd["sensitivity"], cd["specificity"]) == (4, 1.0, 1.0)
    assert (cd["lesion_precision"], cd["lesion_recall"], cd["n_counted"], cd["mean_abs_count_error"]) == (2 / 3, 2 / 3, 3, 0.0)
    for grader, mine in (("AB", ab), ("CD", cd)):
        row = view[grader]
        assert (row.reviewed_bscans, row.n_bscans, row.counted_bscans) == (mine["n_bscans"], len(LESIONS), mine["n_counted"])
        for name in ("sensitivity", "specificity", "lesion_precision", "lesion_recall", "mean_abs_count_error",
                     "count_bias", "equal_count_share"):
            assert plain(getattr(row, name)) == plain(mine[name]), (grader, name)


def test_two_graders_agree_by_kappa_counts_and_lesion_verdicts(store_url: str) -> None:
    with open_store(store_url) as store:
        review_two_graders(store)
        rows = store.view_rows("hrf_review_bscans")
        states = store.reviewed_runs(masks=False)
    pair = grader_vs_grader(rows, states, "AB", "CD")
    assert pair["n_bscans"] == 4  # B-scans 1-4: CD left B-scan 0 unfinished
    assert (pair["bscan_agreement"], pair["bscan_kappa"]) == (0.5, 0.0)
    assert (pair["n_counted"], pair["mean_abs_count_error"], pair["count_bias"]) == (2, 0.5, 0.5)
    # B2 L0 accept/reject; B3 L0 and L1: AB's "no" rejects them, CD accepted both
    assert (pair["n_lesions_both_judged"], pair["lesion_agreement"]) == (3, 0.0)
    assert pair["lesion_kappa"] == pytest.approx(-0.8)


def test_0005_downgrades_to_0004_keeping_the_verdicts_and_upgrades_again(store_url: str) -> None:
    with open_store(store_url) as store:
        review_two_graders(store)
        before = store.view_rows("hrf_review_agreement")
    tables = ("review_lesion_verdicts", "review_added_lesions", "review_bscan_verdicts")
    counts = row_counts(store_url, tables)
    engine = make_engine(resolve_url(store_url))
    try:
        with writer(engine).begin() as conn:
            command.downgrade(_alembic_config(conn), "0004")
        with engine.connect() as conn:
            assert not {"hrf_review_bscans", "hrf_review_agreement"} & set(inspect(conn).get_view_names())
    finally:
        engine.dispose()
    assert row_counts(store_url, tables) == counts
    assert upgrade(store_url) == "0005"
    with open_store(store_url) as store:
        assert [dataclasses.astuple(r) for r in store.view_rows("hrf_review_agreement")] == [
            dataclasses.astuple(r) for r in before]


def test_cohen_kappa_and_count_agreement_by_hand() -> None:
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert math.isnan(cohen_kappa([1, 1], [1, 1])) and math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa([1], [1, 0])
    assert count_agreement([(3, 1), (0, 0), (1, 2)]) == {
        "n_counted": 3, "mean_abs_count_error": 1.0, "count_bias": pytest.approx(1 / 3), "equal_count_share": pytest.approx(1 / 3)}


def test_evaluate_reviewed_prints_the_figures_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    with open_store(str(db)) as store:
        review_two_graders(store)
        expected = reviewed_figures(store, "CD")
    runner = CliRunner()
    out = runner.invoke(main, ["evaluate", "--reviewed", "--db", str(db), "--grader", "CD", "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert list(got["tool_vs_grader"]) == ["CD"] and got["tool_vs_grader"]["CD"]["sensitivity"] == 1.0
    assert got["grader_vs_grader"][0]["graders"] == ["AB", "CD"] == expected["grader_vs_grader"][0]["graders"]
    text = runner.invoke(main, ["evaluate", "--reviewed", "--db", str(db)])
    assert text.exit_code == 0 and "tool vs AB: 5 B-scans of 1 run (3 with HRF)" in text.output
    assert "AB vs CD: 4 B-scans, HRF yes/no agree 0.500 (kappa 0.000)" in text.output
    unknown = runner.invoke(main, ["evaluate", "--reviewed", "--db", str(db), "--grader", "XY"])
    assert unknown.exit_code == 1 and "grader 'XY' finished no B-scan" in unknown.output and "AB, CD" in unknown.output
    assert "give STUDY_DIR" in runner.invoke(main, ["evaluate"]).output
    stray = runner.invoke(main, ["evaluate", str(tmp_path), "--grader", "AB"])
    assert stray.exit_code == 2 and "--db and --grader go with --reviewed" in stray.output
    both = runner.invoke(main, ["evaluate", str(tmp_path), "--reviewed", "--db", str(db)])
    assert both.exit_code == 2 and "drop STUDY_DIR" in both.output
    empty = runner.invoke(main, ["evaluate", "--reviewed", "--db", str(tmp_path / "empty.sqlite")])
    assert empty.exit_code == 1 and "no finished grader review" in empty.output


@pytest.mark.slow
def test_a_grader_playing_the_ground_truth_gives_the_segmentation_evaluations_figures(tmp_path: Path) -> None:
    """Must-show: `evaluate --reviewed` equals `evaluate --segmentation` on the same B-scans and settings
    (shipped model, region grower, lesion filter and retina band off so some lesions are false)."""
    study = tmp_path / "s"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=3, seed=5))
    db = tmp_path / "x.sqlite"
    settings = ["--segmenter", "region", "--max-iterations", "6", "--no-lesion-filter", "--no-retina-band",
                "--device", "cpu"]
    runner = CliRunner()
    ingest = runner.invoke(main, ["ingest", str(study), "--db", str(db), "--quiet", *settings])
    assert ingest.exit_code == 0, ingest.output
    evaluated = runner.invoke(main, ["evaluate", str(study), "--segmentation", "--json", *settings])
    assert evaluated.exit_code == 0, evaluated.output
    segmentation = json.loads(evaluated.stdout)["segmentation"]
    last = segmentation[f"after_{segmentation['iterations_reported'][-1]}"]
    with open_store(str(db)) as store:
        graded = load_grader_script().grade_from_truth(store, study)
        volumes = [v for p in store.list_patients() for v in store.volume_results(p.patient_id, masks=False)]
    assert graded.runs == segmentation["n_volumes"] == 4 and graded.not_one_to_one == 0
    assert graded.accepted > 0 and graded.rejected > 0 and graded.added > 0  # every kind of verdict is exercised
    reviewed = runner.invoke(main, ["evaluate", "--reviewed", "--db", str(db), "--json"])
    assert reviewed.exit_code == 0, reviewed.output
    mine = json.loads(reviewed.stdout)["tool_vs_grader"]["truth"]
    for name in ("n_bscans", "n_gt_positive", "n_gt_negative", "n_pred_lesions", "n_tp_lesions", "lesion_precision",
                 "lesion_recall", "lesion_f1", "false_lesions_per_hrf_free_bscan"):
        assert plain(mine[name]) == plain(last[name]), name
    for name in ("n_volumes", "mean_abs_error", "mean_error", "n_hrf_free_volumes", "max_count_in_hrf_free_volume"):
        assert plain(mine["volume_counts"][name]) == plain(segmentation["volume_counts"][name]), name
    truth = load_ground_truth(study)
    pairs = [(b.hrf_count > 0, bool(truth[(v.patient_id, v.visit_date, v.eye)][b.index].any()))
             for v in volumes for b in v.bscans]
    tp, fn = sum(t and p for t, p in pairs), sum(p and not t for t, p in pairs)
    tn, fp = sum(not t and not p for t, p in pairs), sum(t and not p for t, p in pairs)
    assert (mine["tp_bscans"], mine["fn_bscans"], mine["tn_bscans"], mine["fp_bscans"]) == (tp, fn, tn, fp)
    assert np.isclose(mine["sensitivity"], tp / (tp + fn)) and np.isclose(mine["specificity"], tn / (tn + fp))
