"""Sub-commands beyond ``phantom``: registered here so cli.py stays small.

The DICOM node and HTTP faces add their own commands through a ``register``
function in ``dicom_node.cli`` / ``service.cli`` (the CLI is the one place that
composes the faces; the core library never imports them).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]
FACE_MODULES = ("dicom_node.cli", "service.cli")


def register(sub: Any, handlers: dict[str, Handler]) -> None:
    for name in FACE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub, handlers)
