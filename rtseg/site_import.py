"""A site's own contoured CTs → labelled, de-identified training cases.

:func:`import_folder` reads a folder of any layout (studies, series and
modalities mixed, files with or without ``.dcm``), headers only, pairs every
RTSTRUCT with the CT series it references (ReferencedFrameOfReferenceSequence →
RTReferencedStudySequence → RTReferencedSeriesSequence, else the slices its
ContourImageSequence names), maps its ROI names to the model's structures with
:mod:`rtseg.roi_names`, rasterises the mapped contours on the CT grid and
writes ``<out>/<pseudonym>/ct/`` (de-identified, :mod:`rtseg.deid`) +
``labels.nii.gz`` + ``case.json``, as the closed loop does with its cases.

An item that cannot become a case (not approved, CT not in the folder, a CT
that does not load, contours off the CT's slices, no mappable ROI) is reported
with its reason and skipped, and so is a second structure set of a CT that
already became a case (one CT twice would weigh double in training and could
land in both a training and a test split). The import index ``<out>/.rtseg-import/index.sqlite``
keys each case on its RTSTRUCT's SOPInstanceUID, so a re-run adds only new
cases and case folders keep their pseudonyms; it also holds the secret behind
the UID remapping, and is the only place the source UIDs are kept.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError

from rtseg.cases import CT_DIR, LABELS_FILE, load_case
from rtseg.closed_loop import (
    PARSE_ERRORS,
    ClosedLoopConfig,
    is_approved,
    label_map,
    map_roi_names,
    referenced_series,
)
from rtseg.ct import READ_ERRORS, check_deflated_file, load_series
from rtseg.deid import Deidentifier, copy_deidentified
from rtseg.errors import InputError, RtsegError, TooLargeError
from rtseg.phantom.cohort import write_label_image
from rtseg.privacy import redact_uids
from rtseg.roi_names import MAPPED, RTSTRUCT_SOP_CLASS, RoiNameMapper, SiteNames, rois_of
from rtseg.rtstruct import rasterize_rtstruct
from rtseg.structures import STRUCTURES, Structure
from rtseg.volume import CTVolume

INDEX_DIR = ".rtseg-import"
INDEX_FILE = "index.sqlite"
STAGING_DIR = "staging"
CASE_PREFIX = "site-"
IMPORTED, PRESENT, SKIPPED = "imported", "already present", "skipped"
# reasons an item is skipped (the summary counts them)
NOT_APPROVED = "not approved"
NO_CT = "referenced CT not in the folder"
BAD_CT = "CT does not load"
BAD_CONTOURS = "contours do not fit the CT"
NO_ROI = "no mappable ROI"
BAD_RTSTRUCT = "unreadable RTSTRUCT"
SAME_CT = "CT already imported with another structure set"
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    rtstruct_uid TEXT PRIMARY KEY,
    case_id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    series_uid TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class ImportItem:
    """What became of one RTSTRUCT: ``status`` imported, already present or skipped."""

    source: str  # the RTSTRUCT's path relative to the input folder
    status: str
    reason: str = ""  # for skipped: one of the reasons above
    detail: str = ""  # what exactly (no UIDs)
    case_id: str | None = None
    structures: tuple[str, ...] = ()  # the case's contoured structures
    left_out: tuple[str, ...] = ()  # "ROI: why" for ambiguous ROIs, reported to the physicist


@dataclass
class ImportReport:
    """Every item of one import run, in order."""

    items: list[ImportItem] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        """Items per status."""
        return Counter(i.status for i in self.items)

    def skipped(self) -> Counter[str]:
        """Skipped items per reason."""
        return Counter(i.reason for i in self.items if i.status == SKIPPED)


@dataclass(frozen=True)
class ImportOptions:
    """Which structure sets count, and how ROI names map."""

    any_approval: bool = False  # take structure sets whatever their ApprovalStatus
    approved_labels: tuple[str, ...] = ()  # StructureSetLabels that also count as approved
    site: SiteNames | None = None  # the site's ROI mapping file
    structures: tuple[Structure, ...] = STRUCTURES


@dataclass
class _Folder:
    """The input folder, headers only: CT slices by series and instance, RTSTRUCT files."""

    series: dict[str, list[str]] = field(default_factory=dict)  # CT series UID → instance UIDs
    paths: dict[str, Path] = field(default_factory=dict)  # CT instance UID → file
    rtstructs: list[Path] = field(default_factory=list)


def import_folder(
    source: Path,
    out: Path,
    options: ImportOptions | None = None,
    progress: Callable[[int, int, ImportItem], None] | None = None,
) -> ImportReport:
    """Import every RTSTRUCT under ``source`` with its CT as a case under ``out``.

    Parameters
    ----------
    source
        The folder to read (any layout).
    out
        The site's cases folder; created if needed.
    options
        Approval filter and ROI mapping.
    progress
        Called after each RTSTRUCT with (its number, how many, what became of it).

    Raises
    ------
    InputError
        If ``source`` is not a folder or ``out`` cannot be written; bad items never raise.
    """
    options = options or ImportOptions()
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise InputError("not a folder", source=str(source))
    return _import_all(_index_folder(source, out), source, out, options, progress)


def import_staged(staging: Path, out: Path, options: ImportOptions | None = None) -> ImportReport:
    """Import the RTSTRUCT(s) retrieved into ``staging`` (a folder inside ``out``'s hidden state).

    As :func:`import_folder`, for a folder that lies under ``out`` (which a folder
    import leaves out, so as not to read its own cases back).
    """
    staging, out = Path(staging), Path(out)
    if not staging.is_dir():
        raise InputError("not a folder", source=str(staging))
    return _import_all(_index_folder(staging, None), staging, out, options or ImportOptions(), None)


def imported_case(out: Path, rtstruct_uid: str) -> str | None:
    """The case an RTSTRUCT (by SOPInstanceUID) already became under ``out``, or None."""
    with closing(_open_index(out)) as db:
        return _done_case(db, rtstruct_uid, Path(out))


def approved(ds: pydicom.Dataset, options: ImportOptions) -> bool:
    """Whether a structure set counts as approved (ApprovalStatus, or an approved label)."""
    return is_approved(ds, ClosedLoopConfig(approved_labels=options.approved_labels))


def staging_path(out: Path) -> Path:
    """Where retrieved items wait for their import (in the hidden state, removed once imported)."""
    return Path(out) / INDEX_DIR / STAGING_DIR


def referenced_ct(ds: pydicom.Dataset) -> tuple[list[tuple[str, str]], list[str]]:
    """The CT a structure set names: (study UID or "", series UID) pairs, and its contours' slice UIDs.

    The series come from ReferencedFrameOfReferenceSequence; the slice UIDs (from
    ContourImageSequence) are what is left when a TPS wrote no series reference.
    """
    pairs: list[tuple[str, str]] = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            study_uid = str(study.get("ReferencedSOPInstanceUID", "") or "")
            for item in study.get("RTReferencedSeriesSequence", []):
                if item.get("SeriesInstanceUID") and (study_uid, str(item.SeriesInstanceUID)) not in pairs:
                    pairs.append((study_uid, str(item.SeriesInstanceUID)))
    slices = sorted(
        {
            str(image.ReferencedSOPInstanceUID)
            for roi in ds.get("ROIContourSequence", [])
            for contour in roi.get("ContourSequence", [])
            for image in contour.get("ContourImageSequence", [])
            if image.get("ReferencedSOPInstanceUID")
        }
    )
    return pairs, slices


def _import_all(
    folder: _Folder,
    source: Path,
    out: Path,
    options: ImportOptions,
    progress: Callable[[int, int, ImportItem], None] | None,
) -> ImportReport:
    report = ImportReport()
    with closing(_open_index(out)) as db:
        deid = Deidentifier(_secret(db))
        for n, path in enumerate(folder.rtstructs, 1):
            item = _import_one(path, source, out, folder, options, db, deid)
            report.items.append(item)
            if progress is not None:
                progress(n, len(folder.rtstructs), item)
    return report


# -- the input folder -----------------------------------------------------------------------------
def _index_folder(root: Path, out: Path | None) -> _Folder:
    folder = _Folder()
    for path in _files(root, out):
        ds = _header(path)
        if ds is None:
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class == RTSTRUCT_SOP_CLASS:
            folder.rtstructs.append(path)
        elif str(ds.get("Modality", "")) == "CT" and ds.get("SeriesInstanceUID") and ds.get("SOPInstanceUID"):
            uid = str(ds.SOPInstanceUID)
            folder.series.setdefault(str(ds.SeriesInstanceUID), []).append(uid)
            folder.paths[uid] = path
    return folder


def _files(root: Path, out: Path | None) -> Iterator[Path]:
    """Files under ``root``, sorted; hidden ones and the output folder (if given and inside) left out."""
    resolved = out.resolve() if out is not None else None
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if resolved is not None and path.resolve().is_relative_to(resolved):
            continue
        yield path


def _header(path: Path) -> pydicom.Dataset | None:
    """The few header elements pairing needs; None for a file that is not (readable) DICOM."""
    try:
        check_deflated_file(path)  # a Deflate bomb: pydicom would inflate it whole
    except (TooLargeError, *READ_ERRORS):
        return None
    for force in (False, True):  # some archives write DICOM without preamble and "DICM"
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=force)
        except InvalidDicomError:
            continue
        except (*READ_ERRORS, *PARSE_ERRORS):  # damaged Deflate data, sequences nested past the stack, ...
            return None
        if str(ds.get("SOPClassUID", "") or "").startswith("1.2.840.10008."):
            return ds
    return None


# -- one RTSTRUCT ---------------------------------------------------------------------------------
def _import_one(
    path: Path,
    root: Path,
    out: Path,
    folder: _Folder,
    options: ImportOptions,
    db: sqlite3.Connection,
    deid: Deidentifier,
) -> ImportItem:
    rel = str(path.relative_to(root))
    try:
        ds = pydicom.dcmread(path)
        uid = str(ds.SOPInstanceUID)
    except (*READ_ERRORS, *PARSE_ERRORS) as exc:
        return ImportItem(rel, SKIPPED, BAD_RTSTRUCT, type(exc).__name__)
    done = _done_case(db, uid, out)
    if done is not None:
        return ImportItem(rel, PRESENT, case_id=done)
    if not options.any_approval and not approved(ds, options):
        status = str(ds.get("ApprovalStatus", "")) or "no ApprovalStatus"
        label = str(ds.get("StructureSetLabel", "")).strip()
        return ImportItem(rel, SKIPPED, NOT_APPROVED, f"{status}, label {label!r}")
    try:
        return _build(ds, uid, rel, out, folder, options, db, deid)
    except _Skip as skip:
        return ImportItem(rel, SKIPPED, skip.reason, skip.detail)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, redact_uids(detail)


def _build(
    ds: pydicom.Dataset,
    uid: str,
    rel: str,
    out: Path,
    folder: _Folder,
    options: ImportOptions,
    db: sqlite3.Connection,
    deid: Deidentifier,
) -> ImportItem:
    series = _referenced_series(ds, folder)
    _check_names(ds, options)  # before the CT is loaded: a set of targets and helpers costs nothing
    other = _case_of_series(db, series, uid)
    if other is not None:  # one CT twice would weigh double and leak across train/test splits
        raise _Skip(SAME_CT, f"as {other}")
    volume = _load_ct(folder, series)
    masks, left_out = _labels(ds, volume, options)
    case_id = _allocate(db, uid, series)
    _write_case(out, case_id, volume, folder, masks, options, deid)
    db.execute("UPDATE cases SET state = 'done' WHERE rtstruct_uid = ?", (uid,))
    return ImportItem(rel, IMPORTED, case_id=case_id, structures=tuple(masks), left_out=left_out)


def _referenced_series(ds: pydicom.Dataset, folder: _Folder) -> str:
    """The CT series the structure set references that the folder holds."""
    try:
        series, _ = referenced_series(ds)
        slices = {
            str(image.ReferencedSOPInstanceUID)
            for roi in ds.get("ROIContourSequence", [])
            for contour in roi.get("ContourSequence", [])
            for image in contour.get("ContourImageSequence", [])
            if image.get("ReferencedSOPInstanceUID")
        }
    except PARSE_ERRORS as exc:
        raise _Skip(BAD_RTSTRUCT, f"malformed references ({type(exc).__name__})") from exc
    found = sorted(s for s in series if s in folder.series)
    if not found:  # no (usable) series reference: the slices its contours lie on
        owners = {s for s, uids in folder.series.items() if slices & set(uids)}
        found = sorted(owners)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise _Skip(NO_CT, f"{what} referenced CT series in the folder")
    return found[0]


def _check_names(ds: pydicom.Dataset, options: ImportOptions) -> None:
    try:
        rois = rois_of(ds)
    except PARSE_ERRORS as exc:
        raise _Skip(BAD_RTSTRUCT, f"malformed ROI list ({type(exc).__name__})") from exc
    decisions = RoiNameMapper((s.name for s in options.structures), options.site).map_case(rois)
    if not any(d.kind == MAPPED for d in decisions):
        raise _Skip(NO_ROI, f"none of its {len(rois)} ROI(s) maps to a structure")


def _load_ct(folder: _Folder, series: str) -> CTVolume:
    try:
        return load_series([folder.paths[u] for u in folder.series[series]], series_uid=series)
    except InputError as exc:
        raise _Skip(BAD_CT, exc.message) from exc


def _labels(
    ds: pydicom.Dataset, volume: CTVolume, options: ImportOptions
) -> tuple[dict[str, npt.NDArray[np.bool_]], tuple[str, ...]]:
    """Masks of the mapped structures with a voxel, and the ambiguous ROIs left out (with why)."""
    try:
        raw = rasterize_rtstruct(ds, volume)
    except RtsegError as exc:
        raise _Skip(BAD_CONTOURS, exc.message) from exc
    except PARSE_ERRORS as exc:
        raise _Skip(BAD_RTSTRUCT, f"malformed contours ({type(exc).__name__})") from exc
    structures = {s.name: s for s in options.structures}
    mapped, _, reasons = map_roi_names(raw, structures, rois_of(ds), options.site)
    masks = {name: mask for name, mask in mapped.items() if mask.any()}
    left_out = tuple(f"{roi}: {why}" for roi, why in reasons.items() if why.startswith("ambiguous"))
    if not masks:
        raise _Skip(NO_ROI, f"{len(raw)} ROI(s) with contours, none maps to a structure")
    return masks, left_out


# -- the case folder ------------------------------------------------------------------------------
def _write_case(
    out: Path,
    case_id: str,
    volume: CTVolume,
    folder: _Folder,
    masks: Mapping[str, npt.NDArray[np.bool_]],
    options: ImportOptions,
    deid: Deidentifier,
) -> None:
    """``<out>/<case_id>/``: de-identified CT, labels, case.json; written aside, checked, then moved in."""
    structures = {s.name: s for s in options.structures}
    tmp = out / f".incoming-{uuid.uuid4().hex}"
    try:
        (tmp / CT_DIR).mkdir(parents=True)
        for k, uid in enumerate(volume.info.sop_instance_uids):
            copy_deidentified(folder.paths[uid], tmp / CT_DIR / f"{k:05d}.dcm", deid, case_id)
        labels = label_map(masks, structures, volume.shape)
        write_label_image(labels, volume.affine, tmp / LABELS_FILE)
        (tmp / "case.json").write_text(json.dumps(case_record(masks, options), indent=1) + "\n")
        load_case(tmp)  # a case that does not load back is never added
        final = out / case_id
        if final.exists():  # an interrupted earlier run got this far: replace its copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:  # the output, not the item: the run cannot go on
        raise InputError(f"cannot write the case ({exc.strerror})", source=str(out)) from exc
    except PARSE_ERRORS as exc:  # a slice pydicom reads but cannot write back once de-identified
        raise _Skip(BAD_CT, f"a slice cannot be de-identified ({type(exc).__name__})") from exc
    except InputError as exc:  # load_case: the written case does not load back
        raise _Skip(BAD_CT, f"the written case does not load back: {exc.message}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def case_record(masks: Mapping[str, object], options: ImportOptions) -> dict[str, object]:
    """``case.json``: which structures a person contoured and which are unknown; no names, IDs or dates."""
    states = {s.name: ("contoured" if s.name in masks else "unknown") for s in options.structures}
    counts = Counter(states.values())
    return {
        "source": "site-import",
        "structures": states,
        "counts": {"contoured": counts["contoured"], "unknown": counts["unknown"]},
    }


# -- the import index -----------------------------------------------------------------------------
def index_path(out: Path) -> Path:
    """Where the import index of a cases folder lives (the only place with source UIDs)."""
    return Path(out) / INDEX_DIR / INDEX_FILE


def _open_index(out: Path) -> sqlite3.Connection:
    path = index_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # autocommit; explicit BEGIN
        db.executescript(_SCHEMA)
        os.chmod(path, 0o600)  # source UIDs and the secret: for this site's eyes only
    except (OSError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"cannot write the cases folder ({reason})", source=str(out)) from exc
    return db


def _secret(db: sqlite3.Connection) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()
    if row is not None:
        return str(row[0])
    value = secrets.token_hex(32)
    db.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (value,))
    return str(db.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0])


def _done_case(db: sqlite3.Connection, uid: str, out: Path) -> str | None:
    row = db.execute("SELECT case_id, state FROM cases WHERE rtstruct_uid = ?", (uid,)).fetchone()
    if row is None or row[1] != "done" or not (out / str(row[0])).is_dir():
        return None
    return str(row[0])


def _case_of_series(db: sqlite3.Connection, series: str, uid: str) -> str | None:
    """The case another structure set of this CT series already became, if any."""
    row = db.execute(
        "SELECT case_id FROM cases WHERE series_uid = ? AND rtstruct_uid != ? AND state = 'done'",
        (series, uid),
    ).fetchone()
    return None if row is None else str(row[0])


def _allocate(db: sqlite3.Connection, uid: str, series: str) -> str:
    """The RTSTRUCT's pseudonym: the one it already has, else the next ``site-NNNN``."""
    db.execute("BEGIN IMMEDIATE")  # two imports into one folder never draw the same number
    try:
        row = db.execute("SELECT case_id FROM cases WHERE rtstruct_uid = ?", (uid,)).fetchone()
        if row is not None:
            return str(row[0])
        n = db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        case_id = f"{CASE_PREFIX}{n + 1:04d}"
        db.execute("INSERT INTO cases VALUES (?, ?, 'pending', ?)", (uid, case_id, series))
        return case_id
    finally:
        db.commit()
