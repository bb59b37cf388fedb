"""The one place where errors become RFC 9457 problem responses (``application/problem+json``).

* :class:`HttpProblem` -- raised by the views for HTTP-level conditions (auth,
  unknown job, wrong state, full queue) with a status, a slug and headers;
* :class:`rtseg.errors.RtsegError` and its subclasses -- bad input is 422 (or
  the status an upload error carries), a model that cannot run is 503, a
  job in the wrong state is 409;
* werkzeug's :class:`~werkzeug.exceptions.HTTPException` -- keeps its status;
* anything else -- 500 with no detail (the traceback goes to the log, without
  request data).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from rtseg.errors import InputError, ModelError, RtsegError
from rtseg.jobs import JobError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:rtseg:problem:"


class HttpProblem(Exception):
    """A condition the API reports with a given status (raise it from a view)."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    slug: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    """An ``application/problem+json`` response (``type`` is ``about:blank`` without a slug)."""
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug if slug else "about:blank",
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if request:
        body["instance"] = request.path
    body.update(extra or {})
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    response.headers.update(headers or {})
    return response


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _from_http_problem(exc: HttpProblem) -> Response:
    return problem(
        exc.status, _title(exc.status), exc.detail, slug=exc.slug, headers=exc.headers, extra=exc.extra
    )


def _from_rtseg(exc: RtsegError) -> Response:
    status = _rtseg_status(exc)
    slug = str(getattr(exc, "slug", "")) or _RTSEG_SLUG.get(status, "error")
    if status >= 500:
        log.error("request failed: %s", type(exc).__name__)
    # exc.message, not str(exc): the source is a server-side path
    return problem(status, _title(status), exc.message, slug=slug)


def _rtseg_status(exc: RtsegError) -> int:
    explicit = getattr(exc, "status", None)
    if isinstance(explicit, int):
        return explicit
    return next((_RTSEG_STATUS[c] for c in type(exc).__mro__ if c in _RTSEG_STATUS), 500)


def _from_werkzeug(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers = {k: v for k, v in exc.get_headers() if k.lower() not in ("content-type", "content-length")}
    return problem(status, _title(status), exc.description, headers=headers)


def _from_unexpected(exc: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.url_rule)
    return problem(500, "Internal Server Error", "the server failed; the log says why", slug="internal")


_RTSEG_STATUS: dict[type[RtsegError], int] = {InputError: 422, ModelError: 503, JobError: 409}
_RTSEG_SLUG = {422: "invalid-input", 503: "model-unavailable", 409: "job-state", 500: "internal"}


def register_problem_handlers(app: Flask) -> None:
    """Route every error of ``app`` through the translations above."""
    app.register_error_handler(HttpProblem, _from_http_problem)
    app.register_error_handler(RtsegError, _from_rtseg)
    app.register_error_handler(HTTPException, _from_werkzeug)
    app.register_error_handler(Exception, _from_unexpected)
