"""Serving the review page with waitress on 127.0.0.1 (or ``--host``), behind a fresh access token."""

from __future__ import annotations

import ipaddress
import logging

from waitress import create_server
from waitress.server import BaseWSGIServer, MultiSocketServer

from hrf_batch.review.access import new_token
from hrf_batch.review.app import create_app
from hrf_batch.review.data import ReviewData
from hrf_batch.review.errors import ReviewError
from hrf_batch.review.missed import SegmenterCache
from hrf_batch.store import Store

log = logging.getLogger(__name__)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
_THREADS = 4


class ReviewServer:
    """A started (listening) review server: its address with the token, ``run`` to serve, ``stop`` to end."""

    def __init__(self, server: BaseWSGIServer | MultiSocketServer, host: str, token: str, data: ReviewData) -> None:
        self._server = server
        self._data = data
        self.token = token
        self.port = int(server.effective_port)  # type: ignore[union-attr]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{self.port}"

    @property
    def url(self) -> str:
        """The address to open: the token in it lets the browser in (once, then a cookie)."""
        return f"{self.base_url}/?token={self.token}"

    def banner(self) -> str:
        """What the command prints at start: what is served, how, and the address with its token."""
        data = self._data
        mode = f"recording verdicts as {data.grader!r}" if data.grader else "read-only (pass --grader NAME to record verdicts)"
        identifiers = "identifiers shown" if data.show_identifiers else "identifiers hidden"
        return (f"Grader review of {data.store.url}: {mode}, {identifiers}.\n"
                f"Open this address in a browser (it holds the access token):\n\n    {self.url}\n\n"
                "Press Ctrl-C to stop.")

    def run(self) -> None:
        """Serve until Ctrl-C or :meth:`stop`."""
        self._server.run()

    def stop(self) -> None:
        """End :meth:`run` (from another thread) and close every connection."""
        self._server.close()


def start(store: Store, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, grader: str | None = None,
          show_identifiers: bool = False, segmenters: SegmenterCache | None = None) -> ReviewServer:
    """Bind the review page to ``host``:``port`` (0: any free port) with a new token; ReviewError when the
    address is taken or not local. Nothing is served until :meth:`ReviewServer.run`."""
    if grader is not None:
        from hrf_batch.store.review import check_grader

        grader = check_grader(grader)
    token = new_token()
    data = ReviewData(store, grader, show_identifiers, segmenters)
    app = create_app(data, token)
    try:
        server = create_server(app, host=host, port=port, threads=_THREADS, ident="hrf-batch review")
    except OSError as exc:
        raise ReviewError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          "pass another --port (or stop the program that uses this one)") from exc
    if not _is_loopback(host):
        log.warning("the review page listens on %s: anyone who can reach this machine and has the address "
                    "with its token can read the study%s", host, "" if grader is None else " and record verdicts")
    return ReviewServer(server, host, token, data)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
