"""Serve the app with waitress (never Flask's development server), in the foreground or a thread.

waitress answers some requests itself before the app sees them (a declared
body over the limit, malformed HTTP); :class:`ProblemErrorTask` makes those
answers problem JSON too. waitress reads a whole request body (into a temp file)
before it calls the app, so :class:`TokenCheckingParser` checks the bearer token
of a request with a body as soon as its headers are in: without a valid token it
is answered 401 and closed, its body never read. waitress does not speak TLS: put
a reverse proxy in front (README, "HTTP API") and name it in ``[http] trusted_proxy``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from flask import Flask
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask
from waitress.utilities import Error

from service.auth import authorization_problem
from service.console import FORM_MAX_BYTES
from service.problems import PROBLEM_JSON, TYPE_PREFIX
from service.settings import HttpSettings

log = logging.getLogger(__name__)


class ProblemErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's own error answers (413, 400, 431 …) as RFC 9457 problem JSON."""

    def execute(self) -> None:
        error = self.request.error
        slug = getattr(error, "slug", None)
        body = json.dumps(
            {
                "type": TYPE_PREFIX + slug if slug else "about:blank",
                "title": error.reason,
                "status": error.code,
                "detail": str(error.body),
            }
        ).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", PROBLEM_JSON))
        self.response_headers.extend(getattr(error, "headers", ()))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Unauthorized(Error):  # type: ignore[misc]
    code = 401
    reason = "Unauthorized"
    slug = "unauthorized"  # the same problem type as the app's own 401

    def __init__(self, detail: str, challenge: str) -> None:
        super().__init__(detail)
        self.headers = [("WWW-Authenticate", challenge)]


class TokenCheckingParser(HTTPRequestParser):  # type: ignore[misc]
    """Refuses a request with a body but without a valid token once its headers are in.

    Whatever the path: the endpoints open without a token (health, metrics,
    OpenAPI) take no body, and anything else would otherwise be read up to
    ``max_body_mb`` into a temp file first. The one exception: the web
    console's forms (a browser sends no bearer token), at most
    :data:`~service.console.FORM_MAX_BYTES` declared up front. ``digests`` is set per server.
    """

    digests: tuple[str, ...] = ()
    completed: bool
    headers_finished: bool

    def received(self, data: bytes) -> int:
        in_headers = not self.headers_finished
        consumed: int = super().received(data)
        if in_headers and self.headers_finished and not self.completed and not self._console_form():
            refused = authorization_problem(self.headers.get("AUTHORIZATION", ""), self.digests)
            if refused is not None:
                self.error = Unauthorized(*refused)
                self.completed = True  # the channel answers with the error task and closes
        return consumed

    def _console_form(self) -> bool:
        """A web console form (sign-in, a button): small and declared; the console checks session and CSRF."""
        small = 0 < self.content_length <= FORM_MAX_BYTES and not self.chunked
        return small and str(self.path).startswith("/ui/")


class ProblemChannel(HTTPChannel):  # type: ignore[misc]
    error_task_class = ProblemErrorTask
    parser_class = TokenCheckingParser


def _channel_class(digests: tuple[str, ...]) -> type[ProblemChannel]:
    parser = type("TokenCheckingParser", (TokenCheckingParser,), {"digests": digests})
    return type("ProblemChannel", (ProblemChannel,), {"parser_class": parser})


class HttpServer:
    """A waitress server for ``app``; ``port=0`` picks a free port (see :attr:`port`)."""

    def __init__(self, app: Flask, settings: HttpSettings, *, port: int | None = None) -> None:
        options: dict[str, Any] = {
            "host": settings.host,
            "port": settings.port if port is None else port,
            "threads": settings.threads,
            "max_request_body_size": settings.max_body_bytes + 1,  # waitress refuses at ≥ this
            "ident": "rtseg",
            "clear_untrusted_proxy_headers": True,
            "channel_timeout": 120,
        }
        if settings.trusted_proxy:
            options["trusted_proxy"] = settings.trusted_proxy
            options["trusted_proxy_headers"] = set(settings.trusted_proxy_headers)
        self._server: BaseWSGIServer = create_server(app, **options)
        self._server.channel_class = _channel_class(settings.token_sha256)
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def host(self) -> str:
        return str(self._server.effective_host)

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        log.info("HTTP API on %s", self.url)
        try:
            self._server.run()
        except OSError:
            if not self._closing:
                raise
            # stop() closed the listening socket under the poll loop: that ends the loop

    def start(self) -> None:
        """Serve in a daemon thread (as ``rtseg serve`` does next to the DICOM node)."""
        self._thread = threading.Thread(target=self.serve_forever, name="rtseg-http", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._server.close()
        if self._thread is not None:
            self._thread.join(timeout)
        # the poll loop ended on the closed socket, not through waitress's own shutdown path:
        # close the open connections and end the request threads here
        wasyncore.close_all(self._server._map)
        self._server.task_dispatcher.shutdown(timeout=timeout)
