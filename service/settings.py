"""The ``[http]`` table of the configuration file, parsed into :class:`HttpSettings`.

The core :class:`rtseg.settings.Settings` passes the table through untouched as
``settings.http``; this module is the one place that knows its keys::

    [http]
    host = "127.0.0.1"          # bind address; loopback unless a proxy or firewall is in front
    port = 8080
    token_sha256 = ["<64 hex digits>"]   # SHA-256 of each bearer token (`rtseg http --new-token`)
    max_body_mb = 2048          # request body limit → 413
    max_files = 5000            # files in one upload (zip entries or multipart parts)
    max_uncompressed_mb = 8192  # total size of an upload once unpacked → 413
    max_zip_ratio = 200         # uncompressed / compressed size of a zip or its entries → 413
    max_instance_mb = 64        # one DICOM file as sent, inflated (Deflate) or decoded → 413
    queue_max = 20              # HTTP jobs received or queued at once; beyond → 429
    retry_after_s = 30          # Retry-After of a 429
    max_wait_s = 600            # upper bound of ?wait=SECONDS
    job_expiry_h = 24           # finished HTTP jobs (and their files) are deleted after this
    min_free_mb = 1024          # /readyz fails below this much free space in the data folder
    threads = 32                # waitress threads; uploads use at most threads - 4 (429 beyond)
    trusted_proxy = ""          # address of a reverse proxy whose X-Forwarded-* headers count
    trusted_proxy_headers = ["x-forwarded-for", "x-forwarded-proto"]

Environment variables ``RTSEG_HTTP_<KEY>`` override a key (lists comma-separated), read by
:func:`http_table` at the entry point, e.g. ``RTSEG_HTTP_PORT=9000``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from rtseg.errors import InputError

_MB = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HttpSettings:
    """Everything the HTTP face needs beyond the core settings (sizes in bytes, times in seconds)."""

    host: str = "127.0.0.1"
    port: int = 8080
    token_sha256: tuple[str, ...] = ()
    max_body_bytes: int = 2048 * _MB
    max_files: int = 5000
    max_uncompressed_bytes: int = 8192 * _MB
    max_zip_ratio: float = 200.0
    max_instance_bytes: int = 64 * _MB
    queue_max: int = 20
    retry_after_s: int = 30
    max_wait_s: float = 600.0
    job_expiry_s: float = 24 * 3600.0
    min_free_bytes: int = 1024 * _MB
    threads: int = 32
    trusted_proxy: str | None = None
    trusted_proxy_headers: tuple[str, ...] = ("x-forwarded-for", "x-forwarded-proto")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> HttpSettings:
        """Parse the ``[http]`` table; unknown keys and bad values are :class:`InputError`."""
        raw = dict(raw or {})
        values: dict[str, Any] = {}
        for key, (name, convert) in _KEYS.items():
            if key in raw:
                values[name] = _convert(key, raw.pop(key), convert)
        if raw:
            known = ", ".join(sorted(_KEYS))
            raise InputError(f"unknown [http] setting(s) {', '.join(sorted(raw))}; known: {known}")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values that cannot work (raised as :class:`InputError`)."""
        if not 0 <= self.port <= 65535:
            raise InputError(f"[http] port {self.port} is not a TCP port")
        for digest in self.token_sha256:
            if not _HEX64.match(digest):
                raise InputError("[http] token_sha256 entries must be 64 lower-case hex digits (SHA-256)")
        positive = (
            "max_body_bytes",
            "max_files",
            "max_uncompressed_bytes",
            "max_instance_bytes",
            "queue_max",
            "threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"[http] {name} must be at least 1")
        if self.max_zip_ratio < 1 or self.max_wait_s < 0 or self.job_expiry_s <= 0:
            raise InputError("[http] max_zip_ratio ≥ 1, max_wait_s ≥ 0 and job_expiry_h > 0 are required")


def http_table(raw: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``[http]`` table with ``RTSEG_HTTP_<KEY>`` variables of ``environ`` applied over it."""
    table = dict(raw)
    prefix = "RTSEG_HTTP_"
    for name, value in environ.items():
        if name.startswith(prefix):
            key = name[len(prefix) :].lower()
            table[key] = value.split(",") if key in ("token_sha256", "trusted_proxy_headers") else value
    return table


def _mb(value: Any) -> int:
    return int(float(value) * _MB)


def _tokens(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().lower() for v in items)


def _headers(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().lower() for v in items)


def _proxy(value: Any) -> str | None:
    return str(value).strip() or None


# key in the file → (field, conversion)
_KEYS: dict[str, tuple[str, Any]] = {
    "host": ("host", str),
    "port": ("port", int),
    "token_sha256": ("token_sha256", _tokens),
    "max_body_mb": ("max_body_bytes", _mb),
    "max_files": ("max_files", int),
    "max_uncompressed_mb": ("max_uncompressed_bytes", _mb),
    "max_zip_ratio": ("max_zip_ratio", float),
    "max_instance_mb": ("max_instance_bytes", _mb),
    "queue_max": ("queue_max", int),
    "retry_after_s": ("retry_after_s", int),
    "max_wait_s": ("max_wait_s", float),
    "job_expiry_h": ("job_expiry_s", lambda v: float(v) * 3600.0),
    "min_free_mb": ("min_free_bytes", _mb),
    "threads": ("threads", int),
    "trusted_proxy": ("trusted_proxy", _proxy),
    "trusted_proxy_headers": ("trusted_proxy_headers", _headers),
}
assert {name for name, _ in _KEYS.values()} == {f.name for f in fields(HttpSettings)}


def _convert(key: str, value: Any, convert: Any) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"[http] {key} = {value!r} is not valid ({exc})") from exc
