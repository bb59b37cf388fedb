"""``rtseg cases names|import --pacs``: a site's archive in Orthanc → labelled, de-identified cases.

Orthanc holds phantom CTs and "clinical" structure sets written in a site's
style: Dutch and German names, a PRV, a PTV, an ambiguous pair, missing organs,
one set whose CT is not in the PACS and one unapproved. The command line
queries it (C-FIND), retrieves with C-GET and imports; the labels must match
the phantom truth.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from case_helpers import small_case
from pydicom.uid import generate_uid
from test_orthanc import Orthanc

from rtseg.cases import LabelledCase, load_case
from rtseg.metrics import dice
from rtseg.net import free_port
from rtseg.phantom.cohort import case_id, write_case
from rtseg.rtstruct import ModelIdentity, build_rtstruct, write_rtstruct
from rtseg.structures import STRUCTURES

LABEL = {s.name: s.label for s in STRUCTURES}
# a Dutch department: a PRV and a PTV (rejected), "Milt" and "Spleen" on one patient (ambiguous)
DUTCH = {"Liver": "LIVER", "Kidney_L": "Nier li", "Kidney_R": "Kidney Rt", "SpinalCord": "z_PRV_Cord"}
DUTCH |= {"Colon": "PTV_45", "Spleen": "Milt", "Stomach": "Spleen", "External": "BODY"}
# a German one that contoured only what its plan needed
GERMAN = {"Liver": "Leber", "Kidney_L": "Niere links", "Kidney_R": "Niere rechts", "External": "Körper"}
CALLING = "RTSEG-IMPORT"


def _copy_ct(truth: Path, out: Path) -> dict[str, str]:
    """The truth's CT slices under ``out`` as a new patient's series (new UIDs, a name to scan for)."""
    new = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(), "name": out.name}
    out.mkdir(parents=True)
    for path in sorted(truth.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = new["study"], new["series"]
        ds.FrameOfReferenceUID, ds.StudyDate = new["frame"], "20250314"
        ds.PatientID, ds.PatientName = f"PID-{out.name}", f"SURNAME^{out.name}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / path.name)
    return new


def _structure_set(truth: LabelledCase, ct: Path, names: dict[str, str], out: Path, status: str) -> None:
    """A TPS's structure set on the CT in ``ct``: only the structures ``names`` lists, renamed."""
    from rtseg.ct import load_series

    volume = load_series(sorted(ct.glob("*.dcm")))
    kept = np.isin(truth.labels, [LABEL[s] for s in names])
    # organs the plan did not need are inside the body: the External covers them
    labels = np.where(kept, truth.labels, np.where(truth.labels > 0, LABEL["External"], 0))
    labels = labels.astype(truth.labels.dtype)
    ds = build_rtstruct(volume, labels, STRUCTURES, ModelIdentity("TPS", "1")).dataset
    for roi in ds.StructureSetROISequence:
        roi.ROIName = names.get(str(roi.ROIName), str(roi.ROIName))
    ds.ApprovalStatus, ds.StructureSetLabel = status, "PLAN" if status == "APPROVED" else "draft"
    write_rtstruct(ds, out)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Files for the PACS: three patients' CTs (one never uploaded) and four structure sets."""
    root = tmp_path_factory.mktemp("archive")
    write_case("A", 5, 0, root / "gen", matrix=96)
    truth = load_case(small_case(root / "gen" / case_id("A", 5, 0), root / "truth", 16))
    upload, missing = root / "upload", root / "missing"
    for patient, names, status, folder in (
        ("P1", DUTCH, "APPROVED", upload),
        ("P2", GERMAN, "APPROVED", upload),
        ("P3", GERMAN, "APPROVED", missing),  # its CT never reaches the PACS
    ):
        _copy_ct(root / "truth" / "ct", folder / patient)
        _structure_set(truth, folder / patient, names, upload / f"RS-{patient}.dcm", status)
    _structure_set(truth, upload / "P1", DUTCH, upload / "RS-P1-draft.dcm", "UNAPPROVED")
    return {"truth": truth, "upload": upload}


@pytest.fixture
def pacs(tmp_path: Path, archive: dict[str, object]) -> Iterator[Orthanc]:
    """Orthanc with the archive, knowing our importer's AE (C-FIND and C-GET need it)."""
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc", free_port())
    config = json.loads((orthanc.root / "orthanc.json").read_text())
    config["DicomModalities"] = {"importer": [CALLING, "127.0.0.1", free_port()]}
    (orthanc.root / "orthanc.json").write_text(json.dumps(config))
    orthanc.start()
    upload = archive["upload"]
    assert isinstance(upload, Path)
    for path in sorted(upload.rglob("*.dcm")):
        orthanc.api("/instances", path.read_bytes())
    yield orthanc
    orthanc.stop()


def rtseg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtseg_app", "cases", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow  # about 40 s: a phantom, Orthanc, three runs of the command line
def test_a_pacs_archive_becomes_cases_bad_items_are_listed_and_a_rerun_adds_nothing(
    pacs: Orthanc, archive: dict[str, object], tmp_path: Path
) -> None:
    truth = archive["truth"]
    assert isinstance(truth, LabelledCase)
    out = tmp_path / "cases"
    address = f"ORTHANC@127.0.0.1:{pacs.dicom}"
    run = rtseg("import", "--pacs", address, "--calling-ae", CALLING, "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    text = run.stdout
    assert "importing 4 structure set(s) from " + address in text
    assert "skipped: referenced CT not in the PACS" in text
    assert "skipped: not approved (UNAPPROVED, label 'draft')" in text
    assert "left out: Milt: ambiguous" in text and "left out: Spleen: ambiguous" in text
    assert _summary(text) == {"imported": 2, "already present": 0, "skipped": 2}
    cases = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert cases == ["site-0001", "site-0002"]
    present = {s.name for s in STRUCTURES if (truth.labels == s.label).any()}  # in these 16 slices
    dutch = set(DUTCH) - {"SpinalCord", "Colon", "Spleen", "Stomach"}  # PRV, PTV, the ambiguous pair
    wanted = {frozenset(set(GERMAN) & present), frozenset(dutch & present)}
    got = set()
    for name in cases:
        case = load_case(out / name)
        record = json.loads((out / name / "case.json").read_text())
        contoured = frozenset(s for s, state in record["structures"].items() if state == "contoured")
        got.add(contoured)
        for structure in contoured:
            body = structure == "External"  # the body: every labelled voxel, organs included
            imported = case.labels > 0 if body else case.labels == LABEL[structure]
            score = dice(imported, truth.labels > 0 if body else truth.labels == LABEL[structure])
            assert score >= 0.97, f"{name} {structure}: Dice {score:.3f}"
        _no_source_identity(out / name)
    assert got == wanted
    assert not any((out / ".rtseg-import" / "staging").iterdir())  # every staged item removed
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if ".rtseg-import" not in p.parts}
    again = rtseg("import", "--pacs", address, "--calling-ae", CALLING, "--out", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _summary(again.stdout) == {"imported": 0, "already present": 2, "skipped": 2}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if ".rtseg-import" not in p.parts} == stamps

    # the structure sets hold patient data: read under the data directory, never the system's /tmp
    data, system_tmp = tmp_path / "data", tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {"RTSEG_DATA_DIR": str(data), "TMPDIR": str(system_tmp)}
    names = rtseg("names", "--pacs", address, "--calling-ae", CALLING, env=env)
    assert names.returncode == 0, names.stderr
    assert (data / "tmp").is_dir() and list((data / "tmp").iterdir()) == []  # used, then removed
    assert list(system_tmp.iterdir()) == []
    assert "ROI names in 4 RTSTRUCT(s) from " + address in names.stdout
    for roi, target in (("Kidney Rt", "Kidney_R"), ("Niere rechts", "Kidney_R"), ("Leber", "Liver")):
        assert re.search(rf"\s{roi}\s+→ {target}\s", names.stdout), f"{roi} → {target} not listed"
    assert "z_PRV_Cord" in names.stdout and "PTV_45" in names.stdout


def _summary(text: str) -> dict[str, int]:
    lines = [line.rsplit(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "["))]
    return {k.strip(): int(v) for k, v in (x for x in lines if len(x) == 2 and x[1].isdigit())}


def _no_source_identity(case: Path) -> None:
    for path in case.rglob("*"):
        if path.is_file() and path.suffix != ".gz":
            data = path.read_bytes()
            assert b"SURNAME^" not in data and b"PID-P" not in data, path


def test_an_unreachable_pacs_is_one_line_naming_it_and_exit_2(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    run = rtseg("import", "--pacs", f"ORTHANC@127.0.0.1:{port}", "--out", str(tmp_path / "cases"))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"rtseg cases: error: ORTHANC@127.0.0.1:{port}: cannot reach the PACS (Connection refused)"
    ]
    assert "Traceback" not in run.stderr and not (tmp_path / "cases").exists()


def test_the_query_asks_for_the_date_range_and_keeps_only_rtstruct_series() -> None:
    """Against a pynetdicom Find SCP that ignores Modality (as a lax PACS may): CT series are dropped."""
    from datetime import date

    from pydicom import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from dicom_node.qr import Pacs, QueryRetrieve

    asked: list[Dataset] = []

    def answer(event: evt.Event) -> object:
        query = event.identifier
        asked.append(query)
        level = query.QueryRetrieveLevel
        rows = {"STUDY": [("1.2.3", "")], "SERIES": [("1.2.3.1", "CT"), ("1.2.3.2", "RTSTRUCT")]}
        rows["IMAGE"] = [("1.2.3.2.1", "")]
        for uid, modality in rows[level]:
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            if level == "STUDY":
                ds.StudyInstanceUID = uid
            elif level == "SERIES":
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", uid, modality
                ds.SeriesNumber = "7"
            else:
                ds.SOPInstanceUID, ds.StructureSetLabel, ds.ApprovalStatus = uid, "PLAN", "APPROVED"
            yield 0xFF00, ds

    scp = AE(ae_title="LAXPACS")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, answer)])
    try:
        qr = QueryRetrieve(Pacs.parse(f"LAXPACS@127.0.0.1:{port}"), "RTSEG", timeout=10)
        found = qr.find_rtstructs(date(2024, 1, 1), date(2024, 12, 31))
    finally:
        server.shutdown()
    assert [(f.series_uid, f.sop_uid, f.series_number, f.label, f.approval) for f in found] == [
        ("1.2.3.2", "1.2.3.2.1", "7", "PLAN", "APPROVED")
    ]
    assert asked[0].StudyDate == "20240101-20241231"
    assert [q.Modality for q in asked if q.QueryRetrieveLevel == "SERIES"] == ["RTSTRUCT"]
    assert len([q for q in asked if q.QueryRetrieveLevel == "IMAGE"]) == 1  # the CT series never asked
