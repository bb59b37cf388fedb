"""What logs, paths and audit records show instead of DICOM identifiers."""

from __future__ import annotations

import hashlib
import re

KEY_CHARS = 24  # hex characters of a SHA-256: 96 bits, no collisions in practice


def uid_key(uid: str) -> str:
    """Stable, path-safe key of a UID: the same series has the same key in every log and folder."""
    return hashlib.sha256(f"rtseg-uid/{uid}".encode()).hexdigest()[:KEY_CHARS]


# a DICOM UID (12+ characters of digits and dots, 3+ components, e.g. "2.25.<uuid digits>") or its tail as
# error messages print it ("…" + digits); version numbers and millimetres are too short to match
_UID_TEXT = re.compile(r"(?<![\w.])(?:(?=[\d.]{12,})\d+(?:\.\d+){2,}|…[\d.]{6,})(?![\w.])")


def redact_uids(text: str) -> str:
    """``text`` with every DICOM UID (or printed UID tail) replaced by ``<uid>``, for logs."""
    return _UID_TEXT.sub("<uid>", text)
