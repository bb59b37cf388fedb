"""The DICOM SCP: C-ECHO and C-STORE (CT Image, RT Structure Set) into the spool.

Event handlers stay thin: they pass the raw encoded dataset to
:class:`Receiver`, the one place that turns what happened into a DIMSE status.
Associations from callers not on the allow-list are rejected; PDUs longer than
the advertised maximum are refused by closing the connection; pynetdicom's
identifier logging is off. One instance is bounded (``dicom.max_instance_mb``)
as it arrives: the bytes of a C-STORE data set beyond the bound are counted and
dropped, not buffered, and the instance is refused "out of resources" once it is
complete; a Deflate data set is inflated in bounded steps, never whole.
"""

from __future__ import annotations

import errno
import itertools
import logging
import re
import ssl
import threading
import weakref
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from typing import Any, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.assembly import CT_KIND, Assembler, LateInstance, Peer, SeriesHeader
from dicom_node.bounds import (
    UNLIMITED_INSTANCE_READ,
    UNLIMITED_PDU_READ,
    bound_pdu_reads,
    cap_data_sets,
    overflow_of,
    pdu_read_limit,
)
from dicom_node.spool import Spool, uid_key
from rtseg.audit import AuditLog
from rtseg.ct import READ_ERRORS, check_instance_size, series_uid_of, sop_uid_of
from rtseg.deliveries import DeliveryStore
from rtseg.errors import InputError, TooLargeError
from rtseg.settings import DicomSettings

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]
RT_KIND = "rtstruct"
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "ImageType",
    "SliceThickness",
    "FrameOfReferenceUID",
    "SeriesNumber",
]


def conformant_uid(uid: object) -> bool:
    return isinstance(uid, str) and len(uid) <= 64 and _UID_RE.match(uid) is not None


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class Receiver:
    """Stores received instances; every C-STORE outcome becomes a DIMSE status here."""

    def __init__(
        self,
        spool: Spool,
        assembler: Assembler,
        records: DeliveryStore,
        audit: AuditLog,
        accept_rtstruct: bool = True,
        max_instance_bytes: int = DicomSettings().max_instance_bytes,
    ) -> None:
        self.spool = spool
        self.assembler = assembler
        self.records = records
        self.audit = audit
        self.accept_rtstruct = accept_rtstruct
        self.max_instance_bytes = max_instance_bytes
        # associations numbered once each, never reused (ids of dead objects are)
        self._associations: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._numbers = itertools.count(1)
        self._numbering = threading.Lock()

    def association(self, assoc: Any) -> int:
        """The number of the association ``assoc`` (given on first use)."""
        with self._numbering:
            if assoc not in self._associations:
                self._associations[assoc] = next(self._numbers)
            return self._associations[assoc]

    def association_ended(self, assoc: Any, *, released: bool) -> None:
        """Tell assembly that ``assoc`` ended: released normally, or aborted."""
        number = self.association(assoc)
        if released:
            self.assembler.released(number)
        else:
            self.assembler.aborted(number)

    def too_large(self, n_bytes: int, peer: Peer) -> Dataset:
        """The status of an instance whose data set outgrew the bound while it arrived."""
        log.warning(
            "C-STORE from %s refused: %d bytes or more, larger than the limit of %d MB",
            peer.ae_title,
            n_bytes,
            self.max_instance_bytes >> 20,
        )
        return _status(
            OUT_OF_RESOURCES, f"Out of resources: instance over {self.max_instance_bytes >> 20} MB"
        )

    def store(self, data: bytes, sop_class: str, sop_instance: str, peer: Peer) -> int | Dataset:
        if not self.spool.has_space():
            log.error("C-STORE refused: free disk below the threshold")
            return _status(OUT_OF_RESOURCES, "Out of resources: disk space low")
        refused = self._check_size(data, peer)
        if refused is not None:
            return refused
        try:
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            header, uids = _header(ds)
        except READ_ERRORS as exc:
            log.warning("C-STORE from %s refused: unreadable dataset (%s)", peer.ae_title, type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "Cannot understand: malformed dataset")
        problem = _check_uids(uids, sop_class, sop_instance)
        if problem is not None:
            log.warning("C-STORE from %s refused: %s", peer.ae_title, problem)
            code = DATASET_MISMATCH if "SOP class" in problem else CANNOT_UNDERSTAND
            return _status(code, problem)
        series_key, instance_key = uid_key(uids["SeriesInstanceUID"]), uid_key(sop_instance)
        if sop_class == RTStructureSetStorage:
            return self._store_rt(data, series_key, instance_key, peer)
        return self._store_ct(data, header, series_key, instance_key, peer)

    def _check_size(self, data: bytes, peer: Peer) -> Dataset | None:
        try:
            check_instance_size(BytesIO(data), self.max_instance_bytes, source="instance")
        except TooLargeError as exc:
            log.warning("C-STORE from %s refused: %s", peer.ae_title, exc.message)
            if exc.inflated:  # a decompression bomb is malformed input, not a resource shortage
                return _status(CANNOT_UNDERSTAND, "Cannot understand: Deflate data set too large")
            return _status(
                OUT_OF_RESOURCES, f"Out of resources: instance over {self.max_instance_bytes >> 20} MB"
            )
        except InputError as exc:
            log.warning("C-STORE from %s refused: %s", peer.ae_title, exc.message)
            return _status(CANNOT_UNDERSTAND, "Cannot understand: malformed dataset")
        return None

    def _store_ct(
        self, data: bytes, header: SeriesHeader, series_key: str, instance_key: str, peer: Peer
    ) -> int | Dataset:
        try:
            if not self.assembler.begin(series_key, header, peer, instance_key):
                # sent again after its series was completed: acknowledged, kept once; other
                # content under the same SOP Instance UID is audited, never silently dropped
                self.spool.same_as_stored(CT_KIND, series_key, instance_key, data, "ignored")
                return SUCCESS
        except LateInstance as exc:
            return _status(CANNOT_UNDERSTAND, f"Refused: {exc}")
        try:
            self.spool.write(CT_KIND, series_key, instance_key, data)
        except OSError as exc:
            return _write_failed(exc)
        finally:
            self.assembler.end(series_key)
        return SUCCESS

    def _store_rt(self, data: bytes, series_key: str, instance_key: str, peer: Peer) -> int | Dataset:
        if not self.accept_rtstruct:
            return _status(DATASET_MISMATCH, "RT Structure Sets are not accepted here")
        try:
            path = self.spool.write(RT_KIND, series_key, instance_key, data)
        except OSError as exc:
            return _write_failed(exc)
        rel = f"spool/{RT_KIND}/{series_key}/{path.name}"
        self.records.record_object(instance_key, RT_KIND, series_key, rel, peer.ae_title)
        self.audit.record(
            "rtstruct_received", calling_ae=peer.ae_title, series=series_key, instance=instance_key
        )
        log.info("RT Structure Set %s received from %s", instance_key, peer.ae_title)
        return SUCCESS


def _write_failed(exc: OSError) -> Dataset:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("C-STORE refused: disk full")
        return _status(OUT_OF_RESOURCES, "Out of resources: disk full")
    log.error("C-STORE failed: cannot write to the spool (%s)", exc.strerror)
    return _status(PROCESSING_FAILURE, "Processing failure: cannot store")


def _header(ds: Dataset) -> tuple[SeriesHeader, dict[str, str]]:
    # an empty SOP UID in the data set falls back to the file meta's (here: the C-STORE request's)
    uids = {k: sop_uid_of(ds, k) for k in ("SOPClassUID", "SOPInstanceUID")}
    uids["SeriesInstanceUID"] = series_uid_of(ds)  # an empty one: derived as the loader derives it
    image_type = ds.get("ImageType", [])
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    thickness = ds.get("SliceThickness")
    header = SeriesHeader(
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        body_part=str(ds.get("BodyPartExamined", "")),
        image_type=tuple(str(t).upper() for t in image_type),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
    )
    return header, uids


def _check_uids(uids: dict[str, str], sop_class: str, sop_instance: str) -> str | None:
    for name in ("SOPInstanceUID", "SeriesInstanceUID"):
        if not conformant_uid(uids[name]):
            return f"Cannot understand: non-conformant {name}"
    if not conformant_uid(sop_instance) or uids["SOPInstanceUID"] != sop_instance:
        return "Cannot understand: SOP Instance UID differs from the request"
    if uids["SOPClassUID"] != sop_class:
        return "Data set does not match the SOP class"
    return None


# -- pynetdicom wiring -------------------------------------------------------------------
def _peer(assoc: Any) -> Peer:
    requestor = assoc.requestor
    ae_title = requestor.ae_title
    if not ae_title and requestor.primitive is not None:  # during EVT_REQUESTED
        ae_title = requestor.primitive.calling_ae_title
    return Peer(str(ae_title).strip(), str(requestor.address))


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_store(event: evt.Event, receiver: Receiver) -> int | Dataset:
    request = cast(C_STORE, event.request)
    overflow = overflow_of(request)
    if overflow is not None:
        return receiver.too_large(overflow, _peer(event.assoc))
    data = event.encoded_dataset(include_meta=True)
    peer = replace(_peer(event.assoc), association=receiver.association(event.assoc))
    return receiver.store(data, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID), peer)


def handle_ended(event: evt.Event, receiver: Receiver) -> None:
    """EVT_RELEASED or EVT_ABORTED; a connection dropped without either never counts as released."""
    receiver.association_ended(event.assoc, released=event.event == evt.EVT_RELEASED)


AssociationObserver = Callable[[str], None]  # called with "accepted", "rejected" or "aborted"


def handle_requested(
    event: evt.Event, settings: DicomSettings, audit: AuditLog, observe: AssociationObserver
) -> None:
    peer = _peer(event.assoc)
    if caller_allowed(settings, peer):
        return
    log.warning("association rejected: calling AE %s from %s is not allowed", peer.ae_title, peer.host)
    audit.record("association_rejected", calling_ae=peer.ae_title, host=peer.host)
    observe("rejected")
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)


def handle_accepted(event: evt.Event, audit: AuditLog, observe: AssociationObserver) -> None:
    peer = _peer(event.assoc)
    log.info("association accepted from %s (%s)", peer.ae_title, peer.host)
    audit.record("association_accepted", calling_ae=peer.ae_title, host=peer.host)
    observe("accepted")


def handle_aborted(event: evt.Event, observe: AssociationObserver) -> None:
    peer = _peer(event.assoc)
    log.warning("association from %s (%s) aborted", peer.ae_title, peer.host)
    observe("aborted")


def caller_allowed(settings: DicomSettings, peer: Peer) -> bool:
    if not settings.allowed_callers:
        return True
    return any(
        c.ae_title == peer.ae_title and (c.host is None or c.host == peer.host)
        for c in settings.allowed_callers
    )


class _BoundedRequestHandler(RequestHandler):
    """Refuses (closes the connection on) a PDU longer than the server allows; caps data sets."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        cap_data_sets(assoc, getattr(self.server, "max_instance_read", UNLIMITED_INSTANCE_READ))
        bound_pdu_reads(assoc, getattr(self.server, "max_pdu_read", UNLIMITED_PDU_READ))
        return assoc


def server_ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: callers present a certificate from our CA
    return ctx


def build_ae(settings: DicomSettings) -> AE:
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.network_timeout_s
    ae.maximum_associations = 16
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES)
    if settings.accept_rtstruct:
        ae.add_supported_context(RTStructureSetStorage, TRANSFER_SYNTAXES[:4])
    return ae


def start_scp(
    settings: DicomSettings,
    receiver: Receiver,
    audit: AuditLog,
    observe: AssociationObserver = lambda outcome: None,
) -> ThreadedAssociationServer:
    """Bind and serve in a background thread; returns the server (``server_address`` has the port).

    ``observe`` is told the outcome of every association (for metrics).
    """
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_REQUESTED, handle_requested, [settings, audit, observe]),
        (evt.EVT_ACCEPTED, handle_accepted, [audit, observe]),
        (evt.EVT_ABORTED, handle_aborted, [observe]),
        (evt.EVT_ABORTED, handle_ended, [receiver]),
        (evt.EVT_RELEASED, handle_ended, [receiver]),
    ]
    server = ae.make_server(
        (settings.host, settings.port),
        ae_title=settings.ae_title,
        ssl_context=server_ssl_context(settings),
        evt_handlers=handlers,
        server_class=ThreadedAssociationServer,
        request_handler=_BoundedRequestHandler,
    )
    server.max_pdu_read = pdu_read_limit(settings.max_pdu)  # type: ignore[attr-defined]
    server.max_instance_read = receiver.max_instance_bytes  # type: ignore[attr-defined]
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() expects it there
    thread = threading.Thread(target=server.serve_forever, name="rtseg-scp", daemon=True)
    thread.start()
    return server
