"""The ``rtseg`` command line: the composition root's ``main``.

It builds one parser from the core's commands (:mod:`rtseg.cli`,
:mod:`rtseg.cli_commands`, :mod:`rtseg.federation.cli`, :mod:`rtseg.study.cli`),
the faces' (:mod:`dicom_node.cli`, :mod:`service.cli`) and its own (``bench``,
``serve``, ``cases … --pacs``), each imported by name. User-facing output goes to stdout/stderr here
and in the command modules only. Every :class:`rtseg.errors.RtsegError` becomes a
one-line message and exit code 2; no traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from dicom_node import cli as node_cli
from rtseg import __version__, cli_commands
from rtseg import cli as core_cli
from rtseg.errors import RtsegError
from rtseg.federation import cli as federation_cli
from rtseg.privacy import configure_logging
from rtseg.study import cli as study_cli
from rtseg_app import cases, serve
from rtseg_app.bench import cli as bench_cli
from service import cli as http_cli

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="rtseg", description="Organ-at-risk segmentation for radiotherapy planning."
    )
    parser.add_argument("--version", action="version", version=f"rtseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    # the order of `rtseg --help`
    core_cli.register(sub, handlers)
    cases.register(cli_commands.register(sub, handlers), handlers)  # --pacs beside --from
    bench_cli.register(sub, handlers)
    serve.register(sub, handlers)
    bench_cli.register_node_bench(node_cli.register(sub, handlers))
    http_cli.register(sub, handlers)
    federation_cli.register(sub, handlers)
    study_cli.register(sub, handlers)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    try:
        code = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe fails here, not at exit
        return code
    except RtsegError as exc:
        print(f"rtseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rtseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rtseg model info | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
