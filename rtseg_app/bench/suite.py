"""``rtseg bench``: inference, DICOM receive, RTSTRUCT build, turnaround and one federated round in one run.

The core's measurements come from :mod:`rtseg_app.bench`, the node's from
:mod:`rtseg_app.bench.node`; this module plans the run (full or ``--quick``), runs
each section, keeps going when one fails (its error is recorded) and writes
``bench.json`` and ``bench.md``. User-facing progress goes to stdout.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rtseg.errors import RtsegError

log = logging.getLogger(__name__)

SECTIONS = ("inference", "receive", "rtstruct", "turnaround", "federation", "levers", "scaling")
OPTIONAL = ("levers", "scaling")  # run only when asked for
# run only when named with --section (they were once entries of their own)
EXTRA = ("http", "robust", "clinical")
# the key a section's figures go under in bench.json, where it is not the section's name
RESULT_KEYS = {"clinical": "clinical_scale"}
ALL_SECTIONS = SECTIONS + EXTRA
HTTP_UPLOADS = {"full": 20, "quick": 5}
HTTP_MATRIX = 96
CONCURRENCY = (1, 2, 4)
# What a section may fail with and the run still report the others.
SECTION_ERRORS = (RtsegError, OSError, subprocess.SubprocessError, TimeoutError, RuntimeError, ValueError)

LONG_MIN_SLICES = 800  # the stock-size model's long-series rows: these lengths of --scaling-slices and up
FULL_CT_RUNS = 3  # turnaround of the benchmark CT: its median over this many patients


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. The benchmark CT serves inference, the RTSTRUCT build and one turnaround."""

    mode: str
    slices: int  # benchmark CT
    matrix: int
    receive_slices: int
    receive_matrix: int
    repeats: int
    series: int  # turnaround series (phantom cases)
    case_matrix: int
    fed_cases: int  # per site
    fed_matrix: int
    fed_iterations: int
    timeout_s: float  # per inference variant
    scaling_slices: tuple[int, ...]
    chunk_slices: int | None = None  # the scaling node's [node] chunk_slices; None: the node's default
    device: str = "cpu"  # inference, levers and clinical: where stock and rtseg run the network


FULL = Plan("full", 200, 512, 300, 512, 3, 10, 256, 4, 48, 10, 3600.0, (100, 200, 400, 800))
QUICK = Plan("quick", 48, 128, 60, 256, 1, 3, 64, 2, 32, 2, 600.0, (24, 48))


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    keys = ("slices", "matrix", "series", "case_matrix", "chunk_slices", "device")
    overrides = {k: getattr(args, k, None) for k in keys}
    if args.scaling_slices:
        overrides["scaling_slices"] = tuple(args.scaling_slices)
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def run_suite(args: argparse.Namespace) -> int:
    """Run every section not skipped; write the report; 0 if all ran, 1 if any failed."""
    from rtseg_app.bench.machine import describe_machine
    from rtseg_app.bench.report import write_report

    plan = plan_from_args(args)
    out: Path = args.out
    work: Path = (args.work or out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = _model_dir(args.model)
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": plan.mode,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": asdict(plan),
        "machine": describe_machine(gpu=plan.device == "cuda"),
    }
    say(f"rtseg bench ({plan.mode}): work in {work}, report to {out}")
    uploads = args.uploads or HTTP_UPLOADS[plan.mode]
    context = _Context(plan, work, model, bool(args.levers), results, uploads, bool(args.segment_all))
    for name in wanted_sections(args):
        results[RESULT_KEYS.get(name, name)] = _run_section(name, context)
        write_report(results, out)  # a long run leaves its figures so far
    results["total_s"] = time.monotonic() - started
    json_path, md_path = write_report(results, out)
    say(f"done in {results['total_s']:.0f} s: {json_path}, {md_path}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


def wanted_sections(args: argparse.Namespace) -> list[str]:
    """``--section`` names, else the default sections and the optional ones asked for; less ``--skip``."""
    asked = {"levers": args.levers, "scaling": args.scaling}
    named = args.section or [s for s in SECTIONS if asked.get(s, True)]
    return [s for s in ALL_SECTIONS if s in named and s not in (args.skip or ())]


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class _Context:
    plan: Plan
    work: Path
    model: Path
    levers: bool
    results: dict[str, Any]
    uploads: int = HTTP_UPLOADS["full"]
    segment_all: bool = False


def _model_dir(model: Path | None) -> Path:
    from rtseg.model.default import default_model_dir
    from rtseg.model.manifest import load_manifest

    model_dir = (model or default_model_dir()).resolve()
    load_manifest(model_dir)  # a wrong folder stops the run before anything is measured
    return model_dir


def _run_section(name: str, ctx: _Context) -> dict[str, Any]:
    section: Callable[[_Context], dict[str, Any]] = SECTION_FUNCTIONS[name]
    say(f"== {name}")
    started = time.monotonic()
    try:
        figures = section(ctx)
    except SECTION_ERRORS as exc:
        log.debug("section %s failed", name, exc_info=True)  # -v shows the traceback
        say(f"   FAILED: {exc!r}")
        return {"error": repr(exc), "seconds_spent": time.monotonic() - started}
    figures["section_s"] = time.monotonic() - started
    return figures


def _bench_ct(ctx: _Context) -> tuple[Any, Any]:
    from rtseg_app.bench.volume import bench_volume

    return bench_volume(ctx.work, ctx.plan.slices, ctx.plan.matrix)


def _inference(ctx: _Context) -> dict[str, Any]:
    from rtseg_app.bench.inference import ENGINES, OURS, STOCK, UNFILTERED, compare, on_device

    volume, _ = _bench_ct(ctx)
    variants = on_device((STOCK, OURS, UNFILTERED, *ENGINES), ctx.plan.device)
    work = ctx.work / ("inference-cuda" if ctx.plan.device == "cuda" else "inference")
    return compare(ctx.model, volume, work, variants, ctx.plan.timeout_s, say)


def _levers(ctx: _Context) -> dict[str, Any]:
    """rtseg's path with one change at a time; speed and Dice relative to rtseg's path itself."""
    from rtseg_app.bench.inference import LEVERS, OURS, compare, on_device

    volume, _ = _bench_ct(ctx)
    variants = on_device((OURS, *LEVERS), ctx.plan.device)
    work = ctx.work / ("levers-cuda" if ctx.plan.device == "cuda" else "levers")
    return compare(ctx.model, volume, work, variants, ctx.plan.timeout_s, say)


def _receive(ctx: _Context) -> dict[str, Any]:
    from rtseg_app.bench.node import receive_figures

    fig: dict[str, Any] = receive_figures(
        ctx.work, ctx.plan.receive_slices, ctx.plan.receive_matrix, ctx.plan.repeats
    )
    say(f"   rtseg {fig['rtseg_s']:.2f} s vs dcmtk {fig['dcmtk_s']:.2f} s: {fig['ratio_vs_dcmtk']:.2f}×")
    return fig


def _rtstruct(ctx: _Context) -> dict[str, Any]:
    from rtseg_app.bench.rtstruct import rtstruct_build

    volume, labels = _bench_ct(ctx)
    fig = rtstruct_build(volume, labels)
    say(f"   {fig['structures']} structures on {volume.shape}: {fig['seconds']:.2f} s")
    return fig


def _turnaround(ctx: _Context) -> dict[str, Any]:
    from rtseg_app.bench.node import COMPLETE_ON_RELEASE, QUIET_S, phantom_series, turnaround
    from rtseg_app.bench.volume import bench_series

    cases = phantom_series(ctx.work, ctx.plan.series, ctx.plan.case_matrix)
    # the benchmark CT as FULL_CT_RUNS patients (copies: the same pixels, new UIDs), for a median
    full_cts = [
        bench_series(ctx.work, ctx.plan.slices, ctx.plan.matrix, copy) / "ct" for copy in range(FULL_CT_RUNS)
    ]
    times = turnaround(ctx.work / "turnaround", [*cases, *full_cts], ctx.model, QUIET_S)
    series_times, full_times = times[: len(cases)], times[len(cases) :]
    ctx.results["turnaround_full_ct"] = {
        "shape": [ctx.plan.slices, ctx.plan.matrix, ctx.plan.matrix],
        "seconds": (full_p50 := statistics.median(full_times)),
        "runs_s": full_times,
        "quiet_s": QUIET_S,
        "complete_on_release": COMPLETE_ON_RELEASE,
    }
    p50, p95 = statistics.median(series_times), float(np.percentile(series_times, 95))
    runs = ", ".join(f"{t:.1f}" for t in full_times)
    say(f"   p50 {p50:.1f} s, p95 {p95:.1f} s; benchmark CT p50 {full_p50:.1f} s ({runs})")
    return {
        "series": len(series_times),
        "matrix": ctx.plan.case_matrix,
        "quiet_s": QUIET_S,
        "complete_on_release": COMPLETE_ON_RELEASE,
        "times_s": series_times,
        "p50_s": p50,
        "p95_s": p95,
    }


def _federation(ctx: _Context) -> dict[str, Any]:
    import shutil

    from rtseg_app.bench.federation import model_update_bytes, one_round

    root = ctx.work / "federation"
    shutil.rmtree(root, ignore_errors=True)  # a fresh coordinator database every run
    plan = ctx.plan
    fig = one_round(
        root, cases_per_site=plan.fed_cases, matrix=plan.fed_matrix, iterations=plan.fed_iterations
    )
    fig["default_model_update_bytes"] = model_update_bytes(ctx.model)
    say(f"   round {fig['round_s']:.1f} s: training {fig['training_s']:.1f} s, other {fig['other_s']:.1f} s")
    return fig


def _scaling(ctx: _Context) -> dict[str, Any]:
    from rtseg.model.chunked import CHUNK_SLICES
    from rtseg_app.bench.long_series import long_series_section
    from rtseg_app.bench.node import COMPLETE_ON_RELEASE, QUIET_S, concurrent_turnaround, running_node
    from rtseg_app.bench.volume import bench_series

    plan = ctx.plan
    by_slices = {n: bench_series(ctx.work, n, plan.matrix) / "ct" for n in plan.scaling_slices}
    copies = iter(range(1, 1 + sum(CONCURRENCY)))  # a new series (new UIDs) for every send
    groups = {
        k: [bench_series(ctx.work, plan.slices, plan.matrix, next(copies)) / "ct" for _ in range(k)]
        for k in CONCURRENCY
    }
    figures: dict[str, Any] = {
        "matrix": plan.matrix,
        "chunk_slices": CHUNK_SLICES if plan.chunk_slices is None else plan.chunk_slices,
        "quiet_s": QUIET_S,
        "complete_on_release": COMPLETE_ON_RELEASE,
        "by_slices": [],
        "by_concurrency": [],
    }
    with running_node(ctx.work / "scaling", ctx.model, QUIET_S, chunk_slices=plan.chunk_slices) as node:
        for n, folder in by_slices.items():
            fig = {"slices": n, **concurrent_turnaround(node, [folder])}
            say(
                f"   {n} slices: {fig['last_s']:.1f} s, node peak RSS {fig['peak_rss_mb']:.0f} MB (sampled),"
                f" worker peak {fig['largest_process_peak_mb'] or 0:.0f} MB"
            )
            figures["by_slices"].append(fig)
        for k, folders in groups.items():
            fig = {"slices": plan.slices, **concurrent_turnaround(node, folders)}
            say(
                f"   {k} at once: last after {fig['last_s']:.1f} s, node peak RSS {fig['peak_rss_mb']:.0f} MB"
            )
            figures["by_concurrency"].append(fig)
    say("   stock-size model on long series (network stand-in; see rtseg_app/bench/long_series.py)")
    long = [n for n in plan.scaling_slices if n >= LONG_MIN_SLICES] or list(plan.scaling_slices[-1:])
    figures["stock_size"] = long_series_section(ctx.work, long, plan.matrix, say)
    return figures


def _http(ctx: _Context) -> dict[str, Any]:
    import shutil

    from rtseg_app.bench.http import run_bench

    root = ctx.work / "http"
    shutil.rmtree(root, ignore_errors=True)  # a fresh job store: every upload is this run's
    figures = run_bench(root, ctx.uploads, HTTP_MATRIX, ctx.segment_all)
    for key, value in figures.items():
        say(f"   {key}: {value}")
    ok = figures["accepted_202"] == figures["stored_intact"] == ctx.uploads
    if not ok or figures["segmentation_final"] != "done" or figures["rtstruct_dciodvfy_errors"]:
        # the figures stay in the report; the error marks the run failed (exit 1)
        figures["error"] = "uploads lost, segmentation not done or RTSTRUCT not dciodvfy-clean"
    return figures


def _robust(ctx: _Context) -> dict[str, Any]:
    import json

    from rtseg_app.bench.robust import collect_updates, compare, markdown

    root = ctx.work / "robust"  # the federation is reused when it is already there
    reference, updates = collect_updates(root)
    rows = compare(reference, updates, {u.site: u.cases for u in updates})
    (root / "robust.json").write_text(json.dumps(rows, indent=1))
    say(markdown(rows))
    return {"sites": len(updates), "rows": rows}


def _clinical(ctx: _Context) -> dict[str, Any]:
    """A stock-size nnU-Net (made and cached under the work folder): stock defaults vs rtseg's levers."""
    from rtseg_app.bench.clinical import clinical_section

    plan = ctx.plan
    return clinical_section(ctx.work, plan.slices, plan.matrix, plan.timeout_s, say, plan.device)


SECTION_FUNCTIONS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "inference": _inference,
    "receive": _receive,
    "rtstruct": _rtstruct,
    "turnaround": _turnaround,
    "federation": _federation,
    "levers": _levers,
    "scaling": _scaling,
    "http": _http,
    "robust": _robust,
    "clinical": _clinical,
}
