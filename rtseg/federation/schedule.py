"""When a site takes part: a daily window from its configuration (e.g. nightly 22:00-06:00).

Inside the window the site's SuperNode runs and joins whatever round the
coordinator starts; outside it, the SuperNode is stopped. No operator action.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtseg.errors import FederationError, InputError
from rtseg.settings import (
    SITE_DATA_DIR,
    Parser,
    Table,
    load_settings,
    optional,
    parse_float,
    parse_int,
    parse_path,
    parse_str,
    parse_table,
)

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


MIN_MEMORY_GB = 2.0  # Python, torch and nnU-Net map about 1.4 GB before they train anything


def default_max_memory_gb() -> float:
    """Three quarters of this machine's memory (GB, one decimal): the rest stays with the node."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(MIN_MEMORY_GB, round(0.75 * total / 2**30, 1))


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
    partial_labels: str = "ignore"  # structures a case lacks: nnU-Net's ignore label, or "background"
    # address space the site's nnU-Net training may take: a coordinator's plans cannot make it take
    # the memory of the machine, which also runs the department's node
    max_memory_gb: float = field(default_factory=default_max_memory_gb)

    def __post_init__(self) -> None:
        if self.ca is None and not self.insecure:
            raise FederationError(
                "no `ca`: a site joins its coordinator only over TLS; give the federation's CA certificate"
                " (`ca` in [federation], --ca), or for a loopback test say insecure = true (--insecure)"
            )
        if self.ca is not None and self.insecure:
            raise FederationError("both `ca` and insecure = true: choose TLS, or no TLS for a loopback test")
        if not self.max_memory_gb >= MIN_MEMORY_GB:
            raise FederationError(
                f"max_memory_gb {self.max_memory_gb:g} is too little:"
                f" nnU-Net needs {MIN_MEMORY_GB:g} GB or more"
            )

    @classmethod
    def from_toml(cls, path: Path, environ: Mapping[str, str] | None = None) -> SiteSettings:
        """The ``[federation]`` table of ``path``, ``RTSEG_FEDERATION_*`` variables of ``environ`` over it."""
        return cls.from_mapping(load_settings(path, environ).federation, source=str(path))

    @classmethod
    def from_mapping(
        cls, doc: Mapping[str, Any], source: str, node_data_dir: Path | None = None
    ) -> SiteSettings:
        """From a ``[federation]`` table (a :class:`~rtseg.settings.Table` or a plain mapping).

        Inside ``rtseg serve`` (``node_data_dir`` given) ``data_dir`` defaults to
        ``<data>/site-data`` (where the closed loop adds approved cases) and
        ``work_dir`` to ``<data>/federation``. A bad value is an :class:`InputError`
        in the style of every table; a contradiction is a :class:`FederationError`.
        """
        table = Table.of("federation", doc, source)
        values = parse_table(table, _KEYS, skip=("closed_loop",))
        if node_data_dir is not None:
            values.setdefault("data_dir", node_data_dir / SITE_DATA_DIR)
            values.setdefault("work_dir", node_data_dir / "federation")
        for key in ("coordinator", "site_id", "data_dir", "work_dir"):
            if values.get(key) is None:
                raise InputError(f"federation.{key} is required", source=table.source)
        try:
            return cls(**values)
        except FederationError as exc:
            raise FederationError(f"[federation] {exc.message}", source=source) from exc

    def describe(self) -> str:
        security = "TLS" if self.ca else "INSECURE (no TLS)"
        window = (
            "always"
            if self.window.start == self.window.end
            else f"{self.window.start:%H:%M}-{self.window.end:%H:%M}"
        )
        return (
            f"federation: site {self.site_id} joins rounds of {self.coordinator} ({security}),"
            f" window {window}, training data {self.data_dir.resolve()},"
            f" training memory at most {self.max_memory_gb:g} GB"
        )


def _window(value: Any) -> Window:
    if not isinstance(value, str):
        raise ValueError("must be HH:MM-HH:MM or always")
    try:
        return Window.parse(value.strip())
    except FederationError:
        raise ValueError("must be HH:MM-HH:MM (may wrap past midnight) or always") from None


def _partial_labels(value: Any) -> str:
    from rtseg.federation.task import PARTIAL_LABELS

    text = parse_str(value).lower()
    if text not in PARTIAL_LABELS:
        raise ValueError(f"must be {' or '.join(PARTIAL_LABELS)}")
    return text


def _switch(value: Any) -> bool:
    # TLS off is a security decision: only an explicit true/false, never "yes" or 1
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("must be true or false")


# key of the [federation] table -> parser (the field of SiteSettings of the same name)
_KEYS: dict[str, Parser] = {
    "coordinator": parse_str,
    "site_id": parse_str,
    "data_dir": optional(parse_path),
    "work_dir": optional(parse_path),
    "ca": optional(parse_path),
    "key": optional(parse_path),
    "window": _window,
    "threads": parse_int(1, 256),
    "nice": parse_int(-20, 19),
    "insecure": _switch,
    "partial_labels": _partial_labels,
    "max_memory_gb": parse_float(MIN_MEMORY_GB),
}


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
    from rtseg.net import free_port

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
        "partial-labels": settings.partial_labels,
        "max-memory-gb": settings.max_memory_gb,
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
