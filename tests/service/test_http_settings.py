"""The ``[http]`` table: parsed from the core settings, which alone read the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from rtseg.errors import InputError
from rtseg.jobs import JobStore
from rtseg.settings import load_settings
from rtseg.worker import WorkerPool
from service.auth import token_digest
from service.cli import start_companion
from service.settings import HttpSettings


def test_a_bad_http_value_reads_as_in_every_table(tmp_path: Path) -> None:
    config = tmp_path / "rtseg.toml"
    config.write_text("[http]\nport = 70000\n")
    with pytest.raises(InputError) as in_file:
        HttpSettings.from_mapping(load_settings(config, environ={}).http)
    assert str(in_file.value) == f"{config}: http.port must be between 0 and 65535, got 70000"
    with pytest.raises(InputError) as in_env:
        HttpSettings.from_mapping(load_settings(environ={"RTSEG_HTTP_MAX_FILES": "many"}).http)
    assert (
        str(in_env.value)
        == "environment: RTSEG_HTTP_MAX_FILES must be an integer, got 'many' (http.max_files)"
    )


def test_http_environment_overrides_come_with_the_settings() -> None:
    digests = [token_digest("a"), token_digest("b")]
    env = {"RTSEG_HTTP_PORT": "9001", "RTSEG_HTTP_TOKEN_SHA256": ",".join(digests), "OTHER": "x"}
    http = HttpSettings.from_mapping(load_settings(environ=env).http)
    assert http.port == 9001 and http.token_sha256 == tuple(digests)
    with pytest.raises(InputError) as unknown:
        HttpSettings.from_mapping(load_settings(environ={"RTSEG_HTTP_PROT": "1"}).http)
    assert str(unknown.value).startswith(
        "environment: unknown setting RTSEG_HTTP_PROT (http.prot; known: host,"
    )


def test_the_service_takes_its_settings_and_not_the_environment(
    tmp_path: Path, free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "rtseg.toml"
    config.write_text(f'[paths]\ndata_dir = "{tmp_path / "data"}"\n[http]\nport = {free_port}\n')
    settings = load_settings(config, environ={})
    monkeypatch.setenv("RTSEG_HTTP_PORT", str(free_port + 1))  # set after the settings were read
    store = JobStore(tmp_path / "state.db")
    pool = WorkerPool.from_settings(settings, store, tmp_path / "data", tmp_path / "model")  # never started
    stop = start_companion(settings, store, pool, tmp_path / "data", tmp_path / "model")
    try:
        assert requests.get(f"http://127.0.0.1:{free_port}/healthz", timeout=10).status_code == 200
    finally:
        stop()
        store.close()
