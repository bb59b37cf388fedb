"""Benchmark (not a test): receive throughput vs dcmtk ``storescp``, and turnaround p50/p95.

Throughput: one ``storescu`` association sends the same N-slice series to
``storescp`` (writing files, no fsync) and to the node's SCP (atomic, fsync'd
spool); the ratio is node / dcmtk in MB/s. Turnaround: ``rtseg serve`` with a
``storescp`` destination; for each series, the time from ``storescu`` returning
(last instance acknowledged) to the RTSTRUCT file appearing at the destination
(the node's C-STORE was acknowledged), minus nothing: the quiet time is inside.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


def make_series(out: Path, slices: int, matrix: int) -> Path:
    """A CT series of ``slices`` × ``matrix``² (phantom slab repeated; content does not matter here)."""
    from rtseg.phantom.dicom_io import SeriesSpec, write_ct_series

    folder = out / f"bench_{slices}x{matrix}"
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) == slices:
        return folder
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 30, (slices, matrix, matrix)).astype(np.float32)
    spec = SeriesSpec(uid_seed=f"rtseg-bench/{slices}/{matrix}", patient_position="HFS")
    write_ct_series(hu, (1.0, 0.8, 0.8), np.zeros(3), folder, spec)
    return folder


def _send(folder: Path, port: int, aec: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["storescu", "-aec", aec, "-aet", "BENCH", "127.0.0.1", str(port), "+sd", str(folder)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


DCMTK_FAST = ("-pdu", "131072", "+B")  # dcmtk's largest receive PDU, raw (bit-preserving) writes


def throughput(
    work: Path, folder: Path, repeats: int = 3, dcmtk_args: tuple[str, ...] = ()
) -> tuple[float, float]:
    """Best-of-``repeats`` seconds for (dcmtk storescp, rtseg SCP) receiving ``folder``."""
    from dicom_node.assembly import Assembler
    from dicom_node.audit import AuditLog
    from dicom_node.node import open_stores
    from dicom_node.scp import Receiver, start_scp
    from dicom_node.spool import Spool
    from rtseg.settings import load_settings

    dcmtk, ours = [], []
    for i in range(repeats):
        out = work / f"storescp_{i}"
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = subprocess.Popen(["storescp", *dcmtk_args, "-od", str(out), "-aet", "STORESCP", str(port)])
        try:
            wait_port(port)
            dcmtk.append(_send(folder, port, "STORESCP"))
        finally:
            proc.terminate()
            proc.wait()
        shutil.rmtree(out)
        data = work / f"node_{i}"
        env = {"RTSEG_DATA_DIR": str(data), "RTSEG_DICOM_PORT": "0", "RTSEG_NODE_MIN_FREE_DISK_MB": "10"}
        settings = load_settings(environ=env)
        store, deliveries = open_stores(data)
        audit = AuditLog(data / "audit.log")
        spool = Spool(data / "spool", 10)
        server = start_scp(
            settings.dicom,
            Receiver(spool, Assembler(store, spool, settings, audit), deliveries, audit),
            audit,
        )
        try:
            ours.append(_send(folder, int(server.server_address[1]), "RTSEG"))
        finally:
            server.shutdown()
        shutil.rmtree(data)
    return min(dcmtk), min(ours)


def turnaround(work: Path, cases: list[Path], model: Path | None) -> list[float]:
    dest = work / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    dport, nport = free_port(), free_port()
    config = work / "bench.toml"
    config.write_text(
        f'[dicom]\nport = {nport}\n[[destinations]]\nname = "dest"\nae_title = "STORESCP"\n'
        f'host = "127.0.0.1"\nport = {dport}\n[node]\nquiet_time_s = 5\nmin_free_disk_mb = 10\n'
        f'[paths]\ndata_dir = "{work / "node-data"}"\n' + (f'[model]\npath = "{model}"\n' if model else "")
    )
    shutil.rmtree(work / "node-data", ignore_errors=True)
    scp = subprocess.Popen(["storescp", "-od", str(dest), "-aet", "STORESCP", str(dport)])
    node = subprocess.Popen(
        [sys.executable, "-m", "rtseg.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    times = []
    try:
        wait_port(dport)
        wait_port(nport)
        for case in cases:
            before = len(list(dest.iterdir()))
            _send(case, nport, "RTSEG")
            sent = time.perf_counter()
            while len(list(dest.iterdir())) == before:
                time.sleep(0.05)
                if time.perf_counter() - sent > 900:
                    raise TimeoutError("no RTSTRUCT within 15 min")
            times.append(time.perf_counter() - sent)
            print(f"  series {len(times)}: {times[-1]:.1f} s", flush=True)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(60)
        scp.terminate()
        scp.wait()
    return times


def run_bench(args: argparse.Namespace) -> int:

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.skip_throughput:
        return _turnaround(args, work)
    folder = make_series(work, args.slices, args.matrix)
    mb = sum(p.stat().st_size for p in folder.glob("*.dcm")) / 1e6
    t_dcmtk, t_node = throughput(work, folder)
    t_fast, t_node2 = throughput(work, folder, dcmtk_args=DCMTK_FAST)
    t_node = min(t_node, t_node2)
    print(
        f"receive, {args.slices} slices × {args.matrix}², {mb:.0f} MB, one association, storescu (best of 3):"
    )
    print(f"  dcmtk storescp (defaults):          {t_dcmtk:.2f} s ({mb / t_dcmtk:.0f} MB/s)")
    print(f"  dcmtk storescp -pdu 131072 +B:      {t_fast:.2f} s ({mb / t_fast:.0f} MB/s)")
    print(f"  rtseg SCP (fsync'd, atomic):        {t_node:.2f} s ({mb / t_node:.0f} MB/s)")
    print(f"  rtseg / dcmtk: {t_dcmtk / t_node:.2f}× (defaults), {t_fast / t_node:.2f}× (fastest dcmtk)")
    if args.skip_turnaround:
        return 0
    return _turnaround(args, work)


def _turnaround(args: argparse.Namespace, work: Path) -> int:
    from rtseg.phantom.cohort import case_id, write_case

    cases = []
    for i in range(args.series):
        if not (work / "cases" / case_id("A", 500 + i, 0) / "ct").is_dir():
            write_case("A", 500 + i, 0, work / "cases", matrix=args.case_matrix)
        cases.append(work / "cases" / case_id("A", 500 + i, 0) / "ct")
    times = turnaround(work, cases, args.model)
    p50, p95 = statistics.median(times), float(np.percentile(times, 95))
    print(f"turnaround over {len(times)} series (5 s quiet time included): p50 {p50:.1f} s, p95 {p95:.1f} s")
    return 0
