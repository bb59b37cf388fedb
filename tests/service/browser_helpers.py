"""A real browser for the console's tests: Debian's headless Chromium, driven over the DevTools Protocol.

No driver and no browser download: Chromium listens on a DevTools port of its
own choosing (``--remote-debugging-port=0``, written to ``DevToolsActivePort``)
and a small synchronous client speaks CDP over its websocket.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Page:
    """One browser tab: navigate, read the DOM, click, screenshot, read cookies."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive in between: skip them
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def eval(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.settle()

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the page that is loading now has loaded."""
        time.sleep(0.2)
        deadline = time.monotonic() + timeout
        while self.eval("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not load in {timeout:g} s")
            time.sleep(0.1)

    @property
    def path(self) -> str:
        return str(self.eval("location.pathname + location.search"))

    def text(self) -> str:
        return str(self.eval("document.body.innerText"))

    def screenshot(self, path: Path) -> Path:
        height = int(self.eval("document.documentElement.scrollHeight"))
        clip = {"x": 0, "y": 0, "width": 1280, "height": min(max(height, 600), 2400), "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def cookies(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("Network.getCookies")["cookies"]
        return found


@contextmanager
def chromium(profile: Path) -> Iterator[Page]:
    """A headless Chromium with a fresh profile in ``profile``; its first tab."""
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--no-first-run",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = _devtools_port(profile / "DevToolsActivePort", proc)
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        tab = next(t for t in targets if t["type"] == "page")
        with connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            page = Page(ws)
            page.call("Page.enable")
            page.call("Network.enable")
            yield page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _devtools_port(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"chromium exited with status {proc.returncode} before it listened")
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines and lines[0].isdigit():
            return int(lines[0])
        time.sleep(0.2)
    raise AssertionError(f"chromium wrote no DevTools port in {timeout:g} s")
