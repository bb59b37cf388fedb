"""``/metrics``: Prometheus exposition of the process's registry (open, like the health endpoints)."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.context import service

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(service().telemetry.registry), content_type=CONTENT_TYPE_LATEST)
