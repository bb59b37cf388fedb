"""The web console (``/ui/``) via Flask's test client: sign-in, cookies, CSRF, filters, buttons, escaping."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from svc_helpers import TOKEN, make_settings

from rtseg.jobs import JobState, JobStore
from service.app import create_app

BASE = "https://localhost"  # the session cookie is Secure: the test client sends it over https only


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "state.db")


@pytest.fixture
def client(tmp_path: Path, store: JobStore) -> FlaskClient:
    app = create_app(make_settings(), store, tmp_path)
    return app.test_client()


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def _sign_in(client: FlaskClient) -> None:
    form = client.get("/ui/login", base_url=BASE).get_data(as_text=True)
    answer = client.post("/ui/login", data={"token": TOKEN, "csrf": _csrf(form)}, base_url=BASE)
    assert answer.status_code == 303 and answer.headers["Location"] == "/ui/"


def _job(store: JobStore, state: JobState = JobState.QUEUED, **meta: Any) -> str:
    job = store.create("dicom", "0123456789abcdef01234567", "incoming/x", meta={"calling_ae": "PACS", **meta})
    if state != JobState.RECEIVED:
        store.transition(job.id, JobState.RECEIVED, JobState.QUEUED)
    if state == JobState.FAILED:
        store.transition(job.id, JobState.QUEUED, JobState.FAILED, error="model failed")
    return job.id


def _post(client: FlaskClient, path: str, **form: str) -> Any:
    page = client.get("/ui/", base_url=BASE).get_data(as_text=True)
    return client.post(path, data={"csrf": _csrf(page), **form}, base_url=BASE)


# -- sign-in ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ui/", "/ui/jobs/abc", "/ui/model", "/ui/health"])
def test_every_page_without_a_session_redirects_to_the_sign_in(client: FlaskClient, path: str) -> None:
    answer = client.get(path, base_url=BASE)
    assert answer.status_code == 303
    assert answer.headers["Location"].startswith("/ui/login?next=")


def test_a_wrong_token_gets_a_401_sign_in_page(client: FlaskClient) -> None:
    form = client.get("/ui/login", base_url=BASE).get_data(as_text=True)
    answer = client.post("/ui/login", data={"token": "not-the-token", "csrf": _csrf(form)}, base_url=BASE)
    assert answer.status_code == 401
    assert "this token is not valid" in answer.get_data(as_text=True)
    assert client.get("/ui/", base_url=BASE).status_code == 303  # still signed out


def test_the_session_cookie_is_secure_httponly_samesite_strict(client: FlaskClient, tmp_path: Path) -> None:
    form = client.get("/ui/login", base_url=BASE).get_data(as_text=True)
    answer = client.post("/ui/login", data={"token": TOKEN, "csrf": _csrf(form)}, base_url=BASE)
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("rtseg_console=")
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/ui"):
        assert attribute in [part.strip() for part in cookie.split(";")], cookie
    assert TOKEN not in cookie
    key = tmp_path / "console" / "session.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert client.get("/ui/", base_url=BASE).status_code == 200


def test_the_api_sets_no_cookie_and_logout_ends_the_session(client: FlaskClient) -> None:
    _sign_in(client)
    assert "Set-Cookie" not in client.get("/healthz", base_url=BASE).headers
    assert _post(client, "/ui/logout").status_code == 303
    assert client.get("/ui/", base_url=BASE).status_code == 303


def test_a_post_without_the_csrf_token_is_refused(client: FlaskClient, store: JobStore) -> None:
    _sign_in(client)
    job_id = _job(store)
    answer = client.post(f"/ui/jobs/{job_id}/cancel", data={}, base_url=BASE)
    assert answer.status_code == 400
    assert "CSRF token" in answer.get_data(as_text=True)
    wrong = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": "forged"}, base_url=BASE)
    assert wrong.status_code == 400
    assert store.get(job_id).state == JobState.QUEUED


def test_pages_forbid_scripts_from_elsewhere(client: FlaskClient) -> None:
    _sign_in(client)
    answer = client.get("/ui/", base_url=BASE)
    assert answer.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "<script" not in answer.get_data(as_text=True)


# -- the job list -----------------------------------------------------------------------------


def test_the_list_shows_source_state_reason_and_filters_by_state(
    client: FlaskClient, store: JobStore
) -> None:
    _sign_in(client)
    queued, failed = _job(store), _job(store, JobState.FAILED)
    page = client.get("/ui/", base_url=BASE).get_data(as_text=True)
    assert queued[:8] in page and failed[:8] in page and "PACS" in page and "model failed" in page
    only_failed = client.get("/ui/?state=failed", base_url=BASE).get_data(as_text=True)
    assert failed[:8] in only_failed and queued[:8] not in only_failed


def test_the_filter_form_s_empty_fields_are_dropped_and_a_bad_date_is_a_400_page(
    client: FlaskClient, store: JobStore
) -> None:
    _sign_in(client)
    answer = client.get("/ui/?state=&source=dicom&since=&until=&limit=50", base_url=BASE)
    assert answer.status_code == 303 and answer.headers["Location"] == "/ui/?source=dicom&limit=50"
    bad = client.get("/ui/?since=yesterday", base_url=BASE)
    assert bad.status_code == 400
    assert "since must be an ISO 8601 date" in bad.get_data(as_text=True)
    _job(store)
    future = client.get("/ui/?since=2999-01-01", base_url=BASE).get_data(as_text=True)
    assert "No jobs match these filters" in future


def test_the_list_pages_with_a_cursor(client: FlaskClient, store: JobStore) -> None:
    _sign_in(client)
    ids = [_job(store) for _ in range(3)]
    first = client.get("/ui/?limit=2", base_url=BASE).get_data(as_text=True)
    older = re.search(r'href="([^"]+)" rel="next"', first)
    assert older and ids[2][:8] in first and ids[0][:8] not in first
    second = client.get(older.group(1).replace("&amp;", "&"), base_url=BASE).get_data(as_text=True)
    assert ids[0][:8] in second and ids[2][:8] not in second


def test_a_reason_with_markup_is_escaped(client: FlaskClient, store: JobStore) -> None:
    _sign_in(client)
    job = store.create("http", "f" * 24, "jobs/x/input")
    store.transition(job.id, JobState.RECEIVED, JobState.FAILED, error="<script>alert(1)</script>")
    for path in ("/ui/", f"/ui/jobs/{job.id}"):
        page = client.get(path, base_url=BASE).get_data(as_text=True)
        assert "<script>alert(1)</script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# -- a job's page and its buttons -------------------------------------------------------------


def test_cancel_takes_a_queued_job_off_the_queue(client: FlaskClient, store: JobStore) -> None:
    _sign_in(client)
    job_id = _job(store)
    assert "Cancel</button>" in client.get(f"/ui/jobs/{job_id}", base_url=BASE).get_data(as_text=True)
    answer = _post(client, f"/ui/jobs/{job_id}/cancel")
    assert answer.status_code == 303
    assert store.get(job_id).state == JobState.SKIPPED
    page = client.get(answer.headers["Location"], base_url=BASE).get_data(as_text=True)
    assert "cancelled by operator" in page and "Cancel</button>" not in page


def test_resegment_queues_a_new_job_that_supersedes(
    client: FlaskClient, store: JobStore, tmp_path: Path
) -> None:
    _sign_in(client)
    (tmp_path / "incoming" / "x").mkdir(parents=True)
    (tmp_path / "incoming" / "x" / "abc.dcm").write_bytes(b"kept instance")
    job_id = _job(store, JobState.FAILED)
    answer = _post(client, f"/ui/jobs/{job_id}/resegment")
    assert answer.status_code == 303
    new_id = answer.headers["Location"].rsplit("/", 1)[1]
    assert new_id != job_id and store.get(new_id).state == JobState.QUEUED
    assert store.get(new_id).meta["supersedes"] == job_id
    page = client.get(answer.headers["Location"], base_url=BASE).get_data(as_text=True)
    assert f"queued job {new_id}: it supersedes job {job_id}" in page


def test_resegment_without_kept_instances_says_send_it_again(client: FlaskClient, store: JobStore) -> None:
    _sign_in(client)
    job_id = _job(store, JobState.FAILED)
    answer = _post(client, f"/ui/jobs/{job_id}/resegment")
    page = client.get(answer.headers["Location"], base_url=BASE).get_data(as_text=True)
    assert "cannot resegment" in page and "send the series to the node again" in page


def test_the_job_page_has_structures_audit_trail_and_no_preview_without_the_route(
    client: FlaskClient, store: JobStore, tmp_path: Path
) -> None:
    _sign_in(client)
    job_id = _job(store)
    store.claim_next()
    structures = [{"name": "Liver", "volume_ml": 612.4, "n_contours": 31, "flags": ["volume 612.4 ml high"]}]
    store.transition(job_id, JobState.RUNNING, JobState.DONE, result={"structures": structures})
    audit = tmp_path / "audit" / "audit.log"
    audit.parent.mkdir()
    events = [
        {"time": "2026-12-03T10:00:00+0000", "event": "series_queued", "job": job_id, "instances": 40},
        {"time": "2026-12-03T10:00:01+0000", "event": "series_queued", "job": "another", "instances": 9},
    ]
    audit.write_text("".join(json.dumps(e) + "\n" for e in events))
    page = client.get(f"/ui/jobs/{job_id}", base_url=BASE).get_data(as_text=True)
    assert "Liver" in page and "612.4" in page and "31" in page and "volume 612.4 ml high" in page
    assert "series_queued" in page and "instances=40" in page and "instances=9" not in page
    assert "no preview" in page


def test_the_preview_comes_from_the_api_route_for_a_signed_in_console(
    tmp_path: Path, store: JobStore
) -> None:
    app = create_app(make_settings(), store, tmp_path)
    client = app.test_client()
    job_id = _job(store)
    store.claim_next()
    store.transition(job_id, JobState.RUNNING, JobState.DONE)
    assert client.get(f"/ui/jobs/{job_id}/preview.png", base_url=BASE).status_code == 303
    _sign_in(client)
    page = client.get(f"/ui/jobs/{job_id}", base_url=BASE).get_data(as_text=True)
    assert f'<img class="preview" src="/ui/jobs/{job_id}/preview.png"' in page
    missing = client.get(f"/ui/jobs/{job_id}/preview.png", base_url=BASE)
    assert missing.status_code == 404 and "write_preview" in missing.get_json()["detail"]
    kept = tmp_path / "jobs" / job_id / "preview.png"  # what the worker writes with [node] write_preview
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(b"\x89PNG\r\n\x1a\n kept by the worker")
    answer = client.get(f"/ui/jobs/{job_id}/preview.png", base_url=BASE)
    assert answer.status_code == 200 and answer.data == kept.read_bytes()
    api = client.get(f"/v1/segmentations/{job_id}/preview.png", headers={"Authorization": f"Bearer {TOKEN}"})
    assert api.status_code == 200 and api.data == kept.read_bytes()


# -- through waitress: its token check before the body must let the console's small forms in ------


def test_the_sign_in_form_reaches_the_console_through_waitress(serve: Any) -> None:
    running = serve()
    form = requests.get(f"{running.url}/ui/login", timeout=30)
    # a browser sends the Secure cookie back to http://127.0.0.1 (a secure context); requests does not
    cookie = form.headers["Set-Cookie"].split(";", 1)[0]
    answer = requests.post(
        f"{running.url}/ui/login",
        data={"token": TOKEN, "csrf": _csrf(form.text)},
        headers={"Cookie": cookie},
        allow_redirects=False,
        timeout=30,
    )
    assert answer.status_code == 303 and answer.headers["Location"] == "/ui/"


def test_waitress_still_refuses_a_large_body_without_a_token_under_ui(serve: Any) -> None:
    running = serve()
    body = b"token=x&csrf=y&pad=" + b"a" * (64 << 10)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = requests.post(f"{running.url}/ui/login", data=body, headers=headers, timeout=30)
    assert answer.status_code == 401
    assert answer.headers["Content-Type"] == "application/problem+json"


# -- the model and health pages ---------------------------------------------------------------


def test_the_model_page_shows_readable_provenance_and_the_registry_with_its_gate(
    tmp_path: Path, store: JobStore
) -> None:
    from rtseg.model.gate import GATE_LOG
    from rtseg.model.registry import Registry

    registry = Registry(tmp_path)
    current = registry.ensure()
    gate = {"time": "2026-12-01T10:00:00+00:00", "candidate": "site/r3/abc", "accepted": False}
    (registry.root / GATE_LOG).write_text(json.dumps(gate) + "\n")
    client = create_app(make_settings(), store, tmp_path, registry.link).test_client()
    _sign_in(client)
    page = client.get("/ui/model", base_url=BASE).get_data(as_text=True)
    assert "rtseg-peds-abdomen" in page and "NOT FOR CLINICAL USE" in page
    assert "{&#39;kind&#39;" not in page and "{'kind'" not in page  # no raw Python dicts
    assert f"{current.version} (current)" in page
    assert "candidate=site/r3/abc" in page and "accepted=False" in page


def test_the_health_page_shows_checks_queue_and_the_last_delivery_per_destination(
    client: FlaskClient, store: JobStore, tmp_path: Path
) -> None:
    from rtseg.deliveries import DeliveryStore

    _sign_in(client)
    deliveries = DeliveryStore(tmp_path / "state.db")
    jobs = [_job(store, destinations=[{"name": "TPS"}, {"name": "PACS"}]) for _ in range(2)]
    for job_id in jobs:
        deliveries.ensure(job_id, ["TPS", "PACS"])
        deliveries.acked(job_id, "PACS")
    deliveries.failed(jobs[1], "TPS", "association rejected", 0.0, dead=True)
    deliveries.acked(jobs[0], "TPS")  # the newest change at TPS: job 0 went through
    page = client.get("/ui/health", base_url=BASE).get_data(as_text=True)
    assert "no worker pool attached to this server" in page  # the same checks as /readyz
    assert "queued 2" in page
    rows = re.findall(r'<tr><td>(\w+)</td><td><a href="/ui/jobs/\w+">(\w+)</a></td><td>(\w+)</td>', page)
    assert rows == [("PACS", jobs[1][:8], "acked"), ("TPS", jobs[0][:8], "acked")]


def test_retry_sends_a_dead_letter_back_to_the_sender_and_audits_it(
    client: FlaskClient, store: JobStore, tmp_path: Path
) -> None:
    from rtseg.audit import AUDIT_LOG, read_entries
    from rtseg.deliveries import PENDING, DeliveryStore

    _sign_in(client)
    job_id = _job(store, destinations=[{"name": "TPS"}])
    store.claim_next()
    store.transition(job_id, JobState.RUNNING, JobState.SENDING)
    store.transition(job_id, JobState.SENDING, JobState.DEAD_LETTER, error="TPS refused the association")
    deliveries = DeliveryStore(tmp_path / "state.db")
    deliveries.ensure(job_id, ["TPS"])
    deliveries.failed(job_id, "TPS", "association rejected", 0.0, dead=True)
    page = client.get(f"/ui/jobs/{job_id}", base_url=BASE).get_data(as_text=True)
    assert "Retry delivery</button>" in page and "association rejected" in page
    answer = _post(client, f"/ui/jobs/{job_id}/retry")
    assert answer.status_code == 303
    assert store.get(job_id).state == JobState.SENDING
    assert [d.state for d in deliveries.for_job(job_id)] == [PENDING]
    page = client.get(answer.headers["Location"], base_url=BASE).get_data(as_text=True)
    assert "deliveries to TPS requeued" in page and "Retry delivery</button>" not in page
    events = [e for e in read_entries(tmp_path / AUDIT_LOG) if e.get("job") == job_id]
    assert [e["event"] for e in events] == ["delivery_requeued"]


def test_retry_of_a_job_without_a_dead_delivery_says_so(client: FlaskClient, store: JobStore) -> None:
    _sign_in(client)
    job_id = _job(store)
    answer = _post(client, f"/ui/jobs/{job_id}/retry")
    page = client.get(answer.headers["Location"], base_url=BASE).get_data(as_text=True)
    assert "cannot retry" in page and "with no dead delivery to retry" in page
    assert store.get(job_id).state == JobState.QUEUED


def test_the_console_s_buttons_are_in_the_audit_trail(client: FlaskClient, store: JobStore) -> None:
    _sign_in(client)
    job_id = _job(store)
    _post(client, f"/ui/jobs/{job_id}/cancel")
    page = client.get(f"/ui/jobs/{job_id}", base_url=BASE).get_data(as_text=True)
    assert "job_cancelled" in page and "by=console" in page


def test_a_sign_in_whose_cookie_the_browser_dropped_says_why(client: FlaskClient) -> None:
    # over plain http to a host other than 127.0.0.1/localhost a browser drops the Secure cookie
    form = client.get("/ui/login", base_url=BASE).get_data(as_text=True)
    client.delete_cookie("rtseg_console", path="/ui")
    answer = client.post("/ui/login", data={"token": TOKEN, "csrf": _csrf(form)}, base_url=BASE)
    assert answer.status_code == 400
    assert "sent no console cookie" in answer.get_data(as_text=True)
    assert "https" in answer.get_data(as_text=True)


def test_a_dicom_jobs_outputs_deleted_by_retention_answer_410_with_the_reason(
    client: FlaskClient, store: JobStore
) -> None:
    """``[node] results_retention_h`` deleted jobs/<id>/: the API says so instead of "set write_preview"."""
    from svc_helpers import AUTH

    job_id = _job(store)
    store.transition(job_id, JobState.QUEUED, JobState.RUNNING)
    job = store.transition(job_id, JobState.RUNNING, JobState.DONE, result={"files": {"rtstruct": "x"}})
    store.update(job_id, meta={**job.meta, "results_purged": True})
    answer = client.get(f"/v1/segmentations/{job_id}/preview.png", headers=AUTH, base_url=BASE)
    assert answer.status_code == 410, answer.get_data(as_text=True)
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert "after [node] results_retention_h" in answer.get_json()["detail"]
