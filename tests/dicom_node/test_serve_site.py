"""``rtseg serve`` runs the federation site when its configuration names a coordinator."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from node_helpers import no_patient_data, wait_for

from rtseg.federation.processes import start_superlink, stop, wait_port


def _supernodes(work_dir: Path) -> list[int]:
    """PIDs of flower-supernode processes whose Flower home is under ``work_dir``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        launched = any(arg.endswith(b"flower-supernode") for arg in cmdline[:2])  # script or python + script
        if launched and str(work_dir).encode() in environ:
            found.append(int(pid))
    return found


def test_serve_starts_and_stops_the_site_supernode(running_node: Any, tmp_path: Path, free_port: int) -> None:
    port = free_port
    superlink = start_superlink(tmp_path / "coordinator", port, tmp_path / "coordinator" / "state.db")
    try:
        wait_port(port, proc=superlink)
        federation = {
            "coordinator": f"127.0.0.1:{port}",
            "site_id": "site-a",
            "window": "always",
            "insecure": True,  # no TLS only when said: loopback test
        }
        node = running_node(federation=federation)
        work = node.data_dir / "federation"
        assert f"federation: site site-a joins rounds of 127.0.0.1:{port} (INSECURE (no TLS))" in node.log()
        warning = f"site site-a joins 127.0.0.1:{port} WITHOUT TLS (insecure = true"
        wait_for(lambda: warning in node.log(), 60, "the warning that the site joins without TLS")
        assert f"training data {node.data_dir.resolve() / 'site-data'}" in node.log()
        wait_for(lambda: _supernodes(work), 60, "the site's SuperNode")
        supernode_log = work / "flwr-home" / "supernode.log"
        # registered with the SuperLink: it got a node id
        activated = lambda: supernode_log.is_file() and "SuperNode ID" in supernode_log.read_text()  # noqa: E731
        wait_for(activated, 60, "the SuperNode's activation")
        assert node.stop() == 0
        assert _supernodes(work) == [], "the SuperNode must stop with the node"
        assert no_patient_data(node.log()) == []
    finally:
        stop(superlink)


def test_serve_refuses_an_incomplete_federation_table(
    running_node: Any, tmp_path: Path, free_port: int
) -> None:
    import subprocess
    import sys

    config = tmp_path / "node.toml"
    config.write_text(
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\n[dicom]\nport = {free_port}\n'
        '[federation]\ncoordinator = "127.0.0.1:9092"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{config}: federation.site_id is required" in result.stderr
    assert "Traceback" not in result.stderr
    with config.open("a") as toml:  # complete, but neither TLS nor an explicit insecure = true
        toml.write('site_id = "site-a"\n')
    result = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "[federation] no `ca`: a site joins its coordinator only over TLS" in result.stderr
    assert "Traceback" not in result.stderr
