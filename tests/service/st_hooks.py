"""schemathesis hooks for ``st run`` (``SCHEMATHESIS_HOOKS``): how to send the bodies of our media types.

``multipart/related`` (DICOMweb STOW-RS) has no built-in serializer: send the generated
bytes as the body, which the server must refuse with a 4xx as it refuses any bad body.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.transport.serialization import serialize_binary


@schemathesis.serializer("multipart/related")
def _related(ctx: Any, value: Any) -> bytes:
    return serialize_binary(value)
