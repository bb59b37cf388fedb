"""``/dicomweb/studies``: DICOMweb STOW-RS, a second way to submit CT series over HTTP (PS3.18 §10.5).

The body is ``multipart/related; type="application/dicom"``, one DICOM instance
per part. It is split into files as it is read, in 1 MiB steps, so that no more
than one step and one part's headers are ever held in memory. Neither the
stdlib ``email`` parser (it builds the whole message in memory) nor werkzeug's
multipart decoder (form-data only: it refuses a part without
``Content-Disposition``, which STOW parts never carry) fits, hence the small
splitter :class:`_Related` (RFC 2046 §5.1.1: preamble, transport padding after
a delimiter, the close delimiter, an epilogue; CRLF line breaks only).

Instances are grouped by series; every CT series becomes one job through the
same admission and checks as a zip upload (:mod:`service.segmentations`,
:func:`service.uploads.receive`). The answer is the Store Instances Response
Module as ``application/dicom+json``: ``ReferencedSOPSequence`` for what was
accepted, ``FailedSOPSequence`` with a ``FailureReason`` for the rest; 200 when
all were accepted, 202 when some failed, 409 when none was accepted. Each job
is linked with ``Link: </v1/segmentations/<id>>; rel="related"``, and every
failure's reason in words is a ``Warning: 299`` header (PS3.18 §8.10.3).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pydicom
from flask import Blueprint, Response, request, url_for
from pydicom.dataset import Dataset

from rtseg.ct import CT_IMAGE_STORAGE, READ_ERRORS, check_instance_size, read_head, series_uid_of, sop_uid_of
from rtseg.errors import InputError, TooLargeError
from rtseg.jobs import Job, JobState
from service.auth import require_token
from service.context import ServiceContext, service
from service.problems import HttpProblem
from service.segmentations import admit, discard, upload_slot
from service.uploads import Part, UploadError, receive, sniff

log = logging.getLogger(__name__)
bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")
bp.before_request(lambda: require_token(service().settings.token_sha256))

DICOM_JSON = "application/dicom+json"
STOW_FOLDER = "stow"  # <data dir>/stow/<request>/: the parts of one request until they join a job

# FailureReason (0008,1197) values, PS3.18 §10.5.3 and the C-STORE statuses of PS3.4 B.2.3
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

_CHUNK = 1 << 20
_MAX_HEADER_BYTES = 16 << 10  # one part's MIME headers
_MAX_BOUNDARY = 200


@dataclass
class Instance:
    """One part of the request: where it was spooled, what it is, and why it was refused (if it was)."""

    index: int
    path: Path
    media_type: str = "application/dicom"
    size: int = 0
    sop_class: str = ""
    sop_instance: str = ""
    series: str = ""
    study: str = ""
    failure: int | None = None
    reason: str = ""
    job_id: str | None = field(default=None)

    def fail(self, code: int, reason: str) -> None:
        self.failure, self.reason = code, reason


@bp.post("/studies")
@bp.post("/studies/<study>")
def store(study: str | None = None) -> Response:
    """STOW-RS: store the instances of the body, one job per CT series."""
    ctx = service()
    boundary = _boundary()
    _check_accept()
    if (request.content_length or 0) > ctx.settings.max_body_bytes:
        raise HttpProblem(
            413, "too-large", f"the body is larger than the limit of {ctx.settings.max_body_bytes} bytes"
        )
    with upload_slot(ctx):
        return _store(ctx, boundary, study)


def _store(ctx: ServiceContext, boundary: bytes, study: str | None) -> Response:
    spool = ctx.data_dir / STOW_FOLDER / uuid.uuid4().hex
    spool.mkdir(parents=True)
    try:
        limits = ctx.limits
        instances = _Related(request.stream, boundary).split(
            spool, limits.max_instance_bytes, limits.max_files
        )
        for instance in instances:
            _identify(instance, study, limits.max_instance_bytes)
        jobs = [job for members in _series(instances) if (job := _submit(ctx, members)) is not None]
    finally:
        shutil.rmtree(spool)
    log.info(
        "STOW-RS: %d instance(s), %d refused, %d job(s) queued",
        len(instances),
        sum(i.failure is not None for i in instances),
        len(jobs),
    )
    return _response(instances, jobs)


# -- the request's media types ----------------------------------------------------------------


def _boundary() -> bytes:
    """The boundary of a ``multipart/related`` body of ``application/dicom`` parts (415 or 400 else)."""
    if request.mimetype != "multipart/related":
        raise HttpProblem(
            415,
            "unsupported-media-type",
            f'send multipart/related; type="application/dicom" (got {request.mimetype or "none"})',
        )
    params = request.mimetype_params
    root = params.get("type", "application/dicom").lower()
    if root != "application/dicom":
        raise HttpProblem(
            415,
            "unsupported-media-type",
            f"only application/dicom instances are accepted (type={root!r}); "
            "metadata with bulk data is not supported",
        )
    boundary = params.get("boundary", "")
    # RFC 2046 allows 70 characters; Orthanc's DICOMweb plugin sends 73: accept what senders use
    if not 1 <= len(boundary) <= _MAX_BOUNDARY or not boundary.isascii():
        raise HttpProblem(
            400,
            "bad-multipart",
            f"the Content-Type needs a boundary of 1 to {_MAX_BOUNDARY} ASCII characters",
        )
    return boundary.encode("ascii")


def _check_accept() -> None:
    if (
        "Accept" in request.headers
        and request.accept_mimetypes.best_match([DICOM_JSON, "application/json"]) is None
    ):
        raise HttpProblem(406, "not-acceptable", f"the response is {DICOM_JSON}; accept it")


# -- the multipart/related body ---------------------------------------------------------------


def _bad(detail: str) -> UploadError:
    return UploadError(detail, status=400, slug="bad-multipart")


class _Related:
    """Splits a ``multipart/related`` body into files while reading it, one chunk at a time."""

    def __init__(self, stream: IO[bytes], boundary: bytes) -> None:
        self.stream = stream
        self.delimiter = b"\r\n--" + boundary
        # a leading CRLF makes a delimiter at the very start of the body look like every other one
        self.buf = bytearray(b"\r\n")

    def split(self, dest: Path, max_bytes: int, max_parts: int) -> list[Instance]:
        """Write each part into ``dest`` (``00001.dcm`` …); one over ``max_bytes`` is counted, not kept."""
        self._copy_until_delimiter(None, 0)  # the preamble
        instances: list[Instance] = []
        while not self._after_delimiter():
            if len(instances) >= max_parts:
                raise UploadError(f"more than {max_parts} instances; the limit is {max_parts}", status=413)
            instance = Instance(len(instances) + 1, dest / f"{len(instances) + 1:05d}.dcm")
            instance.media_type = self._headers().get("content-type", instance.media_type)
            with instance.path.open("wb") as out:
                instance.size = self._copy_until_delimiter(out, max_bytes)
            instances.append(instance)
        if not instances:
            raise _bad("the body holds no part: send one DICOM instance per part")
        return instances

    def _fill(self) -> None:
        block = self.stream.read(_CHUNK)
        if not block:
            raise _bad("the body ends before its closing boundary (truncated?)")
        self.buf += block

    def _copy_until_delimiter(self, out: IO[bytes] | None, max_bytes: int) -> int:
        """Move the bytes before the next delimiter to ``out`` (up to ``max_bytes``); count them all."""
        seen = 0
        keep = len(self.delimiter) - 1  # a delimiter may straddle two chunks
        while (at := self.buf.find(self.delimiter)) < 0:
            ready = len(self.buf) - keep
            if ready > 0:
                seen += self._emit(out, ready, seen, max_bytes)
            self._fill()
        seen += self._emit(out, at, seen, max_bytes)
        del self.buf[: len(self.delimiter)]
        return seen

    def _emit(self, out: IO[bytes] | None, n: int, seen: int, max_bytes: int) -> int:
        if out is not None and seen < max_bytes:  # beyond the limit only the head is kept, for its UIDs
            out.write(self.buf[: min(n, max_bytes - seen)])
        del self.buf[:n]
        return n

    def _after_delimiter(self) -> bool:
        """Past the rest of a delimiter line; true at the close delimiter (its epilogue is ignored)."""
        while len(self.buf) < 2:
            self._fill()
        if self.buf[:2] == b"--":
            return True
        line = self._line()
        if line.strip(b" \t"):
            raise _bad("a boundary line carries more than the boundary")
        return False

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEADER_BYTES:
                raise _bad(f"a header line is longer than {_MAX_HEADER_BYTES} bytes")
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        total = 0
        while line := self._line():
            total += len(line)
            if total > _MAX_HEADER_BYTES:
                raise _bad(f"a part's headers are longer than {_MAX_HEADER_BYTES} bytes")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _bad("a part header is not 'Name: value'")
            headers[name.strip().lower()] = value.strip()
        return headers


# -- one instance -----------------------------------------------------------------------------


def _identify(instance: Instance, study: str | None, max_bytes: int) -> None:
    """Read the instance's UIDs and refuse what cannot become part of a CT job."""
    refusal = _refusal(instance, max_bytes) or _misfit(instance, study)
    if refusal is not None:
        instance.fail(*refusal)


def _refusal(instance: Instance, max_bytes: int) -> tuple[int, str] | None:
    """Why the part is no usable DICOM instance (its UIDs are read when it is one)."""
    media_type = instance.media_type.split(";")[0].strip().lower()
    if media_type != "application/dicom":
        return CANNOT_UNDERSTAND, f"part {instance.index} is {media_type}, not application/dicom"
    if instance.size > max_bytes:
        _read_uids_of_head(instance)
        return OUT_OF_RESOURCES, (
            f"instance {instance.index} is {instance.size} bytes, larger than the limit of {max_bytes}"
        )
    with instance.path.open("rb") as stream:
        if sniff(stream.read(352)) != "dicom":
            return CANNOT_UNDERSTAND, f"part {instance.index} is not a DICOM file (no DICM preamble)"
        try:
            check_instance_size(stream, max_bytes, source=f"instance {instance.index}")
            stream.seek(0)
            _read_uids(instance, pydicom.dcmread(stream, stop_before_pixels=True))
        except TooLargeError as exc:
            return OUT_OF_RESOURCES, f"instance {instance.index}: {exc.message}"
        except (InputError, *READ_ERRORS):
            return CANNOT_UNDERSTAND, f"instance {instance.index} is not a readable DICOM file"
    return None


def _read_uids_of_head(instance: Instance) -> None:
    """The UIDs of an instance too large to keep, from its first ``max_instance_mb`` (if they are there).

    Not inflated: a Deflate instance is named by its file meta (:func:`rtseg.ct.read_head`).
    """
    try:
        with instance.path.open("rb") as stream:
            _read_uids(instance, read_head(stream, source=f"instance {instance.index}"))
    except InputError:
        log.info("STOW-RS: instance %d is too large and its head names no UIDs", instance.index)


def _read_uids(instance: Instance, ds: Dataset) -> None:
    instance.sop_class = sop_uid_of(ds, "SOPClassUID")
    instance.sop_instance = sop_uid_of(ds, "SOPInstanceUID")
    instance.series = series_uid_of(ds)
    instance.study = str(ds.get("StudyInstanceUID", "") or "").strip()


def _misfit(instance: Instance, study: str | None) -> tuple[int, str] | None:
    """Why a readable instance is not accepted here: another study than the URL's, or not a CT image."""
    if study is not None and instance.study != study:
        return CANNOT_UNDERSTAND, f"instance {instance.index} is not in the study the URL names"
    if instance.sop_class != CT_IMAGE_STORAGE:
        return SOP_CLASS_NOT_SUPPORTED, (
            f"instance {instance.index} is not a CT image (only CT Image Storage is segmented)"
        )
    return None


def _series(instances: list[Instance]) -> Iterator[list[Instance]]:
    """The accepted instances grouped by series, in the order their series first appeared."""
    groups: dict[str, list[Instance]] = {}
    for instance in instances:
        if instance.failure is None:
            groups.setdefault(instance.series, []).append(instance)
    yield from groups.values()


# -- one series → one job ---------------------------------------------------------------------


def _submit(ctx: ServiceContext, members: list[Instance]) -> Job | None:
    """Queue one CT series as a job, as a zip upload is; on refusal every member fails with the reason."""
    try:
        job_id = admit(ctx, False)
    except HttpProblem as exc:  # the queue is full
        _fail_all(members, OUT_OF_RESOURCES, exc.detail)
        return None
    parts = [Part(m.path.open("rb"), f"instance {m.index}") for m in members]
    try:
        intake = receive(parts, ctx.job_dir(job_id) / "input", ctx.limits, ctx.validate)
    except UploadError as exc:
        discard(ctx, job_id)
        code = OUT_OF_RESOURCES if exc.status == 413 else PROCESSING_FAILURE
        _fail_all(members, code, f"the series of instance {members[0].index}: {exc.message}")
        return None
    except BaseException:
        discard(ctx, job_id)
        raise
    finally:
        for part in parts:
            part.stream.close()
    meta = {
        "write_labels": False,
        "input_kind": intake.kind,
        "n_files": intake.n_files,
        "n_slices": intake.n_slices,
        "series_sha256": intake.series_key,
        "via": "stow-rs",
    }
    output = ctx.relative(ctx.job_dir(job_id) / "rtstruct.dcm")
    job = ctx.store.transition(job_id, JobState.RECEIVED, JobState.QUEUED, output_path=output, meta=meta)
    log.info("upload %s: queued (STOW-RS, %d files)", job_id, intake.n_files)
    for member in members:
        member.job_id = job_id
    return job


def _fail_all(members: list[Instance], code: int, reason: str) -> None:
    for member in members:
        member.fail(code, reason)


# -- the Store Instances Response -------------------------------------------------------------


def _response(instances: list[Instance], jobs: list[Job]) -> Response:
    stored = [i for i in instances if i.failure is None]
    failed = [i for i in instances if i.failure is not None]
    ds = Dataset()
    if stored:
        ds.ReferencedSOPSequence = [_reference(i) for i in stored]
    if failed:
        ds.FailedSOPSequence = [_reference(i) for i in failed]
    status = 200 if not failed else 202 if stored else 409
    response = Response(json.dumps(ds.to_json_dict()), status=status, mimetype=DICOM_JSON)
    for job in jobs:
        response.headers.add("Link", f'<{url_for("v1.segmentations.get", job_id=job.id)}>; rel="related"')
    for reason in dict.fromkeys(i.reason for i in failed):
        response.headers.add("Warning", f'299 rtseg "{_quoted(reason)}"')
    return response


def _reference(instance: Instance) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.sop_class
    item.ReferencedSOPInstanceUID = instance.sop_instance
    if instance.failure is not None:
        item.FailureReason = instance.failure
    return item


def _quoted(text: str) -> str:
    """``text`` as the inside of an HTTP quoted-string (ASCII, quotes and backslashes escaped)."""
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    return ascii_text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
