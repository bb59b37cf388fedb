"""``rtseg evaluate``: the two-center study, with progress bars and the headline on stdout."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


@contextmanager
def _bar(description: str, total: int) -> Iterator[Callable[[], None]]:
    from tqdm import tqdm

    with tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True, mininterval=1.0) as bar:
        yield lambda: bar.update(1)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rtseg.study.design import CENTERS, FULL, QUICK
    from rtseg.study.runner import run_study

    spec = QUICK if args.quick else FULL
    work: Path = args.work or args.out.with_name(args.out.name + "-work")
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {msg}", flush=True)

    centers = " and ".join(CENTERS)
    say(f"{spec.mode} study: five models, phantom centers {centers}; work folder {work} (resumable)")
    result = run_study(spec, args.out, work, threads=args.threads, stage=_bar, say=say)
    print(result.headline)
    print()
    for paragraph in result.conclusion:
        print(paragraph)
    print()
    say(f"written: {result.results_md}, {result.results_csv}, {len(result.figures)} figures in {args.out}")
    return 0


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="two-center study on phantoms: local, federated, centralised and ensemble models compared",
    )
    p.add_argument("--out", type=Path, required=True, help="results folder (results.md, results.csv, PNGs)")
    p.add_argument("--quick", action="store_true", help="tiny models and few small cases (≤ 5 min; for CI)")
    p.add_argument("--work", type=Path, help="working folder, reused to resume (default: <out>-work)")
    p.add_argument("--threads", type=int, help="CPU threads for inference (default: torch's)")
    handlers["evaluate"] = _cmd_evaluate
