"""Issue 19 point 6: what the command line prints is what the README says, and can be used as printed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from rtseg.phantom.cohort import case_id, write_case

RTSEG = [sys.executable, "-m", "rtseg_app"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RTSEG, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_new_token_line_pastes_under_an_existing_http_table(tmp_path: Path) -> None:
    run = _run("http", "--new-token")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    config_lines = [line for line in lines if line.startswith("token_sha256")]
    assert len(config_lines) == 1, run.stdout
    text = '[http]\nhost = "127.0.0.1"\nport = 8080\n' + config_lines[0] + "\n"
    parsed = tomllib.loads(text)  # a second [http] header would be a TOML error here
    token = lines[0].rsplit(": ", 1)[1]
    import hashlib

    assert parsed["http"]["token_sha256"] == [hashlib.sha256(token.encode()).hexdigest()]
    assert any("under [http]" in line for line in lines)


def test_two_ct_series_name_the_series_option(tmp_path: Path) -> None:
    for seed in (3, 4):
        write_case("A", seed, 0, tmp_path / "cases", matrix=32)
    both = tmp_path / "both"
    both.mkdir()
    for seed in (3, 4):
        for f in (tmp_path / "cases" / case_id("A", seed, 0) / "ct").iterdir():
            (both / f"{seed}_{f.name}").write_bytes(f.read_bytes())
    run = _run("segment", str(both), "-o", str(tmp_path / "out.dcm"))
    assert run.returncode == 2
    assert "found 2 CT series" in run.stderr and "--series" in run.stderr, run.stderr
    assert "series_uid" not in run.stderr
    assert not (tmp_path / "out.dcm").exists()
