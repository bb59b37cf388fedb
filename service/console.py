"""``/ui/``: the web console, server-rendered HTML on the same job store, model and checks as the API.

Login takes the API token (checked as :mod:`service.auth` checks a bearer
token) and keeps, in a signed session cookie (``Secure``, ``HttpOnly``,
``SameSite=Strict``, path ``/ui``), only a mark of the token's digest: removing
the digest from ``[http] token_sha256`` ends every session made with it. The
signing key is random, made once per data folder and kept there (mode 0600),
not derived from the digests, which sit in a configuration file that may be
readable by more people than the data folder. Every form carries the session's
CSRF token. Pages show jobs by id and hashed series key, never patient data.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Flask,
    Request,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.exceptions import NotFound
from werkzeug.routing import RequestRedirect
from werkzeug.wrappers import Response

from rtseg.audit import AUDIT_LOG, AuditLog, job_trail
from rtseg.cli_commands import provenance_lines
from rtseg.deliveries import DeliveryStore, requeue_dead_letters
from rtseg.errors import RtsegError
from rtseg.jobs import FINAL, Job, JobError, JobState, PageQuery
from rtseg.model.gate import read_gate_log
from rtseg.model.registry import registry_of
from rtseg.privacy import redact_uids
from service.auth import token_digest, token_matches
from service.context import ServiceContext, service
from service.health import readiness
from service.model import model_dir, model_info
from service.problems import HttpProblem
from service.segmentations import SOURCES, page_query, summarize

log = logging.getLogger(__name__)
bp = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

SECRET_FILE = Path("console") / "session.key"  # relative to the data directory
SESSION_HOURS = 12
CSP = "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
OPEN = frozenset({"console.login", "console.static"})  # what needs no session
FORM_MAX_BYTES = 4096  # a console form (token, CSRF token, next): the only body taken without a bearer token


@bp.record_once
def _configure(state: BlueprintSetupState) -> None:
    app = state.app
    assert isinstance(app, Flask)  # a blueprint of the Flask app made by service.app
    ctx: ServiceContext = app.extensions["rtseg"]
    app.session_interface = ConsoleSessions(ctx.data_dir)
    app.config.update(
        SESSION_COOKIE_NAME="rtseg_console",
        SESSION_COOKIE_PATH="/ui",
        SESSION_COOKIE_SECURE=True,  # browsers keep it on http://127.0.0.1 and localhost too
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
    )
    app.jinja_env.filters["redact"] = lambda text: redact_uids(str(text)) if text is not None else ""
    app.jinja_env.filters["clock"] = _clock


class ConsoleSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, for ``/ui`` only, signed with the data folder's console key.

    The key is read (or made) on the first console request, not when the app is
    built: an app that never serves the console writes nothing.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not request.path.startswith(bp.url_prefix or "/ui"):
            return None  # the API authenticates every request by its bearer token
        if app.secret_key is None:
            app.secret_key = session_key(self.data_dir)
        return super().open_session(app, request)


def session_key(data_dir: Path) -> bytes:
    """The console's session signing key: random, made once per data folder, readable by its owner only."""
    path = Path(data_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_hex(32).encode())
        try:  # link, not rename: a key another thread or process made first is kept
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink()
    return path.read_bytes().strip()


# -- sessions and forms -----------------------------------------------------------------------


def _mark(digest: str) -> str:
    """What the session keeps of the token: a hash of its configured digest."""
    return hashlib.sha256(f"rtseg-console/{digest}".encode()).hexdigest()


def _signed_in(ctx: ServiceContext) -> bool:
    mark = session.get("auth")
    return isinstance(mark, str) and any(
        hmac.compare_digest(mark, _mark(d)) for d in ctx.settings.token_sha256
    )


def csrf_token() -> str:
    """The session's CSRF token, made on first use; every console form sends it back."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(24)
    return token


@bp.app_context_processor
def _form_helpers() -> dict[str, Any]:
    return {"csrf_token": csrf_token}


@bp.before_request
def _guard() -> Response | tuple[str, int] | None:
    if request.endpoint in OPEN and request.method == "GET":
        return None
    if request.method == "POST" and (request.content_length or 0) > FORM_MAX_BYTES:
        return _error(413, "Too large", f"a console form is at most {FORM_MAX_BYTES} bytes")
    if request.method == "POST" and not _csrf_ok():
        log.warning("console: a form without a valid CSRF token was refused (%s)", request.endpoint)
        return _error(400, "Bad request", _csrf_problem())
    if request.endpoint == "console.login" or _signed_in(service()):
        return None
    return redirect(url_for("console.login", next=request.full_path.rstrip("?")), 303)


def _csrf_ok() -> bool:
    sent, kept = request.form.get("csrf", ""), session.get("csrf")
    return isinstance(kept, str) and bool(sent) and hmac.compare_digest(sent.encode(), kept.encode())


def _csrf_problem() -> str:
    if request.form.get("csrf") and session.get("csrf") is None:  # the page had a token: no cookie came back
        return (
            "your browser sent no console cookie: it keeps the console's Secure cookie only over https"
            " (or on http://127.0.0.1 and http://localhost); open the console through the HTTPS proxy"
        )
    return "the form was not sent by this console's page (missing or stale CSRF token): reload it"


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _error(status: int, title: str, detail: str) -> tuple[str, int]:
    return render_template("console/error.html", title=title, detail=detail, status=status), status


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | tuple[str, int] | str:
    target = _safe_next(request.values.get("next", ""))
    if request.method == "GET":
        csrf_token()
        return render_template("console/login.html", next=target)
    token = request.form.get("token", "").strip()
    if not token or not token_matches(token, service().settings.token_sha256):
        log.warning("console: a sign-in with a wrong token was refused")
        message = "enter the API token" if not token else "this token is not valid"
        return render_template("console/login.html", next=target, error=message), 401
    session.clear()  # a fresh session (and CSRF token) after sign-in
    session.permanent = True
    session["auth"] = _mark(token_digest(token))
    csrf_token()
    return redirect(target, 303)


def _safe_next(target: str) -> str:
    """Only a page of the console itself: never another site (``//host``) after sign-in."""
    if target.startswith("/ui/") and not target.startswith("/ui//") and "\\" not in target:
        return target
    return url_for("console.jobs")


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("console.login"), 303)


# -- the job list and a job's page ------------------------------------------------------------


@bp.get("/")
def jobs() -> Response | tuple[str, int] | str:
    if any(v == "" for v in request.args.values()):  # the filter form sends its empty fields
        kept = {k: v for k, v in request.args.items() if v != ""}
        return redirect(_with_query(url_for("console.jobs"), kept), 303)
    try:
        query = page_query()
    except HttpProblem as exc:
        return _error(400, "Bad filter", exc.detail)
    return render_template("console/jobs.html", **_job_list(service(), query))


def _job_list(ctx: ServiceContext, query: PageQuery) -> dict[str, Any]:
    page, cursor = ctx.store.page(query)
    items = [summarize(ctx.store, job) | {"series": job.series_key} for job in page]
    next_url = None
    if cursor is not None:
        next_url = _with_query(url_for("console.jobs"), {**request.args.to_dict(), "cursor": cursor})
    return {
        "items": items,
        "next_url": next_url,
        "states": [str(s) for s in JobState],
        "sources": SOURCES,
        "args": request.args,
        "first_url": _with_query(
            url_for("console.jobs"), {k: v for k, v in request.args.items() if k != "cursor"}
        ),
    }


def _with_query(url: str, args: dict[str, str]) -> str:
    return f"{url}?{urlencode(args)}" if args else url


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> tuple[str, int] | str:
    ctx = service()
    found = ctx.store.find(job_id)
    if found is None:
        return _error(404, "No such job", f"no job {job_id!r} (deleted or expired?)")
    return render_template(
        "console/job.html",
        job=found,
        item=summarize(ctx.store, found),
        structures=found.result.get("structures", []),
        omitted=found.result.get("omitted", []),
        trail=[_trail_entry(e) for e in job_trail(ctx.data_dir, found)],
        deliveries=_deliveries(ctx).for_job(found.id),
        preview=_has_preview(found),
        cancellable=found.state == JobState.QUEUED,
        final=found.state in FINAL,
    )


def _trail_entry(entry: dict[str, Any]) -> dict[str, Any]:
    details = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("time", "event"))
    return {"time": entry.get("time", ""), "event": entry.get("event", ""), "details": details}


def _preview_view(job_id: str) -> tuple[str, dict[str, Any]] | None:
    """The API's preview route for ``job_id`` when this server has one (endpoint and arguments)."""
    adapter = current_app.url_map.bind("localhost")
    try:
        endpoint, args = adapter.match(f"/v1/segmentations/{job_id}/preview.png", method="GET")
    except (NotFound, RequestRedirect):
        return None
    return (str(endpoint), dict(args)) if not str(endpoint).startswith("console.") else None


def _has_preview(job: Job) -> bool:
    return job.state in (JobState.DONE, JobState.SENDING, JobState.DEAD_LETTER) and (
        _preview_view(job.id) is not None
    )


@bp.get("/jobs/<job_id>/preview.png")
def preview(job_id: str) -> Any:
    """The API's contour preview, for the signed-in console (an ``<img>`` cannot send a bearer token)."""
    found = _preview_view(job_id)
    if found is None:
        return _error(404, "No preview", "this server has no contour previews")
    endpoint, args = found
    return current_app.view_functions[endpoint](**args)


@bp.post("/jobs/<job_id>/resegment")
def resegment(job_id: str) -> Response:
    ctx = service()
    try:
        new = ctx.store.resegment(job_id, ctx.data_dir)  # the same core call as the API's route
    except JobError as exc:
        flash(f"cannot resegment: {exc.message}")
        return redirect(url_for("console.job", job_id=job_id), 303)
    _audit(ctx).record(
        "resegment_requested", job=new.id, supersedes=job_id, series=new.series_key, by="console"
    )
    log.info("job %s: resegmented from the console as job %s", job_id, new.id)
    flash(f"queued job {new.id}: it supersedes job {job_id}")
    return redirect(url_for("console.job", job_id=new.id), 303)


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    ctx = service()
    try:
        ctx.store.cancel(job_id)
    except JobError as exc:
        flash(f"cannot cancel: {exc.message}")
    else:
        _audit(ctx).record("job_cancelled", job=job_id, by="console")
        log.info("job %s: cancelled from the console", job_id)
        flash("cancelled: the job will not be segmented")
    return redirect(url_for("console.job", job_id=job_id), 303)


@bp.post("/jobs/<job_id>/retry")
def retry(job_id: str) -> Response:
    """A dead letter's deliveries back to the node's sender (as ``rtseg node retry JOB``)."""
    ctx = service()
    try:
        requeued = requeue_dead_letters(ctx.store, _deliveries(ctx), _audit(ctx), [job_id])
    except JobError as exc:
        flash(f"cannot retry: {exc.message}")
    else:
        names = ", ".join(requeued.get(job_id, []))
        flash(f"deliveries to {names} requeued: the node's sender tries them again")
    return redirect(url_for("console.job", job_id=job_id), 303)


def _audit(ctx: ServiceContext) -> AuditLog:
    return AuditLog(ctx.data_dir / AUDIT_LOG)


def _deliveries(ctx: ServiceContext) -> DeliveryStore:
    """The delivery rows beside the job table (one store per app: its connections are per thread)."""
    found = ctx.cache.get("deliveries")
    if not isinstance(found, DeliveryStore):
        found = ctx.cache["deliveries"] = DeliveryStore(ctx.store.db_path)
    return found


# -- the model and the node's health ------------------------------------------------------------


@bp.get("/model")
def model() -> str:
    ctx = service()
    try:
        info: dict[str, Any] | None = model_info(ctx)
        problem = None
    except RtsegError as exc:
        info, problem = None, exc.message
    lines = provenance_lines(info["name"], info["version"], info["provenance"]) if info else []
    registry = registry_of(model_dir(ctx)) if ctx.model_dir is not None else None
    versions = registry.list() if registry is not None else []
    history = registry.history() if registry is not None else []
    gates = read_gate_log(registry) if registry is not None else []
    return render_template(
        "console/model.html",
        info=info,
        problem=problem,
        provenance=lines,
        registry=registry is not None,
        current=registry.state().version if registry is not None else None,
        versions=list(reversed(versions)),
        history=list(reversed(history)),
        gates=list(reversed(gates)),
    )


@bp.get("/health")
def health() -> str:
    ctx = service()
    usage = shutil.disk_usage(ctx.data_dir)
    return render_template(
        "console/health.html",
        checks=readiness(ctx),
        counts=ctx.store.counts(),
        disk={"free_mib": usage.free >> 20, "total_mib": usage.total >> 20},
        deliveries=last_deliveries(ctx),
    )


def last_deliveries(ctx: ServiceContext) -> list[dict[str, Any]]:
    """Per destination, its latest delivery: job, state (pending, acked, dead), tries, last error, when."""
    return [
        {**vars(row), "when": datetime.fromtimestamp(updated, UTC).isoformat()}
        for row, updated in _deliveries(ctx).latest()
    ]


def _clock(iso: str | None) -> str:
    """An ISO time of the API as the console shows it (UTC, to the second)."""
    if not iso:
        return "–"
    when = datetime.fromisoformat(iso)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
