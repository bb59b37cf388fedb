"""Real scanners' DICOM (``../shared/realct``, public series, never copied here): loaded or refused truly.

One test per series of the shared folder (see its README): what rtseg must
tolerate (empty data set UIDs with the file meta's, JPEG 2000, no ``.dcm``,
511 × 511, an empty PatientPosition, SliceThickness ≠ spacing) and what it
must refuse with the real reason and what to do (gantry tilt, too few slices,
an RTSTRUCT offered as CT).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, _config

from dicom_node.assembly import Assembler
from dicom_node.node import open_stores
from dicom_node.scp import Receiver, start_scp
from dicom_node.spool import Spool
from rtseg.audit import AuditLog
from rtseg.ct import MIN_SLICES, find_series, load_series
from rtseg.errors import InputError
from rtseg.jobs import JobState
from rtseg.model.manifest import load_manifest
from rtseg.model.segmenter import Segmentation
from rtseg.pipeline import segment_series
from rtseg.settings import load_settings
from rtseg.volume import CTVolume

SIEMENS = "siemens_petct_j2k"


def _error(source: object, **kwargs: object) -> str:
    with pytest.raises(InputError) as info:
        load_series(source, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# -- Siemens PET/CT: JPEG 2000, empty data set UIDs, no .dcm, thickness 3 mm at 2 mm steps -----------


def test_siemens_petct_j2k_loads_with_the_file_meta_uids(realct: Path) -> None:
    folder = realct / SIEMENS
    files = sorted(p for p in folder.iterdir() if p.name.startswith("CT."))
    assert all(p.suffix != ".dcm" for p in files)
    volume = load_series(folder)
    assert volume.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.977, 0.977), abs=1e-3)  # 2 mm from the positions, not 3
    metas = [pydicom.dcmread(p, stop_before_pixels=True).file_meta for p in files]
    assert volume.info.sop_class_uid == metas[0].MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    uids = {str(meta.MediaStorageSOPInstanceUID) for meta in metas}
    assert set(volume.info.sop_instance_uids) == uids and len(uids) == 20
    assert volume.info.patient_position == "HFS"
    # the series and study UIDs are empty too: derived, and the reviewer is told
    assert volume.info.series_instance_uid.startswith("2.25.") and volume.info.study_instance_uid.startswith(
        "2.25."
    )
    study, series = volume.info.notes
    assert study.startswith("StudyInstanceUID empty") and series.startswith("SeriesInstanceUID empty")


def test_siemens_petct_hu_with_intercept_minus_1024_and_unsigned_pixels(realct: Path) -> None:
    hu = load_series(realct / SIEMENS).hu
    assert hu.dtype == np.int16
    air = hu[:, 5:40, 5:40]  # the corners of the field of view: room air
    assert -1030 <= float(np.median(air)) <= -970
    body = hu[:, 236:276, 236:276]  # the middle of the upper abdomen: soft tissue
    assert 0 <= float(np.median(body)) <= 100


class _Node:
    """The node's receiving half in-process (SCP, spool, assembler), as tests/dicom_node/test_scp.py."""

    def __init__(self, data_dir: Path) -> None:
        env = {"RTSEG_DATA_DIR": str(data_dir), "RTSEG_DICOM_PORT": "0", "RTSEG_DICOM_HOST": "127.0.0.1"}
        env |= {"RTSEG_NODE_QUIET_TIME_S": "0.5", "RTSEG_NODE_MIN_FREE_DISK_MB": "10"}
        self.settings = load_settings(environ=env)
        self.store, deliveries = open_stores(data_dir)
        audit = AuditLog(data_dir / "audit" / "audit.log")
        spool = Spool(data_dir / "spool", self.settings.node.min_free_disk_mb, audit)
        self.assembler = Assembler(self.store, spool, self.settings, audit)
        receiver = Receiver(
            spool,
            self.assembler,
            deliveries,
            audit,
            max_instance_bytes=self.settings.dicom.max_instance_bytes,
        )
        self.server = start_scp(self.settings.dicom, receiver, audit, lambda _outcome: None)
        self.port = int(self.server.server_address[1])

    def complete(self) -> list[str]:
        time.sleep(self.settings.node.quiet_time_s + 0.1)
        return self.assembler.tick()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[_Node]:
    made = _Node(tmp_path / "data")
    yield made
    made.server.shutdown()


def test_siemens_petct_j2k_through_the_node(
    realct: Path, node: _Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    files = sorted(p for p in (realct / SIEMENS).iterdir() if p.name.startswith("CT."))
    # the file's own bytes, as a PACS sends them: pynetdicom takes the UIDs from the file meta
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    meta = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTSEG")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 20
    (job_id,) = node.complete()
    job = node.store.get(job_id)
    assert job.state == JobState.QUEUED and job.meta["n_instances"] == 20
    # the worker's loader reads what the node stored
    spooled = [p for p in (node.settings.data_dir / "spool").rglob("*.dcm")]
    assert load_series(spooled).shape == (20, 512, 512)


# -- CERR head CT: 511 × 511, PatientPosition empty ----------------------------------------------


def test_head_ct_cerr_loads_with_the_position_from_the_orientation(realct: Path) -> None:
    volume = load_series(realct / "head_ct_cerr")
    assert volume.shape == (90, 511, 511)
    assert volume.spacing == pytest.approx((3.0, 1.0, 1.0))
    assert volume.info.patient_position == "HFS"
    (note,) = volume.info.notes
    assert "PatientPosition" in note and "supine" in note and "head-first assumed" in note


class _Blank:
    """Stands in for the model (its output is not what is tested here): labels nothing."""

    def __init__(self) -> None:
        from rtseg.model.default import default_model_dir

        self.manifest = load_manifest(default_model_dir())

    def segment(self, volume: CTVolume) -> Segmentation:
        return Segmentation(np.zeros(volume.shape, np.uint8), self.manifest, 0.0)


def test_assumed_position_reaches_the_rtstruct_and_the_result(realct: Path, tmp_path: Path) -> None:
    volume = load_series(realct / "head_ct_cerr")
    out = tmp_path / "rs.dcm"
    # a head CT is outside the default model's region: the check is off to see the note travel
    result = segment_series(volume, _Blank(), out, region_check=False)  # type: ignore[arg-type]
    (note,) = volume.info.notes
    assert note in result.flags  # what the worker writes into the job record
    assert note in str(pydicom.dcmread(out).StructureSetDescription)


# -- GE gantry tilt ------------------------------------------------------------------------------


def test_ge_tilt_is_refused_naming_the_tilt_and_what_to_do(realct: Path) -> None:
    message = _error(realct / "ge_tilt")
    assert "gantry tilt 18.5°" in message
    assert "dcm2niix" in message and "untilted" in message


def test_tilt_without_gantry_detector_tilt_is_named_from_the_orientation(
    realct: Path, tmp_path: Path
) -> None:
    for path in sorted((realct / "ge_tilt").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.GantryDetectorTilt
        ds.save_as(tmp_path / path.name)
    message = _error(tmp_path)
    assert "tilted 18.5° about the left-right axis (gantry tilt" in message and "dcm2niix" in message


# -- GE feet-first supine, 3 slices --------------------------------------------------------------


def test_ge_ffs_3slice_is_refused_for_too_few_slices(realct: Path) -> None:
    message = _error(realct / "ge_ffs_3slice")
    assert f"has 3 slice(s); at least {MIN_SLICES} are needed" in message


def test_ge_ffs_3slice_geometry_and_position(realct: Path) -> None:
    volume = load_series(realct / "ge_ffs_3slice", min_slices=3)
    assert volume.info.patient_position == "FFS" and volume.info.notes == ()
    assert volume.shape == (3, 512, 512)
    # sorted ascending along the normal +z: slice 0 is the lowest (z = -128.69), 1 mm apart
    assert volume.affine[:3, 3] == pytest.approx((-235.2, -226.8, -128.69), abs=1e-3)
    assert volume.affine[:3, 2] == pytest.approx((0.0, 0.0, 1.0), abs=1e-4)


# -- Eclipse RTSTRUCT with one of its CT slices --------------------------------------------------


def test_eclipse_ct_slice_alone_is_refused_for_too_few_slices(realct: Path) -> None:
    message = _error(realct / "eclipse_rtstruct")
    assert f"has 1 slice(s); at least {MIN_SLICES} are needed" in message


def test_eclipse_rtstruct_is_not_taken_for_a_ct(realct: Path, tmp_path: Path) -> None:
    rtss = realct / "eclipse_rtstruct" / "rtss.dcm"
    message = _error([rtss])
    assert "no CT image series found" in message and "RTSTRUCT" in message
    shutil.copy(rtss, tmp_path / "rtss.dcm")
    assert "no CT image series found (found: 1 RTSTRUCT)" in _error(tmp_path)
    (summary,) = find_series([rtss])
    assert summary.modality == "RTSTRUCT"
