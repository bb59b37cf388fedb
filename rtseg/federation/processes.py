"""Start and stop Flower's processes (SuperLink, SuperNode, ``flwr`` CLI) for rtseg.

Each process gets its own ``FLWR_HOME``, no update check, no telemetry, and a
PATH that starts with this interpreter's bin folder (Flower spawns
``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by bare name).
Daemons run in their own session; stopping one stops its whole process group.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtseg.errors import FederationError

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
APP_PUBLISHER = "rtseg"
CONNECTION = "rtseg"


@dataclass(frozen=True)
class ServerTls:
    ca: Path
    cert: Path
    key: Path


def flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    return env


def _spawn(args: list[str], home: Path, log_name: str) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    out = (home / log_name).open("ab")
    log.info("starting %s (log %s)", " ".join(args[:2]), home / log_name)
    return subprocess.Popen(
        args,
        env=flower_env(home),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=str(home),
        start_new_session=True,
    )


def start_superlink(
    home: Path,
    port: int,
    database: Path,
    tls: ServerTls | None = None,
    node_auth: bool = False,
    host: str = "127.0.0.1",
) -> subprocess.Popen[bytes]:
    args = [str(BIN / "flower-superlink"), "--database", str(database), "--host", host]
    args += ["--port", str(port), "--disable-runtime-dependency-installation"]
    if tls is None:
        args.append("--insecure")
    else:
        args += [
            "--ssl-ca-certfile",
            str(tls.ca),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
        ]
    if node_auth:
        args.append("--enable-supernode-auth")
    return _spawn(args, home, "superlink.log")


def start_supernode(
    home: Path,
    superlink: str,
    port: int,
    node_config: dict[str, Any],
    ca: Path | None = None,
    private_key: Path | None = None,
    *,
    insecure: bool = False,
) -> subprocess.Popen[bytes]:
    """A site's SuperNode: over TLS with ``ca``, without TLS only if ``insecure`` says so explicitly."""
    if ca is None and not insecure:
        raise FederationError(
            "a site's SuperNode is not started without TLS: give the federation's CA certificate, or"
            " insecure = true for a loopback test"
        )
    if ca is None:
        log.warning("SuperNode connects to %s WITHOUT TLS (insecure): loopback tests only", superlink)
    args = [
        str(BIN / "flower-supernode"),
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    args += ["--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())]
    args += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if private_key is not None:
        args += ["--auth-supernode-private-key", str(private_key)]
    return _spawn(args, home, "supernode.log")


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # children that outlived their leader keep the group alive
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_connection(home: Path, address: str, ca: Path | None = None) -> None:
    """``$FLWR_HOME/config.toml`` naming the SuperLink as connection ``rtseg``."""
    home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true" if ca is None else f'root-certificates = "{ca.resolve()}"'
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}\n'
    )


def flwr(home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(home),
    )


def write_app(app_dir: Path, run_config: dict[str, Any]) -> Path:
    """The Flower app folder: only a ``pyproject.toml`` naming rtseg's installed apps."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {json.dumps(v)}" for k, v in run_config.items()]
    (app_dir / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "rtseg-federation"\nversion = "1.0.0"\ndependencies = []\n\n'
        f'[tool.flwr.app]\npublisher = "{APP_PUBLISHER}"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "rtseg.federation.server_app:app"\n'
        'clientapp = "rtseg.federation.client_app:app"\n\n'
        "[tool.flwr.app.config]\n" + "\n".join(lines) + "\n"
    )
    (app_dir / "rtseg_federation_app.py").write_text(
        '"""rtseg federation: the apps live in rtseg.federation."""\n'
    )
    return app_dir


def start_run(home: Path, app_dir: Path) -> int:
    done = flwr(home, "run", str(app_dir), CONNECTION, "--format", "json")
    try:
        return int(json.loads(done.stdout)["run-id"])
    except (ValueError, KeyError) as exc:
        raise FederationError(f"flwr run failed: {done.stdout[-2000:]} {done.stderr[-2000:]}") from exc


def run_status(home: Path, run_id: int) -> str:
    done = flwr(home, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
    try:
        runs = json.loads(done.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError) as exc:
        raise FederationError(f"flwr ls failed: {done.stdout[-1000:]} {done.stderr[-1000:]}") from exc


def wait_run(home: Path, run_id: int, timeout: float, poll: float = 3.0) -> str:
    """Wait until the run has finished; returns Flower's status (``finished:completed`` on success)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = run_status(home, run_id)
        except subprocess.TimeoutExpired:  # a busy machine: the CLI is slow to start, ask again
            log.warning("flwr ls did not answer in time; asking again")
            continue
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise FederationError(f"run {run_id} did not finish within {timeout:.0f} s")


def register_node(home: Path, public_key: Path, name: str) -> None:
    done = flwr(home, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    if done.returncode != 0:
        raise FederationError(f"registering {name} failed: {done.stdout[-1000:]} {done.stderr[-1000:]}")


def wait_port(port: int, timeout: float = 300.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``port`` accepts connections (Flower starts slowly on a busy machine)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FederationError(f"the process meant to listen on {port} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FederationError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
