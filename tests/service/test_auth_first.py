"""An unauthenticated upload is refused from its headers, before its body is read (real server)."""

from __future__ import annotations

import json
import os
import select
import socket
import tempfile
from collections.abc import Callable

import pytest
from svc_helpers import Running

ANNOUNCED = 500 << 20  # the declared body: 500 MB
GIVE_UP = 64 << 20  # the old server read this much without answering; enough to show it
CHUNK = 64 << 10


def _temp_files() -> dict[str, tuple[str, int]]:
    """The files this process (the in-process server) holds open in the temp folder: fd → (target, size).

    waitress spools a body into an unnamed ``TemporaryFile`` right in that folder (the
    job store's database lies deeper, in pytest's own folders).
    """
    tmp = os.path.realpath(tempfile.gettempdir())
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.dirname(target) == tmp:
                found[fd] = (target, os.stat(f"/proc/self/fd/{fd}").st_size)
        except OSError:
            continue  # closed while we looked
    return found


def _server_temp_bytes(before: dict[str, tuple[str, int]]) -> int:
    """Bytes in temp files opened since ``before`` (other tests of this process may hold some)."""
    return sum(size for fd, (target, size) in _temp_files().items() if before.get(fd, ("", 0))[0] != target)


def _send_until_answered(running: Running, headers: str) -> tuple[int, bytes, int]:
    """Send ``headers`` and then body bytes until the server answers; (sent, answer, temp bytes)."""
    before = _temp_files()
    sock = socket.create_connection((running.server.host, running.server.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    sock.sendall(headers.encode())
    sent, block, temp = 0, b"\0" * CHUNK, 0
    try:
        while sent < GIVE_UP:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if not writable:
                pytest.fail(f"the server neither read nor answered after {sent} body bytes")
            sent += sock.send(block)
        temp = _server_temp_bytes(before)
        answer = _read_all(sock)
    except (BrokenPipeError, ConnectionResetError):
        answer = _read_all(sock)
    finally:
        sock.close()
    return sent, answer, temp


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except (ConnectionResetError, TimeoutError):
        pass  # the server closed with our unread body in its buffer: what it sent before still counts
    return b"".join(chunks)


def _request(authorization: str | None) -> str:
    lines = [
        "POST /v1/segmentations HTTP/1.1",
        "Host: localhost",
        "Content-Type: application/zip",
        f"Content-Length: {ANNOUNCED}",
    ]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [(None, "Authorization: Bearer"), ("Bearer wrong-token", "not valid"), ("Basic dXNlcjpwdw==", "Bearer")],
)
def test_upload_without_a_valid_token_is_refused_before_the_body_is_read(
    serve: Callable[..., Running], authorization: str | None, detail: str
) -> None:
    running = serve(max_body_bytes=1 << 30)
    sent, answer, temp = _send_until_answered(running, _request(authorization))
    assert answer, f"no answer after {sent} body bytes; the server buffered {temp} bytes in temp files"
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert status_line.split()[1] == "401", answer[:300]
    assert headers["content-type"] == "application/problem+json"
    assert headers["www-authenticate"].startswith("Bearer")
    assert headers["connection"].lower() == "close"
    problem = json.loads(body)
    assert problem["status"] == 401
    assert problem["type"] == "urn:rtseg:problem:unauthorized"
    assert detail in problem["detail"]
    assert sent <= 8 << 20, f"the client could send {sent} bytes before the 401"
    assert temp == 0, f"the server spooled {temp} bytes of an unauthenticated body"
    assert running.job_dirs() == []


def test_a_valid_token_lets_the_body_through_to_the_app(serve: Callable[..., Running]) -> None:
    running = serve(max_body_bytes=1 << 20)
    response = running.post(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: read, then refused by the app
    assert response.status_code == 422, response.text
    assert "holds no files" in response.json()["detail"]


def test_a_bodyless_request_reaches_the_app_without_a_token(serve: Callable[..., Running]) -> None:
    running = serve()
    sock = socket.create_connection((running.server.host, running.server.port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    answer = _read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
