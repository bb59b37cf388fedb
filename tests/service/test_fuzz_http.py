"""HTTP fuzz from the OpenAPI description (schemathesis' Python API against a live waitress server).

``test_schema.py`` runs the CLI with schemathesis' own conformance checks; this
test adds what they do not check: every error, for valid and invalid requests
alike, is an RFC 9457 problem, and no request is answered with a 5xx. Seeded
(derandomized) and bounded to 50 examples per operation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.transport.serialization import serialize_binary
from svc_helpers import AUTH, Running, make_settings

from rtseg.jobs import JobStore
from service.app import create_app
from service.openapi import describe_api
from service.problems import PROBLEM_JSON
from service.server import HttpServer

MAX_EXAMPLES = 50


@schemathesis.serializer("application/zip", "application/gzip", "application/dicom", "multipart/related")
def _raw_bytes(ctx: Any, value: Any) -> bytes:
    # the uploads' media types: send the generated (or negative, non-binary) body as bytes
    return serialize_binary(value)


# the description the server serves, built from the same settings as the live server below
schema = schemathesis.openapi.from_dict(describe_api(make_settings()))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES, deterministic=True
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One waitress server for every operation's examples (no worker: uploads stay queued)."""
    data_dir = tmp_path_factory.mktemp("fuzz-http")
    store = JobStore(data_dir / "state.db")
    settings = make_settings()
    server = HttpServer(create_app(settings, store, data_dir, worker_alive=lambda: True), settings, port=0)
    server.start()
    yield Running(server, store, data_dir, settings)
    server.stop()
    store.close()


def check_problem(response: Any) -> None:
    """No 5xx; a 4xx is a problem JSON whose status is the response's."""
    where = f"{response.request.method} {response.request.url}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis: lower-case, lists
    assert content_type.startswith(PROBLEM_JSON), f"{where}: {response.status_code} {content_type}"
    body = response.json()
    assert {"type", "title", "status"} <= body.keys(), f"{where}: {body}"
    assert body["status"] == response.status_code, f"{where}: {body}"


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_error_is_a_problem_and_none_is_a_server_error(case: Any, live: Running) -> None:
    check_problem(case.call(base_url=live.url, headers=AUTH, timeout=60))
    check_problem(case.call(base_url=live.url, timeout=60))  # and without the token
