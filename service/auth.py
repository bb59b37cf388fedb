"""Bearer-token authentication: tokens live in the configuration only as SHA-256 digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from flask import request

from service.problems import HttpProblem

REALM = 'Bearer realm="rtseg"'


def token_digest(token: str) -> str:
    """The SHA-256 hex digest stored in ``[http] token_sha256`` for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh random token and its digest."""
    token = secrets.token_urlsafe(32)
    return token, token_digest(token)


def token_matches(token: str, digests: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured digest (no early exit)."""
    presented = token_digest(token).encode()
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest.encode())
    return found


def authorization_problem(header: str, digests: tuple[str, ...]) -> tuple[str, str] | None:
    """Why an ``Authorization`` header value does not authenticate, or ``None`` when it does.

    Returns
    -------
    tuple[str, str] | None
        The problem's detail and the ``WWW-Authenticate`` value of the 401.
    """
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "send 'Authorization: Bearer <token>'", REALM
    if not token_matches(token.strip(), digests):
        return "the bearer token is not valid", REALM + ', error="invalid_token"'
    return None


def require_token(digests: tuple[str, ...]) -> None:
    """Raise a 401 problem unless the request carries one of the configured tokens."""
    refused = authorization_problem(request.headers.get("Authorization", ""), digests)
    if refused is not None:
        detail, challenge = refused
        raise HttpProblem(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})
