"""The grader review page without a browser (Flask test client): the token and read-only refusals, each
verdict stored, undo, the missed-HRF segmenter call, identifiers hidden, a missing source file."""

from __future__ import annotations

import dataclasses
import http.cookiejar
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image
from scipy import ndimage

from hrf_batch.io.ground_truth import LAYER_PREFIX, load_ground_truth
from hrf_batch.io.readers import read_volume
from hrf_batch.io.volume import LayerLines
from hrf_batch.results import BScanResult, Lesion, RunInfo, VolumeAnatomy, VolumeResult
from hrf_batch.review.access import TOKEN_HEADER
from hrf_batch.review.app import create_app
from hrf_batch.review.data import ReviewData
from hrf_batch.review.server import start
from hrf_batch.segment import RegionGrowingSegmenter
from hrf_batch.store import Store, open_store
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

from conftest_store import row_counts

TOKEN = "test-token-123"
REVIEW_TABLES = ("review_lesion_verdicts", "review_added_lesions", "review_bscan_verdicts")
#: Seed 0 at this size draws 1, 3, 3 and 1 HRF on the four B-scans of the right eye.
SPEC = StudySpec(patients=1, visits=1, bscans=4, width=256, height=248, seed=0)
MISSED_BSCAN = 1  # the B-scan whose last true HRF is left out of the stored run, for a grader to add


@dataclass(frozen=True)
class ReviewStudy:
    """A synthetic study with one stored run whose lesions are the true HRF, less one left for a grader."""

    folder: Path
    db: str
    run_id: int
    source: Path
    missed_rc: tuple[int, int]  # the centre of the HRF the run lacks
    missed_label: np.ndarray  # its true pixels
    n_lesions: tuple[int, ...]  # lesions stored per B-scan


def build_review_study(folder: Path) -> ReviewStudy:
    """Write the study and store a region-grower run made of its ground truth (exact, and fast)."""
    write_synthetic_study(folder, SPEC)
    ((key, labels),) = [(k, v) for k, v in load_ground_truth(folder).items() if k[2] == "OD"]
    source = next(folder.rglob("*_OD.vol"))
    volume = read_volume(source)
    truth = np.load(next((folder / "ground_truth").glob("*_OD.npz")))
    layers = {k[len(LAYER_PREFIX):]: truth[k] for k in truth.files if k.startswith(LAYER_PREFIX)}
    bscans, missed = [], None
    for index, label in enumerate(labels):
        ids = [int(i) for i in np.unique(label) if i]
        if index == MISSED_BSCAN:
            missed, ids = label == ids[-1], ids[:-1]
        lesions = []
        for i in ids:
            rows, cols = np.nonzero(label == i)
            box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
            lesions.append(Lesion(index, (float(rows.mean()), float(cols.mean())), box, int(rows.size),
                                  (label == i)[box[0]:box[2], box[1]:box[3]]))
        mask = np.isin(label, ids)
        relevance = ndimage.gaussian_filter(mask.astype(np.float32), 6) if ids else None
        bscans.append(BScanResult(index, (0.9 if ids else 0.1,), (), mask, tuple(lesions), relevance))
    run = RunInfo(model_id="cct-review-test", segmenter="region-growing", segmenter_checkpoint_sha256=None,
                  parameters={"threshold": 0.5, "box_px": 4, "crop_px": 75,
                              "segmenter_params": RegionGrowingSegmenter().params},
                  code_version="test", device="cpu")
    anatomy = VolumeAnatomy(layers=LayerLines(layers, "ground-truth"), fovea=None, fovea_note="test", thickness_um=None)
    result = VolumeResult(meta=volume.meta, bscan_shape=volume.bscan_shape, bscans=tuple(bscans), run=run,
                          anatomy=anatomy)
    db = f"sqlite:///{folder / 'study.sqlite'}"
    with open_store(db) as store:
        run_id = store.save_volume_result(result).run_id
    rows, cols = np.nonzero(missed)
    return ReviewStudy(folder, db, run_id, source, (int(round(rows.mean())), int(round(cols.mean()))), missed,
                       tuple(len(b.lesions) for b in bscans))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> ReviewStudy:
    return build_review_study(tmp_path_factory.mktemp("review") / "study")


@pytest.fixture
def fresh(study: ReviewStudy, tmp_path: Path) -> ReviewStudy:
    """A copy of the study's database, so each test starts unreviewed."""
    path = tmp_path / "copy.sqlite"
    shutil.copy(study.db.removeprefix("sqlite:///"), path)
    return dataclasses.replace(study, db=f"sqlite:///{path}")


def client_for(store: Store, grader: str | None = "AB", show_identifiers: bool = False) -> FlaskClient:
    """A logged-in test client (the token swapped for the cookie)."""
    client = create_app(ReviewData(store, grader, show_identifiers), TOKEN).test_client()
    assert client.get(f"/?token={TOKEN}").status_code == 302
    return client


def post(client: FlaskClient, path: str, body: dict, method: str = "POST"):
    return client.open(path, method=method, json=body, headers={TOKEN_HEADER: TOKEN})


def test_without_the_token_every_address_refuses(fresh: ReviewStudy) -> None:
    with open_store(fresh.db) as store:
        client = create_app(ReviewData(store, "AB"), TOKEN).test_client()
        run = fresh.run_id
        for path in ("/", "/patient/P001", f"/run/{run}", f"/api/run/{run}/bscan/0", f"/img/run/{run}/bscan/0.png",
                     "/static/review.js"):
            answer = client.get(path)
            assert answer.status_code == 403 and b"needs its access token" in answer.data, path
        assert client.get("/?token=wrong").status_code == 403
        assert post(client, f"/api/run/{run}/bscan/0/hrf", {"has_hrf": True}).status_code == 403
        login = client.get(f"/run/{run}?token={TOKEN}&b=2")
        assert login.status_code == 302 and login.headers["Location"] == f"/run/{run}?b=2"  # token off the address
        cookie = login.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get(f"/run/{run}?b=2").status_code == 200
        assert client.get("/static/review.js").status_code == 200
    assert set(row_counts(fresh.db, REVIEW_TABLES).values()) == {0}


def test_a_write_needs_the_token_header_as_well_as_the_cookie(fresh: ReviewStudy) -> None:
    with open_store(fresh.db) as store:
        client = client_for(store)
        answer = client.post(f"/api/run/{fresh.run_id}/bscan/0/hrf", json={"has_hrf": True})
        assert answer.status_code == 403 and TOKEN_HEADER in answer.get_json()["error"]
        wrong = client.post(f"/api/run/{fresh.run_id}/bscan/0/hrf", json={"has_hrf": True},
                            headers={TOKEN_HEADER: "guess"})
        assert wrong.status_code == 403
    assert row_counts(fresh.db, REVIEW_TABLES)["review_bscan_verdicts"] == 0


def test_without_a_grader_the_page_is_read_only(fresh: ReviewStudy) -> None:
    with open_store(fresh.db) as store:
        client = client_for(store, grader=None)
        page = client.get(f"/run/{fresh.run_id}").get_data(as_text=True)
        view = client.get(f"/api/run/{fresh.run_id}/bscan/1").get_json()
        answers = [
            post(client, f"/api/run/{fresh.run_id}/bscan/1/lesion/0", {"verdict": "accept"}),
            post(client, f"/api/run/{fresh.run_id}/bscan/1/hrf", {"has_hrf": False}),
            post(client, f"/api/run/{fresh.run_id}/bscan/1/added", {"row": 5, "col": 5}),
            post(client, f"/api/run/{fresh.run_id}/bscan/1/added/1", {}, method="DELETE"),
        ]
    assert '>read-only</span>' in page and '"readOnly": true' in page
    assert view["read_only"] and view["grader"] is None and len(view["lesions"]) == fresh.n_lesions[1]
    for answer in answers:
        assert answer.status_code == 403 and "read-only" in answer.get_json()["error"]
        assert "--grader" in answer.get_json()["hint"]
    assert set(row_counts(fresh.db, REVIEW_TABLES).values()) == {0}


def test_each_verdict_is_stored_replaced_and_withdrawn(fresh: ReviewStudy) -> None:
    run = fresh.run_id
    with open_store(fresh.db) as store:
        client = client_for(store, grader="AB")
        other = client_for(store, grader="CD")
        assert post(client, f"/api/run/{run}/bscan/1/lesion/0", {"verdict": "accept"}).status_code == 200
        assert post(other, f"/api/run/{run}/bscan/1/lesion/0", {"verdict": "reject"}).status_code == 200
        view = post(client, f"/api/run/{run}/bscan/1/lesion/1", {"verdict": "reject"}).get_json()
        assert [les["verdict"] for les in view["lesions"]] == ["accept", "reject"]
        assert view["lesions"][0]["others"] == {"CD": "reject"} and view["status"][1] == "partial"
        post(client, f"/api/run/{run}/bscan/1/lesion/1", {"verdict": "accept"})  # changes AB's mind
        post(client, f"/api/run/{run}/bscan/1/lesion/0", {"verdict": None})  # withdraws AB's verdict
        view = post(client, f"/api/run/{run}/bscan/1/hrf", {"has_hrf": True}).get_json()
        assert view["has_hrf"] is True and [les["verdict"] for les in view["lesions"]] == [None, "accept"]
        post(client, f"/api/run/{run}/bscan/3/hrf", {"has_hrf": False})
        post(client, f"/api/run/{run}/bscan/3/hrf", {"has_hrf": None})
        view = post(client, f"/api/run/{run}/bscan/0/hrf", {"has_hrf": False}).get_json()
        assert view["status"][0] == "partial"  # answered, but its lesion is undecided
        state = store.review_state(run)
    assert [(v.bscan_index, v.lesion_index, v.grader, v.verdict) for v in state.lesion_verdicts] == [
        (1, 0, "CD", "reject"), (1, 1, "AB", "accept")]
    assert [(v.bscan_index, v.grader, v.has_hrf) for v in state.bscan_verdicts] == [(0, "AB", False), (1, "AB", True)]


def test_bad_requests_get_a_message(fresh: ReviewStudy) -> None:
    run = fresh.run_id
    with open_store(fresh.db) as store:
        client = client_for(store)
        assert post(client, f"/api/run/{run}/bscan/1/lesion/0", {"verdict": "maybe"}).status_code == 400
        assert post(client, f"/api/run/{run}/bscan/1/hrf", {"has_hrf": "yes"}).status_code == 400
        assert post(client, f"/api/run/{run}/bscan/1/added", {"row": 1.5, "col": 3}).status_code == 400
        missing = post(client, f"/api/run/{run}/bscan/1/lesion/9", {"verdict": "accept"})
        assert missing.status_code == 404 and "no lesion 9" in missing.get_json()["error"]
        assert client.get(f"/api/run/{run}/bscan/4").status_code == 404
        page = client.get(f"/run/{run + 40}")
        assert page.status_code == 404 and b"no run" in page.data and b"<html" in page.data
        assert client.get("/patient/NOBODY").status_code == 404
    assert set(row_counts(fresh.db, REVIEW_TABLES).values()) == {0}


def test_a_click_on_a_missed_hrf_runs_the_runs_segmenter_there_and_can_be_undone(fresh: ReviewStudy) -> None:
    run = fresh.run_id
    row, col = fresh.missed_rc
    with open_store(fresh.db) as store:
        client = client_for(store, grader="AB")
        answer = post(client, f"/api/run/{run}/bscan/{MISSED_BSCAN}/added", {"row": row, "col": col})
        assert answer.status_code == 201
        view = answer.get_json()
        (added,) = store.review_state(run).added_lesions
        nothing = post(client, f"/api/run/{run}/bscan/{MISSED_BSCAN}/added", {"row": 3, "col": 3})  # vitreous
        other = client_for(store, grader="CD")
        refused = post(other, f"/api/run/{run}/bscan/{MISSED_BSCAN}/added/{added.added_id}", {}, method="DELETE")
        undone = post(client, f"/api/run/{run}/bscan/{MISSED_BSCAN}/added/{added.added_id}", {}, method="DELETE")
        after = store.review_state(run).added_lesions
    assert view["added_id"] == added.added_id and view["added"][0]["mine"] and view["added"][0]["outline"]
    assert added.segmenter == "region-growing" and added.grader == "AB" and added.click_rc == (row, col)
    drawn = np.zeros(fresh.missed_label.shape, bool)
    r0, c0, r1, c1 = added.bbox_rc
    drawn[r0:r1, c0:c1] = added.mask
    dice = 2 * (drawn & fresh.missed_label).sum() / (drawn.sum() + fresh.missed_label.sum())
    assert dice > 0.7, f"the segmenter's outline matches the true HRF with Dice {dice:.2f}"
    assert nothing.status_code == 422 and "found no HRF" in nothing.get_json()["error"]
    assert refused.status_code == 404 and undone.status_code == 200 and undone.get_json()["added"] == []
    assert after == ()


def test_identifiers_appear_only_when_asked_for(fresh: ReviewStudy) -> None:
    with open_store(fresh.db) as store:
        hidden = client_for(store, show_identifiers=False)
        shown = client_for(store, show_identifiers=True)
        pages = {name: "".join(c.get(p).get_data(as_text=True) for p in ("/", "/patient/P001", f"/run/{fresh.run_id}"))
                 for name, c in (("hidden", hidden), ("shown", shown))}
        (patient,) = store.list_patients(include_identifiers=True)
    assert patient.birth_date is not None
    for secret in (patient.birth_date.isoformat(), str(fresh.source)):
        assert secret not in pages["hidden"] and secret in pages["shown"]
    assert "identifiers hidden" in pages["hidden"] and "identifiers hidden" not in pages["shown"]
    assert "P001" in pages["hidden"]  # the pseudonymous id is what graders work with


def test_images_and_overlays_of_a_bscan(fresh: ReviewStudy) -> None:
    run = fresh.run_id
    with open_store(fresh.db) as store:
        client = client_for(store)
        picture = Image.open(io.BytesIO(client.get(f"/img/run/{run}/bscan/1.png").data))
        heat = Image.open(io.BytesIO(client.get(f"/img/run/{run}/bscan/1/relevance.png").data))
        view = client.get(f"/api/run/{run}/bscan/1").get_json()
    assert picture.mode == "L" and picture.size == (SPEC.width, SPEC.height)
    expected = np.clip(np.rint(read_volume(fresh.source).bscans[1]), 0, 255)
    assert np.array_equal(np.asarray(picture), expected.astype(np.uint8))
    assert heat.mode == "RGBA" and np.asarray(heat)[..., 3].max() > 0
    assert view["image"] == {"available": True, "note": None} and view["relevance"]
    assert {line["name"] for line in view["layers"]} >= {"ILM", "BM"}
    for lesion in view["lesions"]:  # each outline starts on the lesion's box
        r0, c0, r1, c1 = lesion["bbox"]
        x, y = (int(v) for v in re.match(r"M(\d+) (\d+)", lesion["outline"]).groups())
        assert c0 <= x <= c1 and r0 <= y <= r1


def test_a_missing_source_file_shows_a_grey_canvas_and_says_so(fresh: ReviewStudy) -> None:
    hidden = fresh.source.with_suffix(".hidden")  # the run still names the original path
    fresh.source.rename(hidden)
    try:
        with open_store(fresh.db) as store:
            client = client_for(store)
            view = client.get(f"/api/run/{fresh.run_id}/bscan/1").get_json()
            picture = np.asarray(Image.open(io.BytesIO(client.get(f"/img/run/{fresh.run_id}/bscan/1.png").data)))
            added = post(client, f"/api/run/{fresh.run_id}/bscan/1/added", {"row": 100, "col": 100})
    finally:
        hidden.rename(fresh.source)
    assert not view["image"]["available"] and "missing" in view["image"]["note"]
    assert picture.shape == (SPEC.height, SPEC.width) and len(np.unique(picture)) == 1
    assert len(view["lesions"]) == fresh.n_lesions[1]  # the outlines are still there
    assert added.status_code == 422 and "put the analysed file back" in added.get_json()["hint"]


def test_the_server_binds_to_loopback_and_refuses_without_the_token(fresh: ReviewStudy) -> None:
    with open_store(fresh.db) as store:
        server = start(store, port=0, grader="AB")
        thread = Thread(target=server.run, daemon=True)
        thread.start()
        try:
            assert server.base_url.startswith("http://127.0.0.1:") and server.url.endswith(f"?token={server.token}")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(server.base_url + "/", timeout=10)
            assert refused.value.code == 403
            browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            with browser.open(server.url, timeout=10) as answer:  # the token becomes a cookie, then the page
                assert answer.status == 200 and answer.url == server.base_url + "/"
                assert b"grading as <strong>AB</strong>" in answer.read()
        finally:
            server.stop()
            thread.join(10)
    assert not thread.is_alive()


def test_the_command_prints_a_local_address_with_its_token_and_stops_on_ctrl_c(fresh: ReviewStudy) -> None:
    command = [sys.executable, "-m", "hrf_batch", "review", "--db", fresh.db, "--port", "0", "--no-browser",
               "--grader", "AB"]
    # Ctrl-C as in a terminal, also when the tests run in the background (SIGINT inherited ignored)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = [process.stdout.readline() for _ in range(4)]
        address = lines[3].strip()
        assert "recording verdicts as 'AB'" in lines[0] and "identifiers hidden" in lines[0]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{20,}", address), lines
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(address.split("?")[0], timeout=10)
        assert refused.value.code == 403
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with browser.open(address, timeout=10) as answer:
            assert answer.status == 200 and b"P001" in answer.read()
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=20)
    assert process.returncode == 0 and "review page stopped" in rest


def test_the_command_refuses_an_empty_grader_name_in_one_line(fresh: ReviewStudy) -> None:
    from click.testing import CliRunner

    from hrf_batch.cli import main

    result = CliRunner().invoke(main, ["review", "--db", fresh.db, "--port", "0", "--no-browser", "--grader", " "])
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: the grader name is empty — give a grader name, e.g. your initials")
