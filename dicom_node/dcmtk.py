"""Finding dcmtk's command-line tools, which the benchmarks and tests use as the reference peer.

pynetdicom installs Python apps with the same names (``storescu``,
``storescp``, ``echoscu`` …) into the environment's scripts folder, so with
rtseg's virtual environment activated a bare ``storescu`` is pynetdicom's,
which rejects dcmtk's options. :func:`dcmtk_tool` skips that folder.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path


def dcmtk_tool(name: str) -> str | None:
    """Path of dcmtk's ``name`` on PATH, never the same-named script of this Python environment."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    return shutil.which(name, path=os.pathsep.join(d for d in dirs if Path(d).resolve() != scripts))


def require_dcmtk_tool(name: str) -> str:
    """Like :func:`dcmtk_tool`; a clear error when dcmtk is not installed."""
    found = dcmtk_tool(name)
    if found is None:
        raise FileNotFoundError(f"dcmtk's {name} is not installed (Debian: apt install dcmtk)")
    return found
