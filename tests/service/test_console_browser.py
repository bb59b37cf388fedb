"""The console in a real browser: headless Chromium signs in to a running ``rtseg http`` and follows a job.

Screenshots of the list, job, model and health pages go to the test's folder
and to ``$RTSEG_TEST_ARTEFACTS`` when it is set (their paths are printed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from browser_helpers import CHROMIUM, Page, chromium
from svc_helpers import AUTH, TOKEN

from service.auth import token_digest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/setup.sh test)"),
]
JOB_TIMEOUT_S = 900  # a phantom series on a shared 2-core machine


@pytest.fixture
def rtseg_http(tmp_path: Path, free_port: int) -> Iterator[str]:
    """``rtseg http`` (waitress, default model, its own worker) on a free loopback port: its URL."""
    config = tmp_path / "rtseg.toml"
    config.write_text(
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\n[node]\ninference_threads = 1\n'
        f'[http]\nport = {free_port}\ntoken_sha256 = ["{token_digest(TOKEN)}"]\n'
    )
    command = [sys.executable, "-m", "rtseg_app", "http", "--config", str(config)]  # this checkout's CLI
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{free_port}"
    try:
        _wait_ready(url)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_chromium_signs_in_follows_a_job_to_done_and_sees_its_preview(
    rtseg_http: str, phantom_zip: bytes, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with chromium(tmp_path / "profile") as page:
        page.goto(f"{rtseg_http}/ui/")
        assert page.path == "/ui/login?next=/ui/"  # no session: the sign-in page
        _sign_in(page)
        assert page.path == "/ui/", page.text()
        cookie = next(c for c in page.cookies() if c["name"] == "rtseg_console")
        assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")

        job_id = _upload(rtseg_http, phantom_zip)
        _follow_to_done(page, f"{rtseg_http}/ui/jobs/{job_id}")
        assert "Liver" in page.text() and "Audit trail" in page.text()
        has_img = page.eval("document.querySelector('img.preview') !== null")
        if has_img:  # the preview route is there: the image must have loaded
            assert page.eval("document.querySelector('img.preview').naturalWidth") > 0
        else:
            assert "no preview" in page.text()
        saved = [page.screenshot(shots / "console-job.png")]

        page.goto(f"{rtseg_http}/ui/")
        assert job_id[:8] in page.text() and "segmented" in page.text()
        saved.insert(0, page.screenshot(shots / "console-jobs.png"))
        for name in ("model", "health"):
            page.goto(f"{rtseg_http}/ui/{name}")
            assert page.path == f"/ui/{name}"
            saved.append(page.screenshot(shots / f"console-{name}.png"))
        page.eval("document.querySelector('form.logout button').click()")  # a CSRF-checked form
        _wait_for_path(page, "/ui/login")
        page.goto(f"{rtseg_http}/ui/")
        assert page.path.startswith("/ui/login"), "still signed in after signing out"
    for path in saved:
        assert path.stat().st_size > 10_000  # a rendered page, not a blank image
        print(f"screenshot: {path}")
    _keep(saved)


def _sign_in(page: Page) -> None:
    page.eval(f"document.getElementById('token').value = {TOKEN!r}")
    page.eval("document.querySelector('form.login button').click()")
    deadline = time.monotonic() + 30
    while page.path.startswith("/ui/login") and time.monotonic() < deadline:
        time.sleep(0.2)
    page.settle()


def _wait_for_path(page: Page, prefix: str) -> None:
    deadline = time.monotonic() + 30
    while not page.path.startswith(prefix) and time.monotonic() < deadline:
        time.sleep(0.2)
    page.settle()


def _upload(url: str, body: bytes) -> str:
    headers = {**AUTH, "Content-Type": "application/zip"}
    answer = requests.post(f"{url}/v1/segmentations", data=body, headers=headers, timeout=300)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _follow_to_done(page: Page, job_url: str) -> None:
    """Reload the job's page, as an operator would, until it says done (or failed)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        page.goto(job_url)
        state = page.eval("document.querySelector('dd .state').textContent")
        if state in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert state == "done", page.text()


def _keep(shots: list[Path]) -> None:
    """Copies in ``$RTSEG_TEST_ARTEFACTS/console/`` when the run collects artefacts."""
    root = os.environ.get("RTSEG_TEST_ARTEFACTS")
    if not root:
        return
    folder = Path(root) / "console"
    folder.mkdir(parents=True, exist_ok=True)
    for path in shots:
        print(f"screenshot: {shutil.copy2(path, folder / path.name)}")


def _wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass  # not listening yet
        time.sleep(0.5)
    raise AssertionError(f"{url} was not ready in {timeout:g} s")
