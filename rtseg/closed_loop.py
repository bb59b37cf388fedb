"""Closed loop from the clinic: clinician-approved RTSTRUCTs back from the TPS.

When the planning system sends back a structure set that a clinician approved
(``ApprovalStatus`` APPROVED, or a configured ``StructureSetLabel``) for a CT
the node segmented, :func:`handle_rtstruct`

1. pairs it with that job: the job whose own RTSTRUCT references the same CT
   series (or, without series references, the same frame of reference);
2. rasterises both structure sets on the job's CT grid and records per-structure
   edit metrics (Dice, HD95, mean surface distance in mm, volumes) in
   ``jobs/<id>/edit-metrics.json`` and the ``closed_loop`` table of the node's
   state database;
3. if ``add_cases`` is on, adds the case to the site's local training data as
   a labelled case folder (``<site_data>/<case>/ct/`` + ``labels.nii.gz``),
   ROIs mapped to the model's labels by :mod:`rtseg.roi_names` (clinical
   names and synonyms → TG-263, the site's mapping file first); derived,
   combined, ambiguous and unknown ROIs are left out, each with its reason.

Configuration: ``[federation.closed_loop]`` in the node's TOML file::

    add_cases = false            # add approved cases to the site's training data
    approved_labels = []         # StructureSetLabel values that also count as approved
    site_data = "..."            # default: federation.data_dir (the site's training cases),
                                 # else <data_dir>/site-data
    window_h = 0                 # a segmented CT is kept at least this long for late approvals,
                                 # whatever node.retention_h says (0: retention_h alone)
    roi_names = ""               # the site's ROI mapping file (TOML, see rtseg.roi_names)

Nothing here logs or stores patient data: series and instances appear as
hashes, the case folder name is a hash of the series UID.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

from rtseg.cases import CT_DIR, LABELS_FILE, load_case
from rtseg.ct import READ_ERRORS, load_series
from rtseg.errors import InputError, RtsegError, RTStructError
from rtseg.jobs import Job, JobState, JobStore
from rtseg.metrics import score
from rtseg.privacy import redact_uids, uid_key
from rtseg.roi_names import MAPPED, RoiNameMapper, SiteNames, load_site_names, rois_of
from rtseg.rtstruct import rasterize_rtstruct
from rtseg.settings import (
    SITE_DATA_DIR,
    Parser,
    Table,
    optional,
    parse_bool,
    parse_float,
    parse_path,
    parse_strings,
    parse_table,
)
from rtseg.structures import Structure
from rtseg.volume import CTVolume

log = logging.getLogger(__name__)

METRICS_FILE = "edit-metrics.json"
SEGMENTED = frozenset({JobState.SENDING, JobState.DONE, JobState.DEAD_LETTER})
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
QUARANTINE_DIR = Path("quarantine") / "rtstruct"  # under the data directory
# what pydicom raises when a received structure set lacks an element or holds a bad value
# (shared with the site import, which reads archived structure sets the same way)
PARSE_ERRORS = (AttributeError, KeyError, IndexError, TypeError, ValueError)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS closed_loop (
    instance_key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    job_id TEXT,
    model_version TEXT,
    case_id TEXT,
    detail TEXT NOT NULL DEFAULT '{}',
    received REAL NOT NULL,
    source TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class ClosedLoopConfig:
    """What counts as approved, and whether approved cases become training data."""

    add_cases: bool = False
    approved_labels: tuple[str, ...] = ()
    site_data: Path | None = None  # default <data_dir>/site-data
    structures: tuple[Structure, ...] | None = None  # label ids of the model (default: rtseg's table)
    window_h: float = 0.0  # the node keeps a segmented CT at least this long (pairing needs it)
    roi_names: SiteNames | None = None  # the site's mapping file, read when the settings are

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> ClosedLoopConfig:
        """From the ``[federation.closed_loop]`` table; a bad key or value is an :class:`InputError`."""
        values = parse_table(Table.of("federation.closed_loop", table), _KEYS)
        names = values.pop("roi_names", None)
        site_names = load_site_names(names) if names is not None else None
        return cls(**values, roi_names=site_names)

    def site_dir(self, data_dir: Path) -> Path:
        return self.site_data if self.site_data is not None else Path(data_dir) / SITE_DATA_DIR


def _mapping_file(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("must be the path of a TOML file")
    return Path(value).expanduser()


# key of the [federation.closed_loop] table -> parser (the field of ClosedLoopConfig of the same name)
_KEYS: dict[str, Parser] = {
    "add_cases": parse_bool,
    "approved_labels": parse_strings(str),
    "site_data": optional(parse_path),
    "window_h": parse_float(0.0, 1e6),
    "roi_names": _mapping_file,
}


@dataclass(frozen=True)
class Outcome:
    """What happened to one received structure set (``status`` says which branch)."""

    status: str  # "ignored" | "unpaired" | "recorded" | "failed" | "quarantined"
    message: str
    instance_key: str = ""
    job_id: str | None = None
    model_version: str | None = None
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    unknown_rois: tuple[str, ...] = ()
    not_approved_structures: tuple[str, ...] = ()  # node structures absent from the approved set
    case_id: str | None = None
    malformed: bool = False  # the received file itself cannot be parsed: quarantine it
    quarantine: str | None = None  # where it was moved, relative to the data directory
    roi_mapping: dict[str, str] = field(default_factory=dict)  # approved ROI → "<structure|kind>: reason"


def config_from_settings(federation: Mapping[str, Any]) -> ClosedLoopConfig:
    """From the ``[federation]`` table: its ``closed_loop`` sub-table; cases go where the site trains.

    Without ``closed_loop.site_data`` new cases go to ``federation.data_dir``
    (the cases the site's federated training reads), else ``<data_dir>/site-data``.
    """
    table = Table.of("federation", federation)
    config = ClosedLoopConfig.from_mapping(table.sub("closed_loop"))
    training = table.get("data_dir")
    if config.site_data is None and isinstance(training, str) and training:
        config = replace(config, site_data=Path(training).expanduser())
    return config


def handle_rtstruct(
    path: Path,
    data_dir: Path,
    store: JobStore,
    config: ClosedLoopConfig | None = None,
    quarantine: Path | None = None,
) -> Outcome:
    """Process one received RTSTRUCT file; never raises for bad input (the outcome says why).

    Parameters
    ----------
    path
        The received file.
    data_dir
        The node's data directory.
    store
        The node's job store (its database also holds the ``closed_loop`` table).
    config
        The closed loop's configuration.
    quarantine
        A folder under ``data_dir``: a file that cannot be parsed is moved there
        (status ``quarantined``) instead of staying where it was (status ``failed``).
    """
    config = config or ClosedLoopConfig()
    data_dir = Path(data_dir)
    try:
        ds = pydicom.dcmread(path)
    except READ_ERRORS as exc:
        outcome = Outcome("failed", f"unreadable RTSTRUCT ({type(exc).__name__})", malformed=True)
    else:
        key = uid_key(str(ds.get("SOPInstanceUID", path.name)))
        outcome = _process(ds, key, data_dir, store, config)
    if outcome.malformed and quarantine is not None:
        outcome = _quarantine(path, outcome, data_dir, quarantine)
    return _finish(store, outcome, path)


def _quarantine(path: Path, outcome: Outcome, data_dir: Path, folder: Path) -> Outcome:
    """Move an unparseable file out of the queue, under ``folder/<series key>/``."""
    target = folder / path.parent.name / path.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    except OSError as exc:  # stays where it is; its row still keeps it from being retried
        log.error("closed loop: cannot quarantine an RTSTRUCT (%s)", exc.strerror)
        return outcome
    return replace(outcome, status="quarantined", quarantine=str(target.relative_to(data_dir)))


def _parsed(what: str, parse: Callable[[], Any]) -> Any:
    """``parse()``, with pydicom's errors on a malformed received structure set as one RTStructError."""
    try:
        return parse()
    except PARSE_ERRORS as exc:
        raise RTStructError(f"malformed structure set: {what} ({redact_uids(str(exc))})") from exc


def _process(
    ds: pydicom.Dataset, key: str, data_dir: Path, store: JobStore, config: ClosedLoopConfig
) -> Outcome:
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
        return Outcome("ignored", "not an RT Structure Set", key)
    if not is_approved(ds, config):
        status = str(ds.get("ApprovalStatus", "")) or "no approval status"
        return Outcome("ignored", f"not approved ({status})", key)
    try:
        series, frames = _parsed("its references", lambda: referenced_series(ds))
    except RTStructError as exc:
        return Outcome("failed", exc.message, key, malformed=True)
    job = find_job(store, data_dir, series, frames)
    if job is None:
        return Outcome("unpaired", "no segmentation job of this node matches the referenced CT", key)
    try:
        return _compare(ds, key, job, data_dir, store, config)
    except RtsegError as exc:
        return Outcome("failed", f"cannot pair with job {job.id}: {exc.message}", key, job.id)


def is_approved(ds: pydicom.Dataset, config: ClosedLoopConfig) -> bool:
    """Approved: ApprovalStatus APPROVED, or a StructureSetLabel the site counts as approved."""
    if str(ds.get("ApprovalStatus", "")).upper() == "APPROVED":
        return True
    label = str(ds.get("StructureSetLabel", "")).strip()
    return bool(label) and label in config.approved_labels


def referenced_series(ds: pydicom.Dataset) -> tuple[set[str], set[str]]:
    """(referenced CT series UIDs, frame of reference UIDs) of a structure set."""
    series: set[str] = set()
    frames: set[str] = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        if frame.get("FrameOfReferenceUID"):
            frames.add(str(frame.FrameOfReferenceUID))
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                if item.get("SeriesInstanceUID"):
                    series.add(str(item.SeriesInstanceUID))
    for roi in ds.get("StructureSetROISequence", []):
        if roi.get("ReferencedFrameOfReferenceUID"):
            frames.add(str(roi.ReferencedFrameOfReferenceUID))
    return series, frames


def find_job(store: JobStore, data_dir: Path, series: set[str], frames: set[str]) -> Job | None:
    """The newest segmented job whose own RTSTRUCT references ``series`` (else one of ``frames``).

    A job records the keys of what its RTSTRUCT references (``result["references"]``): only the
    RTSTRUCTs of jobs whose keys match, or of jobs from before that record, are opened.
    """
    jobs = store.list(SEGMENTED, limit=100_000)
    by_series = bool(series)
    keys = {uid_key(uid) for uid in (series if by_series else frames)}
    by_frame = None
    for job in reversed(jobs):  # newest first
        if not job.output_path or not job.output_path.endswith(".dcm"):
            continue
        recorded = job.result.get("references")
        key = recorded.get("series" if by_series else "frame") if isinstance(recorded, Mapping) else None
        if key is not None and key not in keys:
            continue  # its RTSTRUCT references another CT
        mine = data_dir / job.output_path
        try:
            own = pydicom.dcmread(mine, stop_before_pixels=True)
        except READ_ERRORS:
            continue
        own_series, own_frames = referenced_series(own)
        if series and own_series & series:
            return job
        if by_frame is None and not series and own_frames & frames:
            by_frame = job
    return by_frame


def _compare(
    ds: pydicom.Dataset, key: str, job: Job, data_dir: Path, store: JobStore, config: ClosedLoopConfig
) -> Outcome:
    mine = pydicom.dcmread(data_dir / str(job.output_path))
    series_uid = next(iter(referenced_series(mine)[0]), None)
    input_dir = data_dir / job.input_dir
    if not input_dir.is_dir() or not any(input_dir.iterdir()):
        return Outcome(
            "unpaired", f"the CT of job {job.id} is no longer on the node (retention)", key, job.id
        )
    volume = load_series(input_dir, series_uid=series_uid)
    structures = _model_structures(config.structures)
    node_masks = rasterize_rtstruct(mine, volume)
    try:
        approved_raw = _parsed("its contours", lambda: rasterize_rtstruct(ds, volume))
    except RTStructError as exc:
        message = redact_uids(exc.message)
        return Outcome("failed", f"cannot read the approved contours: {message}", key, job.id, malformed=True)
    approved, unknown, mapping = map_roi_names(approved_raw, structures, rois_of(ds), config.roi_names)
    metrics = edit_metrics(node_masks, approved, volume)
    model_version = job.model_version or str((job.result.get("model") or {}).get("version", ""))
    outcome = Outcome(
        "recorded",
        f"{len(metrics)} structure(s) compared with job {job.id}",
        key,
        job.id,
        model_version,
        metrics,
        tuple(sorted(unknown)),
        tuple(sorted(set(node_masks) - set(approved))),
        roi_mapping=mapping,
    )
    if config.add_cases:
        case_id = add_case(volume, input_dir, approved, structures, config.site_dir(data_dir), job, outcome)
        outcome = replace(outcome, case_id=case_id, message=outcome.message + "; case added")
    _write_json(data_dir / "jobs" / job.id / METRICS_FILE, _public(outcome))
    return outcome


def _model_structures(structures: Sequence[Structure] | None) -> dict[str, Structure]:
    """The model's structures by TG-263 name (default: rtseg's structure table)."""
    from rtseg.structures import STRUCTURES

    return {s.name: s for s in (structures or STRUCTURES)}


def map_roi_names(
    masks: dict[str, npt.NDArray[np.bool_]],
    structures: Mapping[str, Structure],
    rois: Sequence[tuple[str, str | None]],
    site: SiteNames | None,
) -> tuple[dict[str, npt.NDArray[np.bool_]], set[str], dict[str, str]]:
    """Approved ROIs under the model's TG-263 names; the rest are unknown; each ROI's decision.

    Decided by :class:`rtseg.roi_names.RoiNameMapper` over the ROIs that have
    contours (with their RT ROI Interpreted Types), so two of them claiming one
    structure are both left out as ambiguous.
    """
    types = dict(rois)
    decisions = RoiNameMapper(structures, site).map_case((name, types.get(name)) for name in masks)
    mapped = {d.structure: masks[d.roi] for d in decisions if d.kind == MAPPED and d.structure}
    unknown = {d.roi for d in decisions if d.kind != MAPPED}
    reasons = {d.roi: f"{d.structure if d.kind == MAPPED else d.kind}: {d.reason}" for d in decisions}
    return mapped, unknown, reasons


def edit_metrics(
    node: Mapping[str, npt.NDArray[np.bool_]], approved: Mapping[str, npt.NDArray[np.bool_]], volume: CTVolume
) -> dict[str, dict[str, float | None]]:
    """Per approved structure: how far the clinician moved the node's contour (empty if it had none)."""
    out = {}
    for name, reference in approved.items():
        predicted = node.get(name, np.zeros_like(reference))
        s = score(predicted, reference, volume.spacing)
        out[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(s).items()}
    return out


def case_id_for(series_uid: str) -> str:
    """Case folder name: a hash of the CT series UID (same CT, same case)."""
    return "cl-" + hashlib.sha256(f"rtseg-case/{series_uid}".encode()).hexdigest()[:16]


def add_case(
    volume: CTVolume,
    input_dir: Path,
    approved: Mapping[str, npt.NDArray[np.bool_]],
    structures: Mapping[str, Structure],
    site_data: Path,
    job: Job,
    outcome: Outcome,
) -> str:
    """Write ``<site_data>/<case>/ct/`` + ``labels.nii.gz`` atomically; check it loads back."""
    from rtseg.phantom.cohort import write_label_image

    case_id = case_id_for(volume.info.series_instance_uid)
    site_data.mkdir(parents=True, exist_ok=True)
    tmp = site_data / f".incoming-{uuid.uuid4().hex}"
    try:
        _copy_series(input_dir, volume, tmp / CT_DIR)
        write_label_image(label_map(approved, structures, volume.shape), volume.affine, tmp / LABELS_FILE)
        info = {
            "source": "closed-loop",
            "job": job.id,
            "model_version": outcome.model_version,
            "structures": sorted(approved),
            "added": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "case.json").write_text(json.dumps(info, indent=1) + "\n")
        load_case(tmp)  # a case that does not load back is never added
        final = site_data / case_id
        if final.exists():  # a later approval of the same CT replaces the earlier one
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("closed loop: case %s added to the site data (%d structures)", case_id, len(approved))
    return case_id


def label_map(
    masks: Mapping[str, npt.NDArray[np.bool_]], structures: Mapping[str, Structure], shape: tuple[int, ...]
) -> npt.NDArray[np.uint8]:
    """Label map in the model's label ids: the body outline first, organs over it in label order."""
    labels = np.zeros(shape, dtype=np.uint8)
    ordered = sorted(masks, key=lambda n: (structures[n].rt_type != "EXTERNAL", structures[n].label))
    for name in ordered:
        labels[masks[name]] = structures[name].label
    return labels


def _copy_series(input_dir: Path, volume: CTVolume, out: Path) -> None:
    wanted = set(volume.info.sop_instance_uids)
    out.mkdir(parents=True)
    n = 0
    for path in sorted(p for p in input_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            uid = str(
                pydicom.dcmread(
                    path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                ).SOPInstanceUID
            )
        except READ_ERRORS:
            continue
        if uid in wanted:
            shutil.copy2(path, out / f"{n:05d}.dcm")
            n += 1
    if n != len(wanted):
        raise InputError(f"found {n} of the {len(wanted)} CT slices to copy", source=str(input_dir))


def _public(outcome: Outcome) -> dict[str, Any]:
    return {k: v for k, v in asdict(outcome).items() if k != "instance_key"} | {"time": time.time()}


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _finish(store: JobStore, outcome: Outcome, path: Path) -> Outcome:
    key = outcome.instance_key or uid_key(str(path))
    outcome = outcome if outcome.instance_key else replace(outcome, instance_key=key)
    detail = {
        "message": outcome.message,
        "metrics": outcome.metrics,
        "unknown_rois": list(outcome.unknown_rois),
        "not_approved_structures": list(outcome.not_approved_structures),
        "roi_mapping": outcome.roi_mapping,
    }
    if outcome.quarantine is not None:
        detail["quarantine"] = outcome.quarantine
    with _Db(store) as db:
        db.execute(
            "INSERT OR REPLACE INTO closed_loop VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                outcome.status,
                outcome.job_id,
                outcome.model_version,
                outcome.case_id,
                json.dumps(detail),
                time.time(),
                str(path),
            ),
        )
    level = logging.INFO if outcome.status in ("recorded", "ignored") else logging.WARNING
    log.log(level, "closed loop: RTSTRUCT %s %s: %s", key, outcome.status, outcome.message)
    if outcome.unknown_rois:
        log.info(
            "closed loop: RTSTRUCT %s: %d ROI name(s) not in the model ignored",
            key,
            len(outcome.unknown_rois),
        )
    return outcome


class _Db:
    """A short-lived connection to the node's state database with the closed_loop table."""

    def __init__(self, store: JobStore) -> None:
        self.conn = sqlite3.connect(store.db_path, timeout=30.0, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout=30000")
        self.conn.executescript(_SCHEMA)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def recorded(store: JobStore, job_id: str | None = None) -> list[dict[str, Any]]:
    """Rows of the closed_loop table (all, or one job's), oldest first."""
    with _Db(store) as db:
        db.row_factory = sqlite3.Row
        sql, args = "SELECT * FROM closed_loop", []
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", [job_id]
        rows = db.execute(sql + " ORDER BY received", args).fetchall()
    return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]


class ClosedLoop:
    """Processes RTSTRUCTs the SCP spooled (``<data_dir>/spool/rtstruct/*/*.dcm``), each once.

    The node runs :meth:`run_once` in a background loop; heavy work never
    happens inside the C-STORE handler.
    """

    def __init__(
        self,
        data_dir: Path,
        store: JobStore,
        config: ClosedLoopConfig | None = None,
        audit: Callable[..., None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store = store
        self.config = config or ClosedLoopConfig()
        self.spool = self.data_dir / "spool" / "rtstruct"
        self.quarantine = self.data_dir / QUARANTINE_DIR
        self.audit = audit  # e.g. the node's AuditLog.record: told about every quarantined file

    def pending(self) -> list[Path]:
        if not self.spool.is_dir():
            return []
        with _Db(self.store) as db:
            done = {str(r[0]) for r in db.execute("SELECT source FROM closed_loop").fetchall()}
        return sorted(p for p in self.spool.glob("*/*.dcm") if str(p) not in done)

    def run_once(self) -> list[Outcome]:
        """Each pending file once; one that cannot be parsed is quarantined, and the queue moves on."""
        outcomes = []
        for path in self.pending():
            outcome = handle_rtstruct(path, self.data_dir, self.store, self.config, self.quarantine)
            if outcome.status == "quarantined" and self.audit is not None:
                self.audit(
                    "rtstruct_quarantined",
                    instance=outcome.instance_key,
                    reason=outcome.message,
                    path=outcome.quarantine,
                )
            outcomes.append(outcome)
        return outcomes
