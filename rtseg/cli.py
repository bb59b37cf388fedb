"""``rtseg phantom``: the core's first command.

The ``rtseg`` command line itself (``main``, the parser, the error handling)
lives in the composition root, :mod:`rtseg_app.cli`, which registers this
command with :func:`register`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _cmd_phantom(args: argparse.Namespace) -> int:
    from rtseg.phantom.cohort import CaseInfo, generate_cohort
    from rtseg.phantom.realism import Realism

    started = time.monotonic()

    def show(i: CaseInfo) -> None:
        print(
            f"  {i.case_id}: {i.age_years:4.1f} y  {i.variant:<14} {i.phase:<3} {i.patient_position}  "
            f"{i.n_slices} slices × {i.slice_thickness_mm} mm, pixel {i.pixel_spacing_mm} mm",
            flush=True,
        )

    realism = Realism.parse(args.realism)
    extra = f", realism {realism.tag}" if not realism.off else ""
    print(
        f"writing {args.cases} center-{args.center} phantom case(s), seed {args.seed}{extra}, to {args.out}"
    )
    infos = generate_cohort(
        args.center,
        args.cases,
        args.seed,
        args.out,
        matrix=args.matrix,
        workers=args.workers,
        start=args.start,
        progress=show,
        couch=args.couch,
        realism=realism,
    )
    print(
        f"done: {len(infos)} case(s) in {time.monotonic() - started:.0f} s "
        f"(each: ct/ DICOM series, labels.nii.gz, case.json)"
    )
    return 0


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    """Add ``rtseg phantom``."""
    p = sub.add_parser("phantom", help="generate synthetic pediatric abdominal CT cases with ground truth")
    p.add_argument(
        "--center",
        required=True,
        choices=["A", "B", "C", "D"],  # rtseg.phantom.cohort.CENTERS (not imported: CLI start-up)
        help="center (scanner, protocol, population): A, B (the default model's), C, D (the study's)",
    )
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cases")
    p.add_argument("--start", type=int, default=0, help="index of the first case (default 0)")
    p.add_argument("--matrix", type=int, default=256, help="image matrix (default 256; 512 for full-size CT)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument(
        "--couch",
        action="store_true",
        help="lay the patients on a treatment couch (curved top, mattress, vacuum bag; not body)",
    )
    p.add_argument(
        "--realism",
        default="none",
        metavar="OPTIONS",
        help="closer to real CT: none (default), clinical (a realistic mix) or a comma list of "
        "arms_down, truncation, metal, motion, short_scan, noise_texture, partial_volume, bowel, "
        "spleen_descent, phase=nc|art|pv, coverage=long|pelvis|thorax (see docs/phantom.md)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    handlers["phantom"] = _cmd_phantom
