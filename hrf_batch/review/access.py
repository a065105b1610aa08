"""Who may use the page: the holder of the random token printed at start, like a notebook server.

The token comes once in the URL (``?token=``), is swapped for an HttpOnly cookie and removed from the
address bar; every request needs the cookie. Every write also needs the token in the
``X-Review-Token`` header, which a page of another site cannot set (CSRF), and a grader name: without
``--grader`` the page is read-only and writes are refused.
"""

from __future__ import annotations

import hashlib
import secrets
from urllib.parse import urlencode

from flask import Flask, Response, make_response, redirect, request

TOKEN_HEADER = "X-Review-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def new_token() -> str:
    """A fresh random access token (URL-safe)."""
    return secrets.token_urlsafe(24)


def cookie_name(token: str) -> str:
    """A cookie name of this server's own: cookies ignore ports, so two review servers on one host
    must not overwrite each other's."""
    return "hrf_batch_review_" + hashlib.sha256(token.encode()).hexdigest()[:10]


def _same(given: str | None, token: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode("utf-8", "replace"), token.encode())


def refusal(status: int, problem: str, hint: str) -> Response:
    """A short plain answer for a refused request: JSON for the page's scripts, text otherwise."""
    if request.path.startswith("/api/"):
        response = make_response({"error": problem, "hint": hint}, status)
    else:
        response = make_response(f"{problem}\n{hint}\n", status)
        response.mimetype = "text/plain"
    return response


def install(app: Flask, token: str, read_only: bool) -> None:
    """Guard every request of ``app`` with ``token``; refuse writes when ``read_only``."""
    name = cookie_name(token)

    @app.before_request
    def _check() -> Response | None:
        given = request.args.get("token")
        if given is not None and request.method in SAFE_METHODS:
            if not _same(given, token):
                return refusal(403, "wrong access token", "open the address printed by `hrf-batch review`")
            rest = {k: v for k, v in request.args.items(multi=False) if k != "token"}
            response = redirect(request.path + ("?" + urlencode(rest) if rest else ""))
            response.set_cookie(name, token, httponly=True, samesite="Strict", path="/")
            return response
        if not _same(request.cookies.get(name), token):
            return refusal(403, "this review page needs its access token",
                           "open the address printed by `hrf-batch review` (it ends in ?token=...)")
        if request.method not in SAFE_METHODS:
            if not _same(request.headers.get(TOKEN_HEADER), token):
                return refusal(403, f"a change needs the {TOKEN_HEADER} header",
                               "use the buttons of the review page")
            if read_only:
                return refusal(403, "this review page is read-only: nothing is recorded without a grader name",
                               "start `hrf-batch review` with --grader NAME to record verdicts")
        return None
