"""``/openapi.json``: the OpenAPI 3.1 description of this API.

This is the one description of the routes; ``tests/service/test_openapi.py``
checks that every Flask route is in it (and nothing else), and schemathesis
checks the live server's answers against it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

import rtseg
from service.context import service
from service.settings import HttpSettings

bp = Blueprint("openapi", __name__)

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
JOB = {"application/json": {"schema": {"$ref": "#/components/schemas/Segmentation"}}}
BINARY = {"type": "string", "format": "binary"}


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(describe_api(service().settings))


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": PROBLEM}
    if headers:
        answer["headers"] = headers
    return answer


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed request or upload (damaged zip, unsafe path, symlink, bad parameter)",
        401: "Missing or invalid bearer token",
        404: "No such segmentation (or no such output)",
        405: "Method not allowed",
        409: "The segmentation is not in a state that allows this",
        410: "The node deleted this DICOM job's preview after [node] results_retention_h",
        413: "Body, unpacked size, file count or compression ratio over the limit",
        415: "Unsupported content type",
        422: "Not one complete CT series (several series, non-CT, missing slices, non-DICOM files)",
        429: "The queue is full",
    }
    answers: dict[str, Any] = {}
    for code in codes:
        headers: dict[str, Any] | None = None
        if code == 401:
            headers = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        if code == 429:
            headers = {"Retry-After": {"schema": {"type": "string"}, "required": True}}
        answers[str(code)] = _problem(text[code], headers)
    return answers


def _job_id() -> dict[str, Any]:
    return {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _paths(settings: HttpSettings) -> dict[str, Any]:
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "/v1/segmentations": {"post": _post(settings, auth), "get": _history(auth)},
        "/v1/segmentations/{job_id}/resegment": _resegment(auth),
        "/v1/segmentations/{job_id}": {
            "parameters": [_job_id()],
            "get": {
                "summary": "State, timings, model version, structures, flags and error of a segmentation",
                "operationId": "getSegmentation",
                "security": auth,
                "responses": {
                    "200": {"description": "The segmentation", "content": JOB},
                    **_errors(401, 404),
                },
            },
            "delete": {
                "summary": "Delete a finished or queued segmentation with its upload and outputs",
                "operationId": "deleteSegmentation",
                "security": auth,
                "responses": {"204": {"description": "Deleted"}, **_errors(401, 404, 409)},
            },
        },
        "/v1/segmentations/{job_id}/rtstruct": _download(
            "RTSTRUCT", "application/dicom", "getRtstruct", auth
        ),
        "/v1/segmentations/{job_id}/seg": _download("DICOM SEG", "application/dicom", "getSeg", auth),
        "/v1/segmentations/{job_id}/labels": _download("label map", "application/gzip", "getLabels", auth),
        "/v1/segmentations/{job_id}/preview.png": _download(
            "contour preview", "image/png", "getPreview", auth
        ),
        "/v1/model": {
            "get": {
                "summary": "The model: name, version, hash, structures with colours, provenance",
                "operationId": "getModel",
                "security": auth,
                "responses": {
                    "200": {
                        "description": "The model",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}},
                    },
                    "503": _problem("The model cannot be loaded"),
                    **_errors(401),
                },
            }
        },
        **_stow_paths(auth),
        **_open_paths(),
    }


def _stow_paths(auth: list[dict[str, list[str]]]) -> dict[str, Any]:
    """DICOMweb STOW-RS (PS3.18 §10.5): the Store Instances Response is DICOM JSON, not a problem."""
    answer = {"application/dicom+json": {"schema": {"type": "object"}}}
    headers = {
        "Link": {
            "description": '`</v1/segmentations/{id}>; rel="related"` per job',
            "schema": {"type": "string"},
        },
        "Warning": {"description": '`299 rtseg "<reason>"` per refusal', "schema": {"type": "string"}},
    }

    def operation(operation_id: str, summary: str) -> dict[str, Any]:
        return {
            "summary": summary,
            "operationId": operation_id,
            "security": auth,
            "requestBody": {
                "required": True,
                "description": 'multipart/related; type="application/dicom": one DICOM instance per part',
                "content": {"multipart/related": {"schema": BINARY}},
            },
            "responses": {
                "200": {"description": "Every instance stored", "content": answer, "headers": headers},
                "202": {"description": "Some instances refused", "content": answer, "headers": headers},
                "409": {"description": "Every instance refused", "content": answer, "headers": headers},
                "406": _problem("The Accept header excludes application/dicom+json"),
                **_errors(400, 401, 413, 415, 429),
            },
        }

    study = {"name": "study", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/dicomweb/studies": {
            "post": operation("stowStudies", "STOW-RS: store CT instances; one job per complete CT series")
        },
        "/dicomweb/studies/{study}": {
            "parameters": [study],
            "post": operation("stowStudy", "STOW-RS into one study: instances of another study are refused"),
        },
    }


def _post(settings: HttpSettings, auth: list[dict[str, list[str]]]) -> dict[str, Any]:
    files = {"type": "array", "items": BINARY}
    return {
        "summary": "Upload a CT series (DICOM files or one zip) or a NIfTI CT and queue its segmentation",
        "operationId": "createSegmentation",
        "security": auth,
        "parameters": [
            {
                "name": "wait",
                "in": "query",
                "description": "Seconds to wait for the result before answering 202",
                "schema": {"type": "number", "minimum": 0, "maximum": settings.max_wait_s},
            },
            {
                "name": "labels",
                "in": "query",
                "description": "Also write a NIfTI label map",
                "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
            },
            {
                "name": "format",
                "in": "query",
                "description": "seg: also write a DICOM SEG (DICOM input only), at …/seg",
                "schema": {"type": "string", "enum": ["rtstruct", "seg"], "default": "rtstruct"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": files}, "required": ["file"]}
                },
                "application/zip": {"schema": BINARY},
                "application/dicom": {"schema": BINARY},
                "application/gzip": {"schema": BINARY},
            },
        },
        "responses": {
            "201": {"description": "Finished within ?wait", "content": JOB, "headers": _location()},
            "202": {"description": "Queued", "content": JOB, "headers": _location()},
            **_errors(400, 401, 413, 415, 422, 429),
        },
    }


def _history(auth: list[dict[str, list[str]]]) -> dict[str, Any]:
    def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "description": description, "schema": schema}

    when = {"type": "string", "format": "date-time"}
    return {
        "summary": "Every job (DICOM and HTTP), newest first: outcome and reason, times, deliveries",
        "operationId": "listSegmentations",
        "security": auth,
        "parameters": [
            query("limit", "Jobs per page", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}),
            query("cursor", "The `next` of the previous page", {"type": "string"}),
            query("state", "Comma-separated states", {"type": "string"}),
            query("since", "Received at or after (ISO 8601; UTC without a zone)", when),
            query("until", "Received before (ISO 8601; UTC without a zone)", when),
            query("source", "Which face received it", {"enum": ["dicom", "http"]}),
        ],
        "responses": {
            "200": {
                "description": "One page of jobs",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/SegmentationList"}}
                },
            },
            **_errors(400, 401),
        },
    }


def _resegment(auth: list[dict[str, list[str]]]) -> dict[str, Any]:
    item = {"application/json": {"schema": {"$ref": "#/components/schemas/HistoryItem"}}}
    return {
        "parameters": [_job_id()],
        "post": {
            "summary": "Segment the series (or upload) of a job again: a new job that supersedes it",
            "operationId": "resegmentSegmentation",
            "security": auth,
            "responses": {
                "202": {"description": "Queued", "content": item, "headers": _location()},
                **_errors(401, 404),
                "409": _problem("The series is still in progress, or its instances are gone (send it again)"),
            },
        },
    }


def _history_item() -> dict[str, Any]:
    text, when = {"type": "string"}, {"type": ["string", "null"], "format": "date-time"}
    nullable_text = {"type": ["string", "null"]}
    named = {"type": "object", "properties": {"name": nullable_text}}
    states = ["received", "queued", "running", "sending", "done", "failed", "dead_letter", "skipped"]
    flags = {"type": "array", "items": text}
    return {
        "type": "object",
        "properties": {
            "id": text,
            "source": {"enum": ["dicom", "http"]},
            "calling_ae": nullable_text,
            "state": {"enum": states},
            "outcome": text,
            "reason": nullable_text,
            "received": {"type": "string", "format": "date-time"},
            "started": when,
            "finished": when,
            "turnaround_s": {"type": ["number", "null"]},
            "model_version": nullable_text,
            "structures": {
                "type": "array",
                "items": {**named, "properties": {"name": nullable_text, "flags": flags}},
            },
            "flags": flags,
            "destinations": {
                "type": "array",
                "items": {
                    **named,
                    "properties": {
                        "name": nullable_text,
                        "delivery": {"enum": ["not sent", "pending", "delivered", "dead_letter"]},
                    },
                },
            },
            "duplicate_of": nullable_text,
            "supersedes": nullable_text,
            "superseded_by": nullable_text,
            "resolved_by": nullable_text,
            "links": {"type": "object", "additionalProperties": text},
        },
        "required": ["id", "source", "state", "outcome", "received", "links"],
    }


def _location() -> dict[str, Any]:
    return {"Location": {"schema": {"type": "string"}, "required": True}}


def _download(what: str, media: str, operation: str, auth: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "parameters": [_job_id()],
        "get": {
            "summary": f"Download the {what} of a finished segmentation",
            "operationId": operation,
            "security": auth,
            "responses": {
                "200": {"description": f"The {what}", "content": {media: {"schema": BINARY}}},
                **_errors(401, 404, 409, *((410,) if operation == "getPreview" else ())),
            },
        },
    }


def _open_paths() -> dict[str, Any]:
    def plain(summary: str, operation: str, content: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                "operationId": operation,
                "security": [],
                "responses": {"200": {"description": "OK", "content": content}, **extra},
            }
        }

    ready = {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}
    status = {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}
    return {
        "/healthz": plain("Liveness", "healthz", {"application/json": {"schema": status}}, {}),
        "/readyz": plain(
            "Readiness: model loadable, disk space, every configured worker running",
            "readyz",
            ready,
            {"503": _problem("Not ready: the detail names what is missing; `checks` has every check")},
        ),
        "/metrics": plain(
            "Prometheus metrics", "metrics", {"text/plain": {"schema": {"type": "string"}}}, {}
        ),
        "/openapi.json": plain("This description", "openapi", {"application/json": {"schema": {}}}, {}),
    }


def _schemas() -> dict[str, Any]:
    text, number = {"type": "string"}, {"type": "number"}
    nullable_text = {"type": ["string", "null"]}
    structure = {
        "type": "object",
        "properties": {
            "name": text,
            "volume_ml": number,
            "n_contours": {"type": "integer"},
            "flags": {"type": "array", "items": text},
        },
        "required": ["name"],
    }
    states = ["received", "queued", "running", "sending", "done", "failed", "dead_letter", "skipped"]
    check = {"type": "object", "properties": {"ok": {"type": "boolean"}, "detail": text}}
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details",
            "properties": {
                "type": text,
                "title": text,
                "status": {"type": "integer"},
                "detail": text,
                "instance": text,
            },
            "required": ["type", "title", "status"],
        },
        "Segmentation": {
            "type": "object",
            "properties": {
                "id": text,
                "state": {"enum": states},
                "created": {"type": "string", "format": "date-time"},
                "updated": {"type": "string", "format": "date-time"},
                "attempts": {"type": "integer"},
                "input": {
                    "type": "object",
                    "properties": {
                        "input_kind": {"enum": ["dicom", "nifti"]},
                        "n_files": {"type": "integer"},
                        "n_slices": {"type": "integer"},
                    },
                },
                "model_version": nullable_text,
                "error": nullable_text,
                "timings": {"type": "object", "additionalProperties": number},
                "structures": {"type": "array", "items": structure},
                "omitted": {"type": "array", "items": text},
                "flags": {"type": "array", "items": text},
                "links": {"type": "object", "additionalProperties": text, "required": ["self"]},
            },
            "required": ["id", "state", "created", "updated", "links"],
        },
        "HistoryItem": _history_item(),
        "SegmentationList": {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/HistoryItem"}},
                "next": {"type": ["string", "null"]},
                "links": {"type": "object", "additionalProperties": text},
            },
            "required": ["items", "next"],
        },
        "Model": {
            "type": "object",
            "properties": {
                "name": text,
                "version": text,
                "hash": text,
                "configuration": text,
                "folds": {"type": "array", "items": text},
                "structures": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": text,
                            "label": {"type": "integer"},
                            "color": {
                                "type": "array",
                                "items": {"type": "integer"},
                                "minItems": 3,
                                "maxItems": 3,
                            },
                            "rt_type": text,
                        },
                        "required": ["name", "label", "color"],
                    },
                },
                "federation_round": {"type": ["integer", "null"]},
                "provenance": {"type": "object"},
            },
            "required": ["name", "version", "hash", "structures"],
        },
        "Readiness": {
            "type": "object",
            "properties": {
                "status": {"const": "ready"},
                "checks": {"type": "object", "additionalProperties": check},
            },
            "required": ["status", "checks"],
        },
    }


def describe_api(settings: HttpSettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server with ``settings``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rtseg HTTP API",
            "version": rtseg.__version__,
            "description": "CT series in, organ-at-risk RTSTRUCT out. Errors are RFC 9457 problem details.",
        },
        "paths": _paths(settings),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
