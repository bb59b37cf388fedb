"""Serve the app with waitress (never Flask's development server), in the foreground or a thread.

waitress answers some requests itself before the app sees them (a declared
body over the limit, malformed HTTP); :class:`ProblemErrorTask` makes those
answers problem JSON too. waitress does not speak TLS: put a reverse proxy in
front (README, "HTTP API") and name it in ``[http] trusted_proxy``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from flask import Flask
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from service.problems import PROBLEM_JSON
from service.settings import HttpSettings

log = logging.getLogger(__name__)


class ProblemErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's own error answers (413, 400, 431 …) as RFC 9457 problem JSON."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps(
            {"type": "about:blank", "title": error.reason, "status": error.code, "detail": str(error.body)}
        ).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", PROBLEM_JSON))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class ProblemChannel(HTTPChannel):  # type: ignore[misc]
    error_task_class = ProblemErrorTask


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
        self._server.channel_class = ProblemChannel
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
