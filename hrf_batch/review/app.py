"""The review web application (Flask): study lists, the B-scan review page, and its small JSON API.

Pages: ``/`` (patients), ``/patient/<id>`` (visits and volumes), ``/run/<run id>`` (the B-scan viewer).
API (JSON; writes need a grader and the token header, see :mod:`hrf_batch.review.access`):

* ``GET /api/run/<run>/bscan/<i>``: lesions with outlines and verdicts, added lesions, layer lines,
  HRF yes/no, per-B-scan status and progress;
* ``POST …/lesion/<k>`` ``{"verdict": "accept" | "reject" | null}``;
* ``POST …/hrf`` ``{"has_hrf": true | false | null}``;
* ``POST …/added`` ``{"row": r, "col": c}`` runs the run's segmenter at the click;
* ``DELETE …/added/<id>`` removes a lesion the grader added.

Every write answers with the B-scan's new state, so the page redraws from what was stored.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, abort, jsonify, make_response, render_template, request

from hrf_batch import __version__
from hrf_batch.errors import HrfBatchError
from hrf_batch.review import access
from hrf_batch.review.data import ReviewData
from hrf_batch.review.errors import ReviewNotFound
from hrf_batch.review.images import bscan_png, relevance_png
from hrf_batch.store import REVIEW_VERDICTS


def create_app(data: ReviewData, token: str) -> Flask:
    """The review application over ``data``; every request needs ``token`` (see :mod:`access`)."""
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, JSON_SORT_KEYS=False)
    access.install(app, token, data.read_only)

    @app.context_processor
    def _common() -> dict[str, Any]:
        return {"grader": data.grader, "read_only": data.read_only, "show_identifiers": data.show_identifiers,
                "token": token, "token_header": access.TOKEN_HEADER, "db_url": data.store.url, "version": __version__}

    @app.errorhandler(HrfBatchError)
    def _failed(exc: HrfBatchError) -> Response:
        status = 404 if isinstance(exc, ReviewNotFound) else 422
        if request.path.startswith("/api/"):
            return jsonify(error=exc.problem, hint=exc.hint), status
        return Response(render_template("error.html", problem=exc.problem, hint=exc.hint), status)

    @app.get("/")
    def index() -> str:
        return render_template("index.html", patients=data.patients())

    @app.get("/patient/<path:patient_id>")
    def patient(patient_id: str) -> str:
        return render_template("patient.html", patient=data.patient(patient_id))

    @app.get("/run/<int:run_id>")
    def run(run_id: int) -> str:
        volume = data.volume(run_id)
        start = request.args.get("b", default=0, type=int)
        return render_template("review.html", volume=volume, run=volume.run, start=start,
                               source=data.source_label(volume))

    @app.get("/api/run/<int:run_id>/bscan/<int:index>")
    def bscan(run_id: int, index: int) -> Response:
        return jsonify(data.bscan_view(run_id, index))

    @app.get("/img/run/<int:run_id>/bscan/<int:index>.png")
    def bscan_image(run_id: int, index: int) -> Response:
        shape = data.volume(run_id).bscan_shape
        return _png(bscan_png(data.bscan_image(run_id, index), shape))

    @app.get("/img/run/<int:run_id>/bscan/<int:index>/relevance.png")
    def relevance_image(run_id: int, index: int) -> Response:
        relevance = data.bscan(run_id, index).bscan.relevance
        if relevance is None:
            abort(404, "no relevance map stored for this B-scan: its score was below the threshold")
        return _png(relevance_png(relevance))

    @app.post("/api/run/<int:run_id>/bscan/<int:index>/lesion/<int:lesion>")
    def lesion_verdict(run_id: int, index: int, lesion: int) -> Response:
        verdict = _body_field("verdict", lambda v: v is None or v in REVIEW_VERDICTS, "'accept', 'reject' or null")
        data.lesion_verdict(run_id, index, lesion, verdict)
        return jsonify(data.bscan_view(run_id, index))

    @app.post("/api/run/<int:run_id>/bscan/<int:index>/hrf")
    def bscan_verdict(run_id: int, index: int) -> Response:
        has_hrf = _body_field("has_hrf", lambda v: v is None or isinstance(v, bool), "true, false or null")
        data.bscan_verdict(run_id, index, has_hrf)
        return jsonify(data.bscan_view(run_id, index))

    @app.post("/api/run/<int:run_id>/bscan/<int:index>/added")
    def add_missed(run_id: int, index: int) -> tuple[Response, int]:
        row = _body_field("row", _is_int, "a pixel row (integer)")
        col = _body_field("col", _is_int, "a pixel column (integer)")
        added_id = data.add_missed(run_id, index, (row, col))
        return jsonify(data.bscan_view(run_id, index) | {"added_id": added_id}), 201

    @app.delete("/api/run/<int:run_id>/bscan/<int:index>/added/<int:added_id>")
    def delete_added(run_id: int, index: int, added_id: int) -> Response:
        data.bscan(run_id, index)
        data.delete_added(added_id)
        return jsonify(data.bscan_view(run_id, index))

    return app


def _png(payload: bytes) -> Response:
    response = Response(payload, mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=300"
    return response


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _body_field(name: str, valid: Any, expected: str) -> Any:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or name not in body or not valid(body[name]):
        abort(make_response(jsonify(error=f"the request needs {name!r}: {expected}", hint="use the review page"), 400))
    return body[name]
