"""The one module that imports Flower (``flwr`` 1.41): messages in, plain Python out.

Everything else in :mod:`rtseg.federation` sees :class:`Payload` (NumPy arrays
plus scalar/list config values), :class:`Reply` and :class:`Grid`; a Flower
version bump touches this file only. Arrays travel as Flower ``Array`` objects,
which serialise with ``numpy.save(allow_pickle=False)``: no pickles either way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid as FlowerGrid
from flwr.serverapp import ServerApp

from rtseg.errors import FederationError

log = logging.getLogger(__name__)

ARRAYS, CONFIG = "arrays", "config"


@dataclass(frozen=True)
class Payload:
    """What one message carries: named arrays and flat config values."""

    arrays: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteContext:
    """What a site's handler may read: its own node config and the run's config."""

    node_config: dict[str, Any]
    run_config: dict[str, Any]
    run_id: int


@dataclass(frozen=True)
class Reply:
    node_id: int
    payload: Payload | None
    error: str | None
    nbytes: int  # bytes of the records the site sent


Handler = Callable[[Payload, SiteContext], Payload]
CallNext = Callable[[Message, Context], Message]


def _to_content(payload: Payload) -> RecordDict:
    records: dict[str, Any] = {CONFIG: ConfigRecord(dict(payload.config))}
    if payload.arrays:
        records[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.arrays.items()})
    return RecordDict(records)


def payload_from_content(content: RecordDict) -> Payload:
    """The arrays and config of a message; :class:`FederationError` naming an unreadable array.

    ``Array.numpy`` refuses pickled (object) arrays and malformed bytes with a
    ``ValueError``/``TypeError``; from a peer that is bad input, not a crash.
    """
    arrays = {}
    records = content.array_records[ARRAYS] if ARRAYS in content.array_records else ArrayRecord()
    for key, array in records.items():
        try:
            arrays[key] = array.numpy()
        except (ValueError, TypeError, EOFError, OSError) as exc:
            raise FederationError(f"array {key!r} (dtype {array.dtype}) is unreadable: {exc}") from exc
    config = dict(content.config_records[CONFIG]) if CONFIG in content.config_records else {}
    return Payload(arrays, config)


def content_bytes(content: RecordDict) -> int:
    return sum(record.count_bytes() for record in content.values())


# --- site side ---------------------------------------------------------------------------------


def _handler_fn(handler: Handler) -> CallNext:
    def handle(msg: Message, context: Context) -> Message:
        site = SiteContext(dict(context.node_config), dict(context.run_config), context.run_id)
        return Message(_to_content(handler(payload_from_content(msg.content), site)), reply_to=msg)

    return handle


def record_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Write a description of every message this site sends to ``record-dir`` (if configured).

    For audits and the privacy test: record names, array keys, shapes, dtypes
    and sizes, and every config value, exactly as they leave the ClientApp.
    """
    out = call_next(msg, context)
    folder = context.node_config.get("record-dir")
    if not folder:
        return out
    if out.has_error():  # a failure's reply crosses the link too (see :func:`error_mod`)
        doc: dict[str, Any] = {"error": {"code": int(out.error.code), "reason": out.error.reason}}
    else:
        doc = describe(out.content)
    doc["message_type"] = msg.metadata.message_type
    path = Path(str(folder)) / f"{time.time_ns()}-{msg.metadata.message_type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    if not out.has_error() and ARRAYS in out.content.array_records:  # the exact arrays, for audits
        arrays = {k: a.numpy() for k, a in out.content.array_records[ARRAYS].items()}
        np.savez(path.with_suffix(".npz"), **arrays)  # type: ignore[arg-type]
    return out


def error_mod(reason: Callable[[Exception], str]) -> Callable[[Message, Context, CallNext], Message]:
    """A mod that answers a failure of the site's handler with ``reason(exception)``, logging it whole.

    Flower's own error reply would carry ``str(exception)`` to the coordinator, another
    institution; ``reason`` decides what of a failure may leave the site.
    """

    def mod(msg: Message, context: Context, call_next: CallNext) -> Message:
        try:
            return call_next(msg, context)
        except Exception as exc:  # everything the handler raises: `reason` decides what leaves the site
            log.error("the %s message failed at this site", msg.metadata.message_type, exc_info=exc)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason(exc))
            return Message(error, reply_to=msg)

    return mod


def describe(content: RecordDict) -> dict[str, Any]:
    """JSON-able description of a message's records (what crossed the link)."""
    return {
        "bytes": content_bytes(content),
        "records": {
            name: (
                {
                    "type": "arrays",
                    "arrays": {k: [list(a.shape), a.dtype, len(a.data)] for k, a in rec.items()},
                }
                if isinstance(rec, ArrayRecord)
                else {"type": type(rec).__name__, "values": dict(rec)}
            )
            for name, rec in content.items()
        },
    }


def dp_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Flower's local DP mod (clipping + noise on the update) when the run config enables it."""
    clip = float(context.run_config.get("dp-clip", 0.0))
    if clip <= 0 or not msg.metadata.message_type.startswith("train"):
        return call_next(msg, context)
    mod = LocalDpMod(
        clipping_norm=clip,
        sensitivity=clip,
        epsilon=float(context.run_config.get("dp-epsilon", 10.0)),
        delta=float(context.run_config.get("dp-delta", 1e-5)),
    )
    return mod(msg, context, call_next)


def client_app(queries: dict[str, Handler], train: Handler, reason: Callable[[Exception], str]) -> ClientApp:
    """A ClientApp answering ``query.<name>`` with ``queries[name]`` and ``train`` with ``train``.

    A handler's failure is answered with ``reason(exception)`` (see :func:`error_mod`).
    """
    app = ClientApp(mods=[record_mod, dp_mod, error_mod(reason)])  # the first wraps the others
    for name, handler in queries.items():
        app.query(name)(_handler_fn(handler))
    app.train()(_handler_fn(train))
    return app


# --- coordinator side --------------------------------------------------------------------------


class Grid:
    """The coordinator's view of the federation: connected sites, send and wait for replies."""

    def __init__(self, grid: FlowerGrid) -> None:
        self._grid = grid

    @property
    def run_id(self) -> int:
        return int(self._grid.run.run_id)

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self._grid.get_node_ids())

    def wait_for_nodes(self, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(nodes := self.node_ids()) < minimum and time.monotonic() < deadline:
            time.sleep(poll)
        return nodes

    def send(self, kind: str, payloads: dict[int, Payload], timeout: float) -> list[Reply]:
        """Send ``kind`` (``train`` or ``query.<name>``) to each node; replies that came in time."""
        messages = [
            Message(content=_to_content(p), message_type=kind, dst_node_id=node)
            for node, p in payloads.items()
        ]
        replies = []
        for msg in self._grid.send_and_receive(messages, timeout=timeout):
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                replies.append(Reply(node, None, str(msg.error.reason), 0))
                continue
            try:
                payload = payload_from_content(msg.content)
            except FederationError as exc:  # this site's reply is dropped, the others' are not
                replies.append(Reply(node, None, str(exc), content_bytes(msg.content)))
                continue
            replies.append(Reply(node, payload, None, content_bytes(msg.content)))
        return replies


def server_app(main: Callable[[Grid, dict[str, Any]], None]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: FlowerGrid, context: Context) -> None:
        main(Grid(grid), dict(context.run_config))

    return app
