"""Benchmark (not a test): receive throughput vs dcmtk ``storescp``, and turnaround p50/p95.

Throughput: one ``storescu`` association sends the same N-slice series to
``storescp`` (writing files, no fsync) and to the node's SCP (atomic, fsync'd
spool); the ratio is node / dcmtk in MB/s. Turnaround: ``rtseg serve`` with a
``storescp`` destination; for each series, the time from ``storescu`` returning
(last instance acknowledged) to the RTSTRUCT file appearing at the destination
(the node's C-STORE was acknowledged), minus nothing. ``storescu`` releases its
association and each series is whole, so the node completes it on the release
(``[node] complete_on_release``, the default) and the quiet time is only the
fallback; ``complete_on_release=False`` measures the quiet-time rule instead.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node.dcmtk import require_dcmtk_tool
from rtseg.net import free_port


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
        [
            require_dcmtk_tool("storescu"),
            "-aec",
            aec,
            "-aet",
            "BENCH",
            "127.0.0.1",
            str(port),
            "+sd",
            str(folder),
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


QUIET_S = 5.0  # the node's quiet time per series in the turnaround runs (the fallback: see the docstring)
COMPLETE_ON_RELEASE = True  # the node's default
DCMTK_FAST = ("-pdu", "131072", "+B")  # dcmtk's largest receive PDU, raw (bit-preserving) writes


def throughput(
    work: Path, folder: Path, repeats: int = 3, dcmtk_args: tuple[str, ...] = ()
) -> tuple[float, float]:
    """Best-of-``repeats`` seconds for (dcmtk storescp, rtseg SCP) receiving ``folder``."""
    from dicom_node.assembly import Assembler
    from dicom_node.node import open_stores
    from dicom_node.scp import Receiver, start_scp
    from dicom_node.spool import Spool
    from rtseg.audit import AuditLog
    from rtseg.settings import load_settings

    dcmtk, ours = [], []
    for i in range(repeats):
        out = work / f"storescp_{i}"
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run leaves files behind
        out.mkdir(parents=True)
        port = free_port()
        proc = subprocess.Popen(
            [require_dcmtk_tool("storescp"), *dcmtk_args, "-od", str(out), "-aet", "STORESCP", str(port)]
        )
        try:
            wait_port(port)
            dcmtk.append(_send(folder, port, "STORESCP"))
        finally:
            proc.terminate()
            proc.wait()
        shutil.rmtree(out)
        data = work / f"node_{i}"
        shutil.rmtree(data, ignore_errors=True)
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


def receive_figures(work: Path, slices: int, matrix: int, repeats: int = 3) -> dict[str, float | int]:
    """Best-of-``repeats`` seconds receiving one ``slices`` × ``matrix``² series: dcmtk (2 ways), rtseg."""
    folder = make_series(work, slices, matrix)
    mb = sum(p.stat().st_size for p in folder.glob("*.dcm")) / 1e6
    t_dcmtk, t_node = throughput(work, folder, repeats)
    t_fast, t_node2 = throughput(work, folder, repeats, dcmtk_args=DCMTK_FAST)
    t_node = min(t_node, t_node2)
    return {
        "slices": slices,
        "matrix": matrix,
        "mb": mb,
        "repeats": repeats,
        "dcmtk_s": t_dcmtk,
        "dcmtk_fast_s": t_fast,
        "rtseg_s": t_node,
        "ratio_vs_dcmtk": t_dcmtk / t_node,
        "ratio_vs_dcmtk_fast": t_fast / t_node,
    }


@dataclass(frozen=True)
class NodeUnderTest:
    """A running ``rtseg serve`` (its process group is ``pgid``) and the folder its destination writes to."""

    port: int
    dest: Path
    pgid: int

    def results(self) -> int:
        return len(list(self.dest.iterdir()))

    def wait_results(
        self, count: int, timeout: float = 900.0, poll: Callable[[], None] | None = None
    ) -> None:
        """Wait until ``count`` RTSTRUCTs have arrived at the destination."""
        started = time.perf_counter()
        while self.results() < count:
            if poll is not None:
                poll()
            time.sleep(0.05)
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"only {self.results()} of {count} RTSTRUCTs within {timeout:.0f} s")


@contextmanager
def running_node(
    work: Path,
    model: Path | None,
    quiet_s: float = QUIET_S,
    complete_on_release: bool = COMPLETE_ON_RELEASE,
    chunk_slices: int | None = None,
) -> Iterator[NodeUnderTest]:
    """``rtseg serve`` with a ``storescp`` destination, both on free loopback ports; stopped on exit.

    ``chunk_slices``: the node's ``[node] chunk_slices`` (None: its default).
    """
    dest = work / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    dport, nport = free_port(), free_port()
    config = work / "bench.toml"
    config.write_text(
        f'[dicom]\nport = {nport}\n[[destinations]]\nname = "dest"\nae_title = "STORESCP"\n'
        f'host = "127.0.0.1"\nport = {dport}\n[node]\nquiet_time_s = {quiet_s:g}\nmin_free_disk_mb = 10\n'
        f"complete_on_release = {str(complete_on_release).lower()}\n"
        + (f"chunk_slices = {chunk_slices}\n" if chunk_slices is not None else "")
        + f'[paths]\ndata_dir = "{work / "node-data"}"\n'
        + (f'[model]\npath = "{model}"\n' if model else "")
    )
    shutil.rmtree(work / "node-data", ignore_errors=True)
    scp = subprocess.Popen([require_dcmtk_tool("storescp"), "-od", str(dest), "-aet", "STORESCP", str(dport)])
    node = subprocess.Popen(
        [sys.executable, "-m", "rtseg_app", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(dport)
        wait_port(nport)
        yield NodeUnderTest(nport, dest, node.pid)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(60)
        scp.terminate()
        scp.wait()


def send(node: NodeUnderTest, folder: Path) -> float:
    """Send one series to the node in one association; seconds until the last instance was acknowledged."""
    return _send(folder, node.port, "RTSEG")


def turnaround(work: Path, cases: list[Path], model: Path | None, quiet_s: float = QUIET_S) -> list[float]:
    """Seconds from each series' last instance acknowledged to its RTSTRUCT at the destination."""
    times = []
    with running_node(work, model, quiet_s) as node:
        for case in cases:
            before = node.results()
            send(node, case)
            sent = time.perf_counter()
            node.wait_results(before + 1)
            times.append(time.perf_counter() - sent)
            print(f"  series {len(times)}: {times[-1]:.1f} s", flush=True)
    return times


def run_bench(args: argparse.Namespace) -> int:

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.skip_throughput:
        return _turnaround(args, work)
    fig = receive_figures(work, args.slices, args.matrix)
    mb, t_dcmtk, t_fast, t_node = fig["mb"], fig["dcmtk_s"], fig["dcmtk_fast_s"], fig["rtseg_s"]
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


def phantom_series(work: Path, count: int, matrix: int) -> list[Path]:
    """``count`` phantom CT series (center A, seeds 500 …) under ``work/cases``, written once."""
    from rtseg.phantom.cohort import case_id, write_case

    cases = []
    for i in range(count):
        folder = work / "cases" / f"m{matrix}" / case_id("A", 500 + i, 0) / "ct"
        if not folder.is_dir():
            write_case("A", 500 + i, 0, folder.parent.parent, matrix=matrix)
        cases.append(folder)
    return cases


def _turnaround(args: argparse.Namespace, work: Path) -> int:
    cases = phantom_series(work, args.series, args.case_matrix)
    times = turnaround(work, cases, args.model)
    p50, p95 = statistics.median(times), float(np.percentile(times, 95))
    print(
        f"turnaround over {len(times)} series (completed on release, {QUIET_S:g} s quiet time as the"
        f" fallback): p50 {p50:.1f} s, p95 {p95:.1f} s"
    )
    return 0


def _group_stats(pgid: int) -> Iterator[tuple[int, list[str]]]:
    """``(pid, /proc/pid/stat fields after the command)`` of each live process of process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if len(fields) > 21 and int(fields[2]) == pgid:  # fields[2]: pgrp, fields[21]: rss in pages
            yield int(stat.parent.name), fields


def group_rss_mb(pgid: int) -> float:
    """Resident memory (MB) summed over process group ``pgid`` (shared pages count in every process)."""
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(int(fields[21]) * page for _, fields in _group_stats(pgid)) / 2**20


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    return [pid for pid, _ in _group_stats(pgid)]


def reset_peaks(pids: list[int]) -> bool:
    """Reset each process's peak resident set (``VmHWM``; Linux ``clear_refs`` 5); False where refused."""
    try:
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def process_peaks_mb(pids: list[int]) -> dict[int, float]:
    """``VmHWM`` (MiB) of each live process: its exact peak since it started or since :func:`reset_peaks`."""
    from rtseg_app.bench.http import peak_rss_mb

    peaks = {}
    for pid in pids:
        try:
            peaks[pid] = peak_rss_mb(pid)
        except OSError:
            continue  # ended
    return peaks


def concurrent_turnaround(node: NodeUnderTest, folders: list[Path]) -> dict[str, float | int | None]:
    """Send ``folders`` at once (one association each); seconds from the last acknowledged instance
    to the first and the last RTSTRUCT, and the node's memory: the process tree's resident set summed
    (sampled after the sending; shared pages count in every process) and each process's exact peak
    over the whole exchange (``VmHWM``, reset first): the largest one (the inference worker) and their sum."""
    from concurrent.futures import ThreadPoolExecutor

    pids = group_pids(node.pgid)
    exact = reset_peaks(pids)
    before = node.results()
    peak = [group_rss_mb(node.pgid)]

    def sample() -> None:
        peak[0] = max(peak[0], group_rss_mb(node.pgid))

    with ThreadPoolExecutor(len(folders)) as pool:
        list(pool.map(lambda folder: send(node, folder), folders))
    sent = time.perf_counter()
    node.wait_results(before + 1, poll=sample)
    first = time.perf_counter() - sent
    node.wait_results(before + len(folders), poll=sample)
    last = time.perf_counter() - sent
    peaks = process_peaks_mb(pids) if exact else {}
    return {
        "series": len(folders),
        "first_s": first,
        "last_s": last,
        "peak_rss_mb": peak[0],
        "largest_process_peak_mb": max(peaks.values()) if peaks else None,
        "process_peaks_sum_mb": sum(peaks.values()) if peaks else None,
    }
