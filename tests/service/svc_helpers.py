"""Helpers of the HTTP service tests: a running server handle, settings, zips."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests

from rtseg.jobs import JobStore
from service.auth import token_digest
from service.server import HttpServer
from service.settings import HttpSettings

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Running:
    """A waitress server on a free loopback port with its store and data folder."""

    server: HttpServer
    store: JobStore
    data_dir: Path
    settings: HttpSettings

    @property
    def url(self) -> str:
        return self.server.url

    def post(self, body: bytes | None = None, *, files: Any = None, params: Any = None, **kw: Any) -> Any:
        headers = {**AUTH, **kw.pop("headers", {})}
        if body is not None:
            headers.setdefault("Content-Type", "application/zip")
        url = f"{self.url}/v1/segmentations"
        kw.setdefault("timeout", 300)  # a starved CI machine checks a series slowly
        return requests.post(url, data=body, files=files, params=params, headers=headers, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return requests.get(f"{self.url}{path}", headers={**AUTH, **kw.pop("headers", {})}, timeout=120, **kw)

    def job_dirs(self) -> list[Path]:
        jobs = self.data_dir / "jobs"
        return sorted(jobs.iterdir()) if jobs.exists() else []


def make_settings(**overrides: Any) -> HttpSettings:
    base = HttpSettings(
        host="127.0.0.1",
        port=0,
        token_sha256=(token_digest(TOKEN),),
        max_body_bytes=32 << 20,
        max_uncompressed_bytes=64 << 20,
        max_files=400,
        queue_max=5,
        retry_after_s=7,
        max_wait_s=300,
        min_free_bytes=1 << 20,
        threads=8,
    )
    return replace(base, **overrides)


def zip_folder(folder: Path, prefix: str = "series/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, prefix + path.name)
    return buffer.getvalue()
