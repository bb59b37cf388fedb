"""``/healthz`` (the process answers) and ``/readyz`` (it can do its work); both open, no token."""

from __future__ import annotations

import shutil
from typing import Any

from flask import Blueprint, Response, jsonify

from rtseg.errors import RtsegError
from service.context import ServiceContext, service
from service.model import model_info
from service.problems import problem

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    checks = readiness(service())
    failed = [f"{name}: {c['detail']}" for name, c in checks.items() if not c["ok"]]
    if failed:  # an RFC 9457 problem that says what is missing, with every check
        return problem(
            503, "Service Unavailable", "; ".join(failed), slug="not-ready", extra={"checks": checks}
        ), 503
    return jsonify({"status": "ready", "checks": checks}), 200


def readiness(ctx: ServiceContext) -> dict[str, dict[str, Any]]:
    """Every check of ``/readyz`` (model, disk, worker, jobs): ``ok`` and a ``detail`` in words."""
    return {"model": _model(ctx), "disk": _disk(ctx), "worker": _worker(ctx), "jobs": _jobs(ctx)}


def _model(ctx: ServiceContext) -> dict[str, Any]:
    try:
        info = model_info(ctx)
    except RtsegError as exc:
        return {"ok": False, "detail": exc.message}
    return {"ok": True, "detail": f"{info['name']} {info['version']} ({info['hash']})"}


def _disk(ctx: ServiceContext) -> dict[str, Any]:
    free = shutil.disk_usage(ctx.data_dir).free
    need = ctx.settings.min_free_bytes
    return {"ok": free >= need, "detail": f"{free >> 20} MiB free, {need >> 20} MiB needed"}


def _worker(ctx: ServiceContext) -> dict[str, Any]:
    if ctx.workers is not None:
        status = ctx.workers.status()
        detail = f"{status.ready} of {status.configured} workers running"
        if status.missing:
            detail += f"; missing: {', '.join(status.missing)}"
        return {"ok": not status.missing, "detail": detail}
    if ctx.worker_alive is None:
        return {"ok": False, "detail": "no worker pool attached to this server"}
    alive = ctx.worker_alive()
    return {"ok": alive, "detail": "running" if alive else "the worker pool is not running"}


def _jobs(ctx: ServiceContext) -> dict[str, Any]:
    counts = ctx.store.counts()
    return {"ok": True, "detail": f"{counts['queued']} queued, {counts['running']} running"}
