"""When a site takes part: a daily window from its configuration (e.g. nightly 22:00-06:00).

Inside the window the site's SuperNode runs and joins whatever round the
coordinator starts; outside it, the SuperNode is stopped. No operator action.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtseg.errors import FederationError

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
    ca: Path | None = None  # the federation's CA certificate: TLS to the coordinator
    key: Path | None = None  # the site's ECDSA private key (SuperNode authentication)
    window: Window = Window(dt.time(0, 0), dt.time(0, 0))
    threads: int = 1
    nice: int = 10
    insecure: bool = False  # no TLS: only when said explicitly (loopback tests and demos)

    def __post_init__(self) -> None:
        if self.ca is None and not self.insecure:
            raise FederationError(
                "no `ca`: a site joins its coordinator only over TLS; give the federation's CA certificate"
                " (`ca` in [federation], --ca), or for a loopback test say insecure = true (--insecure)"
            )
        if self.ca is not None and self.insecure:
            raise FederationError("both `ca` and insecure = true: choose TLS, or no TLS for a loopback test")

    @classmethod
    def from_toml(cls, path: Path) -> SiteSettings:
        doc: dict[str, Any] = tomllib.loads(path.read_text()).get("federation", {})
        return cls.from_mapping(doc, source=str(path))

    @classmethod
    def from_mapping(
        cls, doc: Mapping[str, Any], source: str, node_data_dir: Path | None = None
    ) -> SiteSettings:
        """From a ``[federation]`` table.

        Inside ``rtseg serve`` (``node_data_dir`` given) ``data_dir`` defaults to
        ``<data>/site-data`` (where the closed loop adds approved cases) and
        ``work_dir`` to ``<data>/federation``.
        """
        defaults = {}
        if node_data_dir is not None:
            defaults = {"data_dir": node_data_dir / "site-data", "work_dir": node_data_dir / "federation"}
        insecure = doc.get("insecure", False)
        if not isinstance(insecure, bool):
            bad = f"[federation] insecure must be true or false, got {insecure!r}"
            raise FederationError(bad, source=source)
        try:
            return cls(
                coordinator=str(doc["coordinator"]),
                site_id=str(doc["site_id"]),
                data_dir=Path(doc["data_dir"]) if doc.get("data_dir") else defaults["data_dir"],
                work_dir=Path(doc["work_dir"]) if doc.get("work_dir") else defaults["work_dir"],
                ca=Path(doc["ca"]) if doc.get("ca") else None,
                key=Path(doc["key"]) if doc.get("key") else None,
                window=Window.parse(str(doc.get("window", "always"))),
                threads=int(doc.get("threads", 1)),
                nice=int(doc.get("nice", 10)),
                insecure=insecure,
            )
        except FederationError as exc:
            raise FederationError(f"[federation] {exc.message}", source=source) from exc
        except KeyError as exc:
            raise FederationError(f"[federation] lacks {exc}", source=source) from exc
        except (TypeError, ValueError) as exc:
            raise FederationError(f"[federation] has a bad value: {exc}", source=source) from exc

    def describe(self) -> str:
        security = "TLS" if self.ca else "INSECURE (no TLS)"
        window = (
            "always"
            if self.window.start == self.window.end
            else f"{self.window.start:%H:%M}-{self.window.end:%H:%M}"
        )
        return (
            f"federation: site {self.site_id} joins rounds of {self.coordinator} ({security}),"
            f" window {window}, training data {self.data_dir.resolve()}"
        )


def start_site(settings: SiteSettings, poll: float = 30.0) -> Callable[[], None]:
    """:func:`run_site` in a background thread; returns the function that stops it."""
    stop = threading.Event()
    thread = threading.Thread(target=run_site, args=(settings, stop, poll), name="rtseg-federation-site")
    thread.start()

    def stop_site() -> None:
        stop.set()
        thread.join()

    return stop_site


def run_site(settings: SiteSettings, stop: threading.Event, poll: float = 30.0) -> None:
    """Keep the site's SuperNode running inside its window and stopped outside, until ``stop``."""
    from rtseg.federation.processes import start_supernode
    from rtseg.federation.processes import stop as stop_process
    from rtseg.federation.simulate import free_port

    if settings.insecure:
        log.warning(
            "site %s joins %s WITHOUT TLS (insecure = true in its configuration): for loopback tests only,"
            " never across a network",
            settings.site_id,
            settings.coordinator,
        )
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
                    insecure=settings.insecure,
                )
            elif not inside and node is not None:
                log.info("site %s: participation window closed, stopping the SuperNode", settings.site_id)
                stop_process(node)
                node = None
            stop.wait(poll)
    finally:
        if node is not None:
            stop_process(node)
