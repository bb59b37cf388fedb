"""When a site takes part: a daily window from its configuration (e.g. nightly 22:00-06:00).

Inside the window the site's SuperNode runs and joins whatever round the
coordinator starts; outside it, the SuperNode is stopped. No operator action.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtseg.federation import FederationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> Window:
        """``HH:MM-HH:MM`` (may wrap past midnight); ``always`` for the whole day."""
        if text == "always":
            return cls(dt.time(0, 0), dt.time(0, 0))
        try:
            a, b = text.split("-")
            return cls(dt.time.fromisoformat(a.strip()), dt.time.fromisoformat(b.strip()))
        except ValueError as exc:
            raise FederationError(f"participation window {text!r} is not HH:MM-HH:MM") from exc

    def contains(self, now: dt.time) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end


@dataclass(frozen=True)
class SiteSettings:
    """The ``[federation]`` table of a site's TOML configuration."""

    coordinator: str  # host:port of the SuperLink
    site_id: str
    data_dir: Path
    work_dir: Path
    ca: Path | None = None  # None: insecure (tests and demos only)
    key: Path | None = None  # the site's ECDSA private key (SuperNode authentication)
    window: Window = Window(dt.time(0, 0), dt.time(0, 0))
    threads: int = 1
    nice: int = 10

    @classmethod
    def from_toml(cls, path: Path) -> SiteSettings:
        doc: dict[str, Any] = tomllib.loads(path.read_text()).get("federation", {})
        try:
            return cls(
                coordinator=str(doc["coordinator"]),
                site_id=str(doc["site_id"]),
                data_dir=Path(doc["data_dir"]),
                work_dir=Path(doc["work_dir"]),
                ca=Path(doc["ca"]) if doc.get("ca") else None,
                key=Path(doc["key"]) if doc.get("key") else None,
                window=Window.parse(str(doc.get("window", "always"))),
                threads=int(doc.get("threads", 1)),
                nice=int(doc.get("nice", 10)),
            )
        except KeyError as exc:
            raise FederationError(f"[federation] lacks {exc}", source=str(path)) from exc


def run_site(settings: SiteSettings, stop: threading.Event, poll: float = 30.0) -> None:
    """Keep the site's SuperNode running inside its window and stopped outside, until ``stop``."""
    from rtseg.federation.processes import start_supernode
    from rtseg.federation.processes import stop as stop_process
    from rtseg.federation.simulate import free_port

    node = None
    node_config = {
        "site-id": settings.site_id,
        "data-dir": str(settings.data_dir.resolve()),
        "work-dir": str(settings.work_dir.resolve()),
        "threads": settings.threads,
        "nice": settings.nice,
    }
    try:
        while not stop.is_set():
            inside = settings.window.contains(dt.datetime.now().time())
            if inside and (node is None or node.poll() is not None):
                log.info("site %s: participation window open, starting the SuperNode", settings.site_id)
                node = start_supernode(
                    settings.work_dir / "flwr-home",
                    settings.coordinator,
                    free_port(),
                    node_config,
                    settings.ca,
                    settings.key,
                )
            elif not inside and node is not None:
                log.info("site %s: participation window closed, stopping the SuperNode", settings.site_id)
                stop_process(node)
                node = None
            stop.wait(poll)
    finally:
        if node is not None:
            stop_process(node)
