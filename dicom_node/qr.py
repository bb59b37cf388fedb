"""The query/retrieve SCU: finds RTSTRUCTs in a PACS (C-FIND) and fetches them and their CTs (C-GET).

Study Root model throughout. :meth:`QueryRetrieve.find_rtstructs` asks at
STUDY level for the studies in a date range, at SERIES level for their
RTSTRUCT series, and at IMAGE level for each structure set with its
StructureSetLabel and ApprovalStatus (a PACS that does not index them answers
them empty: the caller then reads them from the retrieved file). C-GET brings
the instances back on the same association as C-STORE sub-operations (SCP role
negotiated for CT Image and RT Structure Set Storage), so the PACS needs no
route back to us. Every operation opens its own association: a refusal or an
abort costs one item, not the run.

A PACS is a peer we do not control: as the node's SCP does, every association
bounds the PDUs it reads and the data set of one instance as it arrives
(:mod:`dicom_node.bounds`, ``[dicom] max_instance_mb``), and one C-GET may
write at most :class:`RetrieveLimits` (instances, bytes in all). An instance
past a bound fails the retrieval: the association is aborted and what it wrote
is deleted.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    RTStructureSetStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicom_node.bounds import bound_pdu_reads, cap_data_sets, overflow_of, pdu_read_limit
from rtseg.ct import check_instance_size
from rtseg.errors import InputError, TooLargeError
from rtseg.settings import DicomSettings

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_OUT_OF_RESOURCES = 0xA700
_STORED = (CTImageStorage, RTStructureSetStorage)
_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Pacs:
    """A PACS's query/retrieve SCP: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Pacs:
        """``ORTHANC@127.0.0.1:4242`` → Pacs; :class:`InputError` for anything else."""
        match = _ADDRESS.match(text.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise InputError("not a PACS address: expected AE@HOST:PORT, e.g. ORTHANC@10.0.0.5:4242")
        return cls(match["ae"].strip(), match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class FoundRtstruct:
    """One structure set the PACS holds; ``label``/``approval`` are "" when it did not say."""

    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: str = ""
    label: str = ""
    approval: str = ""


@dataclass(frozen=True)
class Retrieved:
    """What one C-GET brought: files written, and the problem if it did not end in Success.

    ``over_limit`` is true when the PACS sent more than :class:`RetrieveLimits`
    allow (``files`` is then 0: what it wrote was deleted).
    """

    files: int
    problem: str = ""
    over_limit: bool = False


@dataclass(frozen=True)
class RetrieveLimits:
    """What one C-GET may write: one instance's bytes, instances, and bytes in all."""

    instance_bytes: int = DicomSettings().max_instance_bytes
    instances: int = DicomSettings().retrieve_max_instances
    total_bytes: int = DicomSettings().retrieve_max_mb << 20

    @classmethod
    def of(cls, dicom: DicomSettings) -> RetrieveLimits:
        """From ``[dicom]``: ``max_instance_mb``, ``retrieve_max_instances``, ``retrieve_max_mb``."""
        return cls(dicom.max_instance_bytes, dicom.retrieve_max_instances, dicom.retrieve_max_mb << 20)


class QueryRetrieve:
    """C-FIND and C-GET against one PACS as ``calling_ae``.

    Parameters
    ----------
    pacs
        The PACS's address.
    calling_ae
        Our AE title (the PACS must know it, or accept any, for C-FIND and C-GET).
    timeout
        Seconds for connecting, association and each DIMSE message.
    limits
        What one C-GET may write.
    """

    def __init__(
        self, pacs: Pacs, calling_ae: str, timeout: float = 60.0, limits: RetrieveLimits | None = None
    ) -> None:
        self.pacs, self.calling_ae, self.timeout = pacs, calling_ae, timeout
        self.limits = limits or RetrieveLimits()

    def check_reachable(self) -> None:
        """Raise :class:`InputError` naming the address and why, if no association can be had."""
        try:
            socket.create_connection((self.pacs.host, self.pacs.port), timeout=self.timeout).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise InputError(f"cannot reach the PACS ({reason})", source=str(self.pacs)) from exc
        assoc = self._associate()
        if not assoc.is_established:
            raise InputError(_refusal(assoc, "C-FIND"), source=str(self.pacs))
        assoc.release()

    def find_rtstructs(self, since: date | None = None, until: date | None = None) -> list[FoundRtstruct]:
        """Every RTSTRUCT of the studies dated in [since, until] (open ends for None)."""
        found: list[FoundRtstruct] = []
        for study in self._find(_query("STUDY", StudyDate=_date_range(since, until))):
            study_uid = str(study.get("StudyInstanceUID", ""))
            series = _query(
                "SERIES",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID="",
                Modality="RTSTRUCT",
                SeriesNumber="",
            )
            for s in self._find(series):
                # a PACS may ignore a match key: check what it answered
                if s.get("SeriesInstanceUID") and str(s.get("Modality", "RTSTRUCT")) in ("RTSTRUCT", ""):
                    found.extend(self._instances(study_uid, s))
        return found

    def get_instance(self, item: FoundRtstruct, folder: Path) -> Retrieved:
        """C-GET one structure set into ``folder``."""
        return self._get(
            _query(
                "IMAGE",
                StudyInstanceUID=item.study_uid,
                SeriesInstanceUID=item.series_uid,
                SOPInstanceUID=item.sop_uid,
            ),
            folder,
        )

    def get_series(self, study_uid: str, series_uid: str, folder: Path) -> Retrieved:
        """C-GET a whole series (the CT a structure set references) into ``folder``."""
        return self._get(_query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid), folder)

    def find_series_of(self, study_uid: str, sop_uid: str) -> str | None:
        """The series holding instance ``sop_uid`` of ``study_uid`` (None if the PACS has none)."""
        query = _query("IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID=sop_uid, SeriesInstanceUID="")
        for answer in self._find(query):
            if answer.get("SeriesInstanceUID"):
                return str(answer.SeriesInstanceUID)
        return None

    def has_series(self, study_uid: str, series_uid: str) -> bool:
        """Whether the PACS holds series ``series_uid`` of study ``study_uid``."""
        query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        return any(str(a.get("SeriesInstanceUID", "")) == series_uid for a in self._find(query))

    # -- the network ------------------------------------------------------------------------------
    def _instances(self, study_uid: str, series: Dataset) -> Iterator[FoundRtstruct]:
        series_uid = str(series.get("SeriesInstanceUID", ""))
        query = _query(
            "IMAGE",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            SOPInstanceUID="",
            StructureSetLabel="",
            ApprovalStatus="",
        )
        for image in self._find(query):
            if not image.get("SOPInstanceUID"):
                continue
            yield FoundRtstruct(
                study_uid,
                series_uid,
                str(image.get("SOPInstanceUID", "")),
                str(series.get("SeriesNumber", "") or ""),
                str(image.get("StructureSetLabel", "") or "").strip(),
                str(image.get("ApprovalStatus", "") or "").strip().upper(),
            )

    def _find(self, query: Dataset) -> list[Dataset]:
        """The C-FIND matches; :class:`InputError` when the query does not end in Success."""
        assoc = self._associate()
        if not assoc.is_established:
            raise InputError(_refusal(assoc, "C-FIND"), source=str(self.pacs))
        answers: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(status.get("Status", -1)) if status else -1
                if code in _PENDING and identifier is not None:
                    answers.append(identifier)
                elif code != 0x0000:
                    raise InputError(f"C-FIND failed ({_status_text(code)})", source=str(self.pacs))
        finally:
            _close(assoc)
        return answers

    def _get(self, query: Dataset, folder: Path) -> Retrieved:
        folder.mkdir(parents=True, exist_ok=True)
        retrieval = _Retrieval(folder, self.limits)
        assoc = self._associate([(evt.EVT_C_STORE, retrieval.store)])
        if not assoc.is_established:
            return Retrieved(0, _refusal(assoc, "C-GET"))
        last = -1
        try:
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                last = int(status.get("Status", -1)) if status else -1
                if retrieval.over:  # here, not in the handler: our refusal must go out before the abort
                    assoc.abort()
                    break
        finally:
            _close(assoc)
        if retrieval.over:
            return Retrieved(0, retrieval.over, over_limit=True)
        problem = "" if last == 0x0000 else f"C-GET ended with {_status_text(last)}"
        return Retrieved(len(retrieval.written), problem)

    def _associate(self, handlers: list[Any] | None = None) -> Any:
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = ae.acse_timeout = self.timeout
        ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in _STORED:
            ae.add_requested_context(sop_class, _SYNTAXES)
        roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in _STORED]
        bound = (evt.EVT_CONN_OPEN, _bound, [ae.maximum_pdu_size, self.limits.instance_bytes])
        return ae.associate(
            self.pacs.host,
            self.pacs.port,
            ae_title=self.pacs.ae_title,
            ext_neg=roles,
            evt_handlers=[bound, *(handlers or [])],
        )


def _bound(event: Any, max_pdu: int, instance_bytes: int) -> None:
    """Before the PACS's first PDU: bound what this association reads (as the node's SCP does)."""
    bound_pdu_reads(event.assoc, pdu_read_limit(max_pdu))
    cap_data_sets(event.assoc, instance_bytes)


@dataclass
class _Retrieval:
    """The C-STORE sub-operations of one C-GET, within :class:`RetrieveLimits`."""

    folder: Path
    limits: RetrieveLimits
    written: list[Path] = field(default_factory=list)
    total: int = 0
    over: str = ""  # why the retrieval went past a limit ("" while within them)

    def store(self, event: Any) -> int:
        """One instance, as sent, under a counter (never a UID) name; past a limit: refuse, delete."""
        if self.over:  # sent after the abort was asked for
            return _OUT_OF_RESOURCES
        data, problem = self._check(event)
        if problem:
            self._fail(problem)
            return _OUT_OF_RESOURCES
        path = self.folder / f"{len(self.written):06d}.dcm"
        try:
            path.write_bytes(data)
        except OSError as exc:
            log.warning("cannot write a retrieved instance (%s)", exc.strerror)
            return _OUT_OF_RESOURCES  # the PACS counts a failed sub-operation
        self.written.append(path)
        self.total += len(data)
        return 0x0000

    def _check(self, event: Any) -> tuple[bytes, str]:
        """The instance's bytes, or why it may not be written ("" when it may)."""
        limits = self.limits
        too_large = f"an instance larger than {limits.instance_bytes >> 20} MB ([dicom] max_instance_mb)"
        if overflow_of(event.request) is not None:
            return b"", too_large
        if len(self.written) >= limits.instances:
            return b"", f"more than {limits.instances} instances ([dicom] retrieve_max_instances)"
        data = bytes(event.encoded_dataset())
        try:  # as the SCP checks: inflated (Deflate) and decoded size too
            check_instance_size(BytesIO(data), limits.instance_bytes, source="retrieved instance")
        except TooLargeError:
            return b"", too_large
        except InputError:
            return b"", "the PACS sent an unreadable instance"
        if self.total + len(data) > limits.total_bytes:
            return b"", f"more than {limits.total_bytes >> 20} MB in all ([dicom] retrieve_max_mb)"
        return data, ""

    def _fail(self, problem: str) -> None:
        log.warning("C-GET aborted: %s", problem)
        self.over = problem  # every later sub-operation is refused unread; _get aborts at the next response
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    if level == "STUDY" and "StudyInstanceUID" not in keys:
        ds.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _date_range(since: date | None, until: date | None) -> str:
    """DICOM date range matching: ``A-B``, ``A-``, ``-B`` or "" (any)."""
    if since is None and until is None:
        return ""
    a = since.strftime("%Y%m%d") if since else ""
    b = until.strftime("%Y%m%d") if until else ""
    return f"{a}-{b}"


def _refusal(assoc: Any, what: str) -> str:
    if assoc.is_rejected:
        return f"association for {what} rejected by the PACS (is our AE title known there?)"
    if assoc.is_aborted:
        return f"association for {what} aborted by the PACS"
    return f"no association for {what} (no answer in time)"


def _status_text(code: int) -> str:
    names = {
        0xA700: "out of resources",
        0xA701: "out of resources: unable to calculate number of matches",
        0xA702: "out of resources: unable to perform sub-operations",
        0xA900: "identifier does not match SOP class",
        0xB000: "warning: some sub-operations failed",
        0xFE00: "cancelled",
        -1: "no response (connection lost or timed out)",
    }
    if code in names:
        return f"status 0x{code:04X}, {names[code]}" if code >= 0 else names[code]
    if 0xC000 <= code <= 0xCFFF:
        return f"status 0x{code:04X}, unable to process"
    return f"status 0x{code:04X}"


def _close(assoc: Any) -> None:
    if assoc.is_established:
        assoc.release()
