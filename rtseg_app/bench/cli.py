"""``rtseg bench`` and ``rtseg node bench``: the one entry to the measurements of :mod:`rtseg_app.bench`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _node_bench(args: argparse.Namespace) -> int:
    from rtseg_app.bench.node import run_bench

    return run_bench(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from rtseg_app.bench.suite import run_suite

    return run_suite(args)


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    """Add ``rtseg bench``."""
    from rtseg_app.bench.suite import ALL_SECTIONS, SECTIONS

    p = sub.add_parser(
        "bench",
        help="measure inference vs stock nnU-Net, DICOM receive vs dcmtk, RTSTRUCT build, turnaround"
        " and one federated round; write bench.json and bench.md",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json and bench.md")
    p.add_argument("--work", type=Path, help="working folder (default OUT/work; reused between runs)")
    p.add_argument("--quick", action="store_true", help="small sizes: proves it works in a few minutes")
    p.add_argument("--levers", action="store_true", help="also measure each inference speed lever")
    p.add_argument(
        "--scaling", action="store_true", help="also turnaround and memory vs slice count and concurrency"
    )
    p.add_argument(
        "--scaling-slices",
        type=_count(8),
        nargs="+",
        metavar="N",
        help="scaling section: slice counts of the benchmark CT (default 100 200 400 800; quick 24 48)",
    )
    p.add_argument(
        "--chunk-slices",
        type=_count(0),
        metavar="N",
        help="scaling section: the node's [node] chunk_slices (default the node's, 300; 0: one piece)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="inference, levers and clinical sections: run stock nnU-Net and rtseg on this device (default"
        " cpu; cuda: on the GPU, the CPU-only runtimes left out)",
    )
    p.add_argument("--model", type=Path, help="model folder (default: the embedded default model)")
    p.add_argument("--slices", type=_count(8), help="slices of the benchmark CT (default 200; quick 48)")
    p.add_argument("--matrix", type=_count(32), help="matrix of the benchmark CT (default 512; quick 128)")
    p.add_argument("--series", type=_count(1), help="turnaround series (default 10; quick 3)")
    p.add_argument("--case-matrix", type=_count(32), help="matrix of the turnaround phantoms (default 256)")
    p.add_argument("--skip", action="append", choices=SECTIONS, help="leave a section out (repeatable)")
    p.add_argument(
        "--section",
        action="append",
        choices=ALL_SECTIONS,
        help="run only this section (repeatable); http (uploads while a segmentation runs), robust"
        " (robust aggregation vs a poisoned site) and clinical (a stock-size nnU-Net, stock vs rtseg's"
        " levers; trains its model once, ~15 min, then ~30 min of measuring) run only when named",
    )
    p.add_argument("--uploads", type=_count(1), help="http section: concurrent uploads (default 20; quick 5)")
    p.add_argument(
        "--segment-all", action="store_true", help="http section: wait for every upload's segmentation too"
    )
    handlers["bench"] = _cmd_bench


def register_node_bench(nsub: Any) -> None:
    """Add ``rtseg node bench`` to the ``rtseg node`` actions (``nsub``, from ``dicom_node.cli``)."""
    q = nsub.add_parser("bench", help="receive throughput vs dcmtk storescp, turnaround p50/p95")
    q.add_argument("--work", type=Path, default=Path("rtseg-bench"), help="working folder")
    q.add_argument("--slices", type=int, default=300, help="slices of the throughput series (default 300)")
    q.add_argument("--matrix", type=int, default=512, help="image matrix of the throughput series")
    q.add_argument("--series", type=int, default=10, help="series for the turnaround figures (default 10)")
    q.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    q.add_argument("--case-matrix", type=int, default=128, help="matrix of the turnaround phantoms")
    q.add_argument("--skip-turnaround", action="store_true")
    q.add_argument("--skip-throughput", action="store_true")
    q.set_defaults(node_action=_node_bench)
