"""Real peers for the DICOM node tests: `rtseg serve` as a subprocess, dcmtk storescu/storescp, Orthanc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.dcmtk import require_dcmtk_tool
from rtseg.jobs import JobStore
from rtseg.net import free_port

PATIENT_WORDS = ("PHANTOM^", "RTSEG-A_", "RTSEG-B_")  # phantom PatientName / PatientID prefixes


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_port(port: int, timeout: float = 60.0) -> None:
    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout, f"port {port}")


def storescu(
    folder_or_files: Path | list[Path], port: int, aec: str = "RTSEG", aet: str = "MODALITY", *extra: str
) -> int:
    files = [str(folder_or_files)] if isinstance(folder_or_files, Path) else [str(f) for f in folder_or_files]
    args = [require_dcmtk_tool("storescu"), *extra, "-aec", aec, "-aet", aet, "127.0.0.1", str(port)]
    if isinstance(folder_or_files, Path) and folder_or_files.is_dir():
        args.append("+sd")
    return subprocess.run([*args, *files], capture_output=True, timeout=300).returncode


def echoscu(port: int, aec: str = "RTSEG", aet: str = "MODALITY") -> int:
    return subprocess.run(
        [require_dcmtk_tool("echoscu"), "-aec", aec, "-aet", aet, "127.0.0.1", str(port)], capture_output=True
    ).returncode


class Storescp:
    """dcmtk storescp as the destination (PACS/TPS stand-in): files land in ``out``."""

    def __init__(self, out: Path, ae_title: str = "DEST") -> None:
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Storescp:
        self.proc = subprocess.Popen(
            [require_dcmtk_tool("storescp"), "-od", str(self.out), "-aet", self.ae_title, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def received(self) -> list[pydicom.Dataset]:
        return [
            pydicom.dcmread(p)
            for p in sorted(self.out.iterdir())
            if p.is_file() and not p.name.startswith(".")
        ]


class NodeProcess:
    """``rtseg serve --config`` as a child process in its own session (so kill -9 hits only it)."""

    def __init__(
        self, root: Path, destinations: list[dict[str, Any]] | None = None, **overrides: Any
    ) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.log_path = root / "serve.log"
        self.config = root / "node.toml"
        self.destinations = destinations or []
        self.overrides = overrides
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    def write_config(self) -> None:
        node = {"quiet_time_s": 1.0, "inference_threads": 1, "min_free_disk_mb": 10, "retry_backoff_s": 0.5}
        node.update(self.overrides.get("node", {}))
        dicom = {"port": self.port, "host": "127.0.0.1", **self.overrides.get("dicom", {})}
        lines = ["[dicom]", *_toml(dicom), "[node]", *_toml(node), "[paths]", f'data_dir = "{self.data_dir}"']
        if "selection" in self.overrides:
            lines += ["[selection]", *_toml(self.overrides["selection"])]
        for d in self.destinations:
            lines += ["[[destinations]]", *_toml(d)]
        if "http" in self.overrides:
            lines += ["[http]", *_toml(self.overrides["http"])]
        if "federation" in self.overrides:
            lines += ["[federation]", *_toml(self.overrides["federation"])]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 120.0) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        seen = len(self.log())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rtseg_app", "-v", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_for(
            lambda: "ready" in self.log()[seen:] or self.proc.poll() is not None,  # type: ignore[union-attr]
            timeout,
            "rtseg serve to start",
        )
        assert self.proc.poll() is None, self.log()[-3000:]
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            return code
        os.killpg(self.proc.pid, signal.SIGTERM)  # the whole group, as systemd does: workers too
        code = self.proc.wait(90)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the node and its workers (the whole session), as a power cut would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def store(self) -> JobStore:
        return JobStore(self.data_dir / "state.db")

    def states(self) -> list[str]:
        store = self.store()
        try:
            return [str(j.state) for j in store.list()]
        finally:
            store.close()

    def audit_text(self) -> str:
        path = self.data_dir / "audit" / "audit.log"
        return path.read_text() if path.exists() else ""

    def audit(self) -> list[dict[str, Any]]:
        path = self.data_dir / "audit" / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _toml(values: dict[str, Any]) -> list[str]:
    return [f"{k} = {_toml_value(v)}" for k, v in values.items()]


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def no_patient_data(text: str) -> list[str]:
    """Lines of ``text`` that carry a phantom PatientName or PatientID."""
    return [line for line in text.splitlines() if any(w in line for w in PATIENT_WORDS)]


def orthanc_request(port: int, path: str, data: bytes | None = None, method: str | None = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header(
            "Content-Type", "application/dicom" if not data.startswith(b"{") else "application/json"
        )
    with urllib.request.urlopen(req, timeout=120) as resp:
        body = resp.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def subset_series(
    ct_dir: Path,
    out: Path,
    n: int,
    *,
    description: str | None = None,
    uid_tag: str | None = None,
) -> Path:
    """The ``n`` middle slices of a series (still contiguous: a valid, smaller series) in ``out``.

    ``uid_tag`` gives the copy new Series/SOP Instance UIDs (a different series).
    """
    out.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(p) for p in sorted(ct_dir.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    start = max(0, (len(datasets) - n) // 2)
    for i, ds in enumerate(datasets[start : start + n]):
        if description is not None:
            ds.SeriesDescription = description
        if uid_tag is not None:
            ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[uid_tag, "series"])
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[uid_tag, str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"slice{i:03d}.dcm", enforce_file_format=True)
    return out


def worker_pids(parent: int) -> list[int]:
    """Segmentation worker processes (multiprocessing spawn children) of the process ``parent``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)
