"""``/v1/segmentations``: upload a CT, follow the job, download the RTSTRUCT, SEG or label map, delete."""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from flask import Blueprint, Response, jsonify, request, send_file, url_for

from rtseg.audit import AUDIT_LOG, AuditLog
from rtseg.errors import InputError
from rtseg.jobs import FINAL, Job, JobError, JobState, JobStore, PageQuery, decode_cursor
from rtseg.preview import PREVIEW_FILE, flags_by_structure, render_preview
from service.context import ServiceContext, UploadRequest, service
from service.problems import HttpProblem
from service.uploads import Intake, Part, receive

log = logging.getLogger(__name__)
bp = Blueprint("segmentations", __name__, url_prefix="/segmentations")

RAW_TYPES = frozenset(
    {
        "application/zip",
        "application/x-zip-compressed",
        "application/dicom",
        "application/gzip",
        "application/x-gzip",
    }
)  # as the README promises: any other type (application/octet-stream too) is 415
WAITING = frozenset({JobState.RECEIVED, JobState.QUEUED})
FORMATS = ("rtstruct", "seg")  # ?format= of an upload: the DICOM object wanted besides (or as) the RTSTRUCT
POLL_S = 0.2


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    ctx = service()
    with upload_slot(ctx):
        return _create(ctx)


@contextmanager
def upload_slot(ctx: ServiceContext) -> Iterator[None]:
    """One of the service's upload slots for the request's body (429 when all are taken)."""
    if not ctx.uploads.acquire(blocking=False):
        raise HttpProblem(
            429,
            "busy",
            "too many uploads are being received at once; retry later",
            headers={"Retry-After": str(ctx.settings.retry_after_s)},
        )
    try:
        yield
    finally:
        ctx.uploads.release()


def _create(ctx: ServiceContext) -> tuple[Response, int, dict[str, str]]:
    wait = _number_arg("wait", 0.0, ctx.settings.max_wait_s)
    labels = _flag_arg("labels")
    wanted = _format_arg()
    if (request.content_length or 0) > ctx.settings.max_body_bytes:
        raise HttpProblem(
            413, "too-large", f"the body is larger than the limit of {ctx.settings.max_body_bytes} bytes"
        )
    job_id = admit(ctx, labels)
    log.info("upload %s: receiving", job_id)
    try:
        intake = _intake(ctx, job_id)
    except BaseException:
        discard(ctx, job_id)
        raise
    if wanted == "seg" and intake.kind == "nifti":
        discard(ctx, job_id)
        raise HttpProblem(
            400, "bad-parameter", "format=seg needs a DICOM CT series: a NIfTI has no instances"
        )
    meta = {
        "write_labels": labels or intake.kind == "nifti",
        "input_kind": intake.kind,
        "n_files": intake.n_files,
        "n_slices": intake.n_slices,
        "series_sha256": intake.series_key,
        "formats": ["rtstruct", "seg"] if wanted == "seg" else ["rtstruct"],
    }
    output = ctx.relative(
        ctx.job_dir(job_id) / ("labels.nii.gz" if intake.kind == "nifti" else "rtstruct.dcm")
    )
    job = ctx.store.transition(job_id, JobState.RECEIVED, JobState.QUEUED, output_path=output, meta=meta)
    log.info("upload %s: queued (%s, %d files)", job_id, intake.kind, intake.n_files)
    if wait > 0:
        job = _wait(ctx, job, wait)
        _raise_if_refused(job)
    location = url_for("v1.segmentations.get", job_id=job_id)
    return jsonify(describe(job)), (201 if job.state in FINAL else 202), {"Location": location}


@bp.get("/<job_id>")
def get(job_id: str) -> Response:
    return jsonify(describe(_job(job_id)))


@bp.get("/<job_id>/rtstruct")
def rtstruct(job_id: str) -> Response:
    job = _finished(job_id)
    if job.meta.get("input_kind") == "nifti":
        raise HttpProblem(404, "no-rtstruct", "a NIfTI upload yields a label map only: GET …/labels")
    path = _output(job, "rtstruct")
    return send_file(path, mimetype="application/dicom", as_attachment=True, download_name=f"{job.id}.dcm")


@bp.get("/<job_id>/seg")
def seg(job_id: str) -> Response:
    job = _finished(job_id)
    if "seg" not in (job.result.get("files") or {}):
        raise HttpProblem(404, "no-seg", "no DICOM SEG was requested: upload a DICOM series with ?format=seg")
    path = _output(job, "seg")
    return send_file(
        path, mimetype="application/dicom", as_attachment=True, download_name=f"{job.id}-seg.dcm"
    )


@bp.get("/<job_id>/labels")
def labels(job_id: str) -> Response:
    job = _finished(job_id)
    if not job.meta.get("write_labels"):
        raise HttpProblem(404, "no-labels", "no label map was requested: upload with ?labels=true")
    path = _output(job, "labels")
    return send_file(path, mimetype="application/gzip", as_attachment=True, download_name=f"{job.id}.nii.gz")


@bp.get("/<job_id>/preview.png")
def preview(job_id: str) -> Response:
    """The contour preview (PNG): drawn from the job's RTSTRUCT and CT on first request, then kept.

    A DICOM job's CT is not kept after its RTSTRUCT is sent, so its preview is the one the
    worker wrote (``[node] write_preview = true``).
    """
    ctx = service()
    found = ctx.store.find(job_id)
    if found is not None and found.source != "http":
        kept = ctx.job_dir(found.id) / PREVIEW_FILE
        if found.meta.get("results_purged"):
            raise HttpProblem(
                410, "results-purged", "the node deleted this job's outputs after [node] results_retention_h"
            )
        if not kept.is_file():
            raise HttpProblem(
                404, "no-preview", "no preview kept for this DICOM job: set [node] write_preview = true"
            )
        return send_file(kept, mimetype="image/png", download_name=f"{found.id}.png")
    job = _finished(job_id)
    if job.meta.get("input_kind") == "nifti":
        raise HttpProblem(404, "no-preview", "a NIfTI upload yields a label map only: no contours to preview")
    path = _preview(service(), job)
    return send_file(path, mimetype="image/png", download_name=f"{job.id}.png")


@bp.delete("/<job_id>")
def delete(job_id: str) -> tuple[str, int]:
    ctx = service()
    job = _job(job_id)
    if job.state == JobState.QUEUED:
        try:  # take it from the queue first, so that no worker claims it while its files go
            job = ctx.store.transition(job.id, JobState.QUEUED, JobState.FAILED, error="deleted")
        except JobError:
            job = ctx.store.get(job.id)
    if job.state not in FINAL:
        raise HttpProblem(409, "job-busy", f"the job is {job.state}; delete it once it has finished")
    ctx.remove_files(job.id)
    ctx.store.delete(job.id)
    log.info("job %s deleted with its files", job.id)
    return "", 204


# -- job history: the list of every job (DICOM and HTTP) and re-segmentation -----------------
MAX_PAGE = 200
SOURCES = ("dicom", "http")
DELIVERY = {JobState.SENDING: "pending", JobState.DONE: "delivered", JobState.DEAD_LETTER: "dead_letter"}


@bp.get("")
def history() -> Response:
    """Jobs newest first, filtered by ``state``, ``since``, ``until``, ``source``, paged by ``cursor``."""
    ctx = service()
    jobs, cursor = ctx.store.page(page_query())
    links = {"self": request.full_path.rstrip("?")}
    if cursor is not None:
        query: dict[str, Any] = {**request.args.to_dict(), "cursor": cursor}
        links["next"] = url_for("v1.segmentations.history", **query)
    return jsonify({"items": [summarize(ctx.store, job) for job in jobs], "next": cursor, "links": links})


@bp.post("/<job_id>/resegment")
def resegment(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """A new job for the series (or upload) of ``job_id``, from its kept input; it supersedes the latest."""
    ctx = service()
    if ctx.store.find(job_id) is None:
        raise HttpProblem(404, "no-such-job", f"no segmentation {job_id!r} (deleted or expired?)")
    job = ctx.store.resegment(job_id, ctx.data_dir)  # JobError: 409 with the reason (problems.py)
    AuditLog(ctx.data_dir / AUDIT_LOG).record(
        "resegment_requested", job=job.id, supersedes=job_id, series=job.series_key, by="api"
    )
    log.info("job %s: resegmented on request as job %s", job_id, job.id)
    location = url_for("v1.segmentations.get", job_id=job.id)
    return jsonify(summarize(ctx.store, job)), 202, {"Location": location}


def summarize(store: JobStore, job: Job) -> dict[str, Any]:
    """One item of the job list: what happened and why, times, model, flags and deliveries."""
    told = store.explain(job)
    links = {"resegment": url_for("v1.segmentations.resegment", job_id=job.id)}
    if job.source == "http":
        links["self"] = url_for("v1.segmentations.get", job_id=job.id)
    return {
        "id": job.id,
        "source": job.source,
        "calling_ae": job.meta.get("calling_ae"),
        "state": str(job.state),
        "outcome": told.outcome,
        "reason": told.reason,
        "received": _iso(job.created),
        "started": _iso(job.started) if job.started is not None else None,
        "finished": _iso(job.finished) if job.finished is not None else None,
        "turnaround_s": round(job.turnaround, 3) if job.turnaround is not None else None,
        "model_version": job.model_version,
        "structures": [
            {"name": s.get("name"), "flags": s.get("flags", [])} for s in job.result.get("structures", [])
        ],
        "flags": job.result.get("flags", []),
        "destinations": [
            {"name": d.get("name"), "delivery": DELIVERY.get(job.state, "not sent")}
            for d in job.meta.get("destinations", [])
        ],
        **{k: getattr(told, k) for k in ("duplicate_of", "supersedes", "superseded_by", "resolved_by")},
        "links": links,
    }


def page_query() -> PageQuery:
    """The job-list filters of this request's query string (the JSON list and the console share it)."""
    args = request.args
    limit = _int_arg("limit", 50, 1, MAX_PAGE)
    states = frozenset(_state(s) for s in args.get("state", "").split(",") if s)
    source = args.get("source")
    if source is not None and source not in SOURCES:
        raise HttpProblem(400, "bad-parameter", "source must be dicom or http")
    try:
        after = decode_cursor(args["cursor"]) if "cursor" in args else None
    except JobError as exc:
        raise HttpProblem(400, "bad-parameter", f"cursor: {exc}") from exc
    return PageQuery(limit, states, source, _time_arg("since"), _time_arg("until"), after)


def _state(name: str) -> JobState:
    try:
        return JobState(name)
    except ValueError:
        known = ", ".join(str(s) for s in JobState)
        raise HttpProblem(400, "bad-parameter", f"state {name!r} is not one of {known}") from None


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise HttpProblem(400, "bad-parameter", f"{name} must be a whole number from {lo} to {hi}")
    return int(raw)


def _time_arg(name: str) -> float | None:
    """An ISO 8601 date or date-time (UTC when it names no zone) as epoch seconds."""
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise HttpProblem(
            400, "bad-parameter", f"{name} must be an ISO 8601 date or date-time, e.g. 2026-01-31T08:00:00Z"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


# -- representation ---------------------------------------------------------------------------


def describe(job: Job) -> dict[str, Any]:
    """The JSON a client sees for a job (no paths, no patient data)."""
    result = dict(job.result)
    links = {"self": url_for("v1.segmentations.get", job_id=job.id)}
    files = result.get("files") or {}
    if job.state == JobState.DONE:
        for kind in ("rtstruct", "seg", "labels"):
            if kind in files:
                links[kind] = url_for(f"v1.segmentations.{kind}", job_id=job.id)
        if "rtstruct" in files:
            links["preview"] = url_for("v1.segmentations.preview", job_id=job.id)
    return {
        "id": job.id,
        "state": str(job.state),
        "created": _iso(job.created),
        "updated": _iso(job.updated),
        "attempts": job.attempts,
        "input": {k: job.meta[k] for k in ("input_kind", "n_files", "n_slices") if k in job.meta},
        "model_version": job.model_version or result.get("model_version"),
        "error": job.error,
        "timings": result.get("timings", {}),
        "structures": result.get("structures", []),
        "omitted": result.get("omitted", []),
        "flags": result.get("flags", []),
        "links": links,
    }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


# -- helpers ----------------------------------------------------------------------------------


def _job(job_id: str) -> Job:
    job = service().store.find(job_id)
    if job is None or job.source != "http":
        raise HttpProblem(404, "no-such-job", f"no segmentation {job_id!r} (deleted or expired?)")
    return job


def _raise_if_refused(job: Job) -> None:
    """A job failed because its input is unusable is answered as bad input (422, see problems.py)."""
    if job.state == JobState.FAILED and job.result.get("input_refused"):
        raise InputError(f"the segmentation {job.id} failed: {job.error}")


def _finished(job_id: str) -> Job:
    job = _job(job_id)
    _raise_if_refused(job)
    if job.state == JobState.FAILED:
        raise HttpProblem(409, "job-failed", f"the segmentation failed: {job.error}")
    if job.state != JobState.DONE:
        retry = {"Retry-After": "5"}
        raise HttpProblem(409, "job-not-done", f"the segmentation is {job.state}; try again", headers=retry)
    return job


def _output(job: Job, kind: str) -> Path:
    """The output file the worker recorded in ``result["files"]``; it must lie in the job's folder."""
    ctx = service()
    folder = ctx.job_dir(job.id).resolve()
    recorded = (job.result.get("files") or {}).get(kind)
    path = (ctx.data_dir / recorded).resolve() if isinstance(recorded, str) else None
    if path is None or not path.is_relative_to(folder) or not path.is_file():
        raise HttpProblem(404, "output-missing", f"the job has no {kind} file (expired or removed)")
    return path


def _preview(ctx: ServiceContext, job: Job) -> Path:
    """``jobs/<id>/preview.png`` (written by the worker, or rendered here once and cached)."""
    path = ctx.job_dir(job.id) / PREVIEW_FILE
    if path.is_file():
        return path
    rtstruct = _output(job, "rtstruct")
    ct = (ctx.data_dir / job.input_dir).resolve()
    if not ct.is_relative_to(ctx.job_dir(job.id).resolve()) or not ct.is_dir() or not any(ct.iterdir()):
        raise HttpProblem(404, "output-missing", "the job's CT series is no longer kept: no preview")
    # one render at a time: it takes seconds of CPU, and a second request waits for the first's file
    with ctx.cache.setdefault("preview-lock", threading.Lock()):
        if not path.is_file():
            flags = flags_by_structure(job.result.get("structures") or [])
            render_preview(ct, rtstruct, flags, path)
            log.info("job %s: contour preview rendered", job.id)
    return path


def admit(ctx: ServiceContext, labels: bool) -> str:
    """Reserve a place in the queue (429 when full) and create the job as ``received``."""
    job_id = uuid.uuid4().hex
    with ctx.admit:  # count and create together, so a burst cannot overshoot the maximum
        waiting = len(ctx.store.list(WAITING, source="http", limit=ctx.settings.queue_max + 1))
        if waiting >= ctx.settings.queue_max:
            raise HttpProblem(
                429,
                "queue-full",
                f"{waiting} segmentations are waiting (maximum {ctx.settings.queue_max}); retry later",
                headers={"Retry-After": str(ctx.settings.retry_after_s)},
            )
        key = hashlib.sha256(job_id.encode()).hexdigest()  # an upload's own key; the series hash is in meta
        ctx.job_dir(job_id).mkdir(parents=True)
        ctx.store.create("http", key, ctx.relative(ctx.job_dir(job_id) / "input"), job_id=job_id)
    return job_id


def _intake(ctx: ServiceContext, job_id: str) -> Intake:
    spool = ctx.job_dir(job_id) / "spool"
    spool.mkdir()
    req = cast(UploadRequest, request)  # the app's request_class
    req.spool_dir = spool
    parts = _parts(req, spool)
    try:
        return receive(parts, ctx.job_dir(job_id) / "input", ctx.limits, ctx.validate)
    finally:
        for part in parts:
            part.stream.close()
        shutil.rmtree(spool)


def _parts(req: UploadRequest, spool: Path) -> list[Part]:
    if req.mimetype == "multipart/form-data":
        files = [f for key in req.files for f in req.files.getlist(key)]
        return [Part(f.stream, f.filename or f"part {i}") for i, f in enumerate(files, start=1)]
    if req.mimetype in RAW_TYPES:
        body = spool / "body"
        with body.open("wb") as out:
            shutil.copyfileobj(req.stream, out, 1 << 20)
        return [Part(body.open("rb"), "the request body")]
    raise HttpProblem(
        415,
        "unsupported-media-type",
        f"Content-Type {req.mimetype or '(none)'} is not accepted: send multipart/form-data (DICOM files,"
        " one zip or one NIfTI) or a raw body declared application/zip, application/dicom or"
        " application/gzip",
    )


def discard(ctx: ServiceContext, job_id: str) -> None:
    """An upload that was refused leaves nothing behind."""
    ctx.remove_files(job_id)
    ctx.store.delete(job_id)


def _wait(ctx: ServiceContext, job: Job, seconds: float) -> Job:
    if not ctx.waiters.acquire(blocking=False):
        return job  # every waiting slot is taken: answer 202 at once rather than block the server
    try:
        deadline = time.monotonic() + seconds
        while job.state not in FINAL and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0)))
            job = ctx.store.get(job.id)
        return job
    finally:
        ctx.waiters.release()


def _number_arg(name: str, default: float, maximum: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= maximum:
        raise HttpProblem(400, "bad-parameter", f"{name} must be a number of seconds from 0 to {maximum:g}")
    return value


def _format_arg() -> str:
    raw = request.args.get("format", "rtstruct").lower()
    if raw not in FORMATS:
        raise HttpProblem(400, "bad-parameter", f"format must be {' or '.join(FORMATS)}, not {raw[:20]!r}")
    return raw


def _flag_arg(name: str) -> bool:
    raw = request.args.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise HttpProblem(400, "bad-parameter", f"{name} must be true or false")
    return raw in ("true", "1")
