"""What logs, paths and audit records show instead of DICOM identifiers."""

from __future__ import annotations

import hashlib

KEY_CHARS = 24  # hex characters of a SHA-256: 96 bits, no collisions in practice


def uid_key(uid: str) -> str:
    """Stable, path-safe key of a UID: the same series has the same key in every log and folder."""
    return hashlib.sha256(f"rtseg-uid/{uid}".encode()).hexdigest()[:KEY_CHARS]
