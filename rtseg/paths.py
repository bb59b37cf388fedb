"""Names that become paths: checked against one strict pattern, and kept under their root.

Names that arrive from elsewhere (a coordinator's plans, a peer's message, a
model folder, a command line) must never pick where rtseg writes or deletes.
A name is one path component of letters, digits, ``_``, ``.`` and ``-``, at
most 64 characters, starting with a letter or digit (so never ``..``, never
absolute, never hidden); :func:`safe_child` also checks that the joined path,
symbolic links resolved, stays under its root.
"""

from __future__ import annotations

import re
from pathlib import Path

from rtseg.errors import InputError, RtsegError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def safe_name(name: object, what: str, error: type[RtsegError] = InputError) -> str:
    """``name`` if it is one safe path component, else ``error`` saying which ``what`` it was.

    Parameters
    ----------
    name
        The candidate (anything: it may come from JSON).
    what
        What the name is, for the message (e.g. "dataset name in the coordinator's plans").
    error
        The :class:`~rtseg.errors.RtsegError` subclass to raise.
    """
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        shown = repr(name)[:80]
        raise error(
            f"{what} {shown} is not a plain name (1-64 letters, digits, '_', '.', '-', starting with a letter"
            " or digit, no '..'); rtseg does not build a path from it"
        )
    return name


def safe_child(root: Path, name: object, what: str, error: type[RtsegError] = InputError) -> Path:
    """``root / name`` for a :func:`safe_name`, refused if it would resolve outside ``root``.

    The resolution check catches a symbolic link planted under ``root`` that
    points elsewhere, so a later write or delete of the returned path stays
    inside ``root``.
    """
    child = Path(root) / safe_name(name, what, error)
    base = Path(root).resolve()
    if not child.resolve().is_relative_to(base):
        raise error(f"{what} {name!r} leads outside {base}; rtseg does not write or delete there")
    return child
