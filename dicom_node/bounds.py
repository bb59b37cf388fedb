"""Bounds on what a peer may make an association of ours read: one PDU, one data set.

Shared by the SCP (:mod:`dicom_node.scp`, instances a caller stores) and the
C-GET of query/retrieve (:mod:`dicom_node.qr`, instances a PACS sends back):
a PDU longer than the limit closes the connection before it is read, and the
bytes of a data set beyond the instance bound are counted and dropped as they
arrive, never buffered, so the handler can refuse the instance once complete.
"""

from __future__ import annotations

import logging
from io import BytesIO
from typing import Any, cast

from pynetdicom.dimse_messages import DIMSEMessage

log = logging.getLogger(__name__)

UNLIMITED_PDU_READ = 64 * 1024 * 1024
UNLIMITED_INSTANCE_READ = 4096 * 1024 * 1024  # the largest dicom.max_instance_mb


def pdu_read_limit(max_pdu: int) -> int:
    """The longest PDU to read when ``max_pdu`` is advertised (0: unlimited, still bounded)."""
    return max(max_pdu + 6, 1024 * 1024) if max_pdu else UNLIMITED_PDU_READ


class CappedBuffer(BytesIO):
    """A C-STORE data set buffer that keeps at most ``limit`` bytes and counts the rest.

    pynetdicom appends every P-DATA fragment of a message to the message's data
    set buffer; past the limit this one drops what it held and what comes, so
    an oversize instance costs no memory and is refused once complete (the
    association goes on).
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0

    @property
    def overflowed(self) -> bool:
        return self.received > self.limit

    def write(self, data: Any) -> int:
        self.received += len(data)
        if not self.overflowed:
            return super().write(data)
        if self.tell():
            self.seek(0)
            self.truncate()
        return len(data)


def overflow_of(request: Any) -> int | None:
    """Bytes received of a request's data set that outgrew its bound; None if within it."""
    received = getattr(request, "DataSet", None)
    if isinstance(received, CappedBuffer) and received.overflowed:
        return received.received
    return None


def cap_data_sets(assoc: Any, limit: int) -> None:
    """Give every DIMSE message ``assoc`` receives from now on a :class:`CappedBuffer`."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def capped_receive(primitive: Any) -> None:
        if dimse.message is None:  # a new message starts: pynetdicom would make one with a BytesIO
            dimse.message = DIMSEMessage()
            dimse.message.data_set = CappedBuffer(limit)
        receive(primitive)

    dimse.receive_primitive = capped_receive


def bound_pdu_reads(assoc: Any, limit: int) -> None:
    """Close ``assoc``'s connection instead of reading a PDU longer than ``limit`` bytes."""
    sock: Any = assoc.dul.socket
    read = sock.recv

    def bounded_recv(nr_bytes: int) -> bytearray:
        if nr_bytes > limit:
            log.warning("PDU of %d bytes exceeds the limit of %d: closing the connection", nr_bytes, limit)
            raise OSError(f"PDU length {nr_bytes} exceeds {limit}")
        return cast(bytearray, read(nr_bytes))

    sock.recv = bounded_recv
