"""The ``[http]`` table of the configuration file, parsed into :class:`HttpSettings`.

The core :class:`rtseg.settings.Settings` reads the table (and its ``RTSEG_HTTP_<KEY>``
variables) as ``settings.http``; this module is the one place that knows its keys::

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

Environment variables ``RTSEG_HTTP_<KEY>`` override a key (lists comma-separated), e.g.
``RTSEG_HTTP_PORT=9000``; they are read with the settings at the entry point, never here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from rtseg.settings import (
    Parser,
    Table,
    optional,
    parse_float,
    parse_int,
    parse_str,
    parse_strings,
    parse_table,
)

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
        """Parse the ``[http]`` table (``settings.http``, or a plain mapping).

        Unknown keys and bad values are an :class:`~rtseg.errors.InputError` in the style of every table.
        """
        values = parse_table(Table.of("http", raw or {}), {key: parse for key, (_, parse) in _KEYS.items()})
        return cls(**{_KEYS[key][0]: value for key, value in values.items()})


def _mb(least: int) -> Parser:
    """Megabytes (fractions allowed) → bytes, at least ``least`` bytes."""
    number = parse_float(0.0)

    def parse(value: Any) -> int:
        n = int(number(value) * _MB)
        if n < least:
            raise ValueError("must be more than 0")
        return n

    return parse


def _tokens(value: Any) -> tuple[str, ...]:
    digests = parse_strings(str.lower)(value)
    if not all(_HEX64.match(d) for d in digests):
        raise ValueError("must be SHA-256 digests, 64 hex digits each (`rtseg http --new-token`)")
    return tuple(digests)


def _hours(value: Any) -> float:
    hours: float = parse_float(0.0)(value)
    if hours <= 0:
        raise ValueError("must be more than 0")
    return hours * 3600.0


# key in the file → (field, parser)
_KEYS: dict[str, tuple[str, Parser]] = {
    "host": ("host", parse_str),
    "port": ("port", parse_int(0, 65535)),
    "token_sha256": ("token_sha256", _tokens),
    "max_body_mb": ("max_body_bytes", _mb(1)),
    "max_files": ("max_files", parse_int(1)),
    "max_uncompressed_mb": ("max_uncompressed_bytes", _mb(1)),
    "max_zip_ratio": ("max_zip_ratio", parse_float(1.0)),
    "max_instance_mb": ("max_instance_bytes", _mb(1)),
    "queue_max": ("queue_max", parse_int(1)),
    "retry_after_s": ("retry_after_s", parse_int(0)),
    "max_wait_s": ("max_wait_s", parse_float(0.0)),
    "job_expiry_h": ("job_expiry_s", _hours),
    "min_free_mb": ("min_free_bytes", _mb(0)),
    "threads": ("threads", parse_int(1)),
    "trusted_proxy": ("trusted_proxy", optional(parse_str)),
    "trusted_proxy_headers": ("trusted_proxy_headers", parse_strings(str.lower)),
}
assert {name for name, _ in _KEYS.values()} == {f.name for f in fields(HttpSettings)}
