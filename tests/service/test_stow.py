"""DICOMweb STOW-RS (``POST /dicomweb/studies``) against a real waitress server.

The requests are built here as PS3.18 §10.5 shows them (``multipart/related;
type="application/dicom"``, one instance per part, CRLF line breaks, a close
delimiter) and read back as the Store Instances Response (DICOM JSON). The slow
scenario uses Orthanc's DICOMweb plugin as the client: Orthanc sends a study
with its ``/dicom-web/servers/{name}/stow`` route, and the job it starts ends
with an RTSTRUCT.
"""

from __future__ import annotations

import io
import json
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from node_helpers import subset_series
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from svc_helpers import AUTH, Running, make_settings
from test_auth_first import _send_until_answered

from rtseg.jobs import JobStore
from rtseg.model.default import default_model_dir
from rtseg.worker import WorkerPool
from service.app import create_app
from service.server import HttpServer

BOUNDARY = "rtseg-test-boundary-7d1f"
B = BOUNDARY.encode()
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Store Instances Response Module (PS3.18 §10.5.3) in DICOM JSON
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"


def multipart(instances: list[bytes], *, boundary: str = BOUNDARY, preamble: bytes = b"") -> bytes:
    """A STOW-RS body as PS3.18's example lays it out."""
    body = bytearray(preamble)
    for data in instances:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def stow(running: Running, body: bytes, *, path: str = "/dicomweb/studies", **headers: str) -> Any:
    sent = {**AUTH, "Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json", **headers}
    return requests.post(f"{running.url}{path}", data=body, headers=sent, timeout=300)


def files_of(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.dcm"))]


def uids(data: bytes) -> tuple[str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def references(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(answer.get(tag, {}).get("Value", []))


def item_uids(item: dict[str, Any]) -> tuple[str, str]:
    return item[SOP_CLASS]["Value"][0], item[SOP_INSTANCE]["Value"][0]


def rtstruct_instance(study_uid: str) -> bytes:
    """A minimal RT Structure Set instance (not a CT image: refused with 0x0122)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("rs.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def big_ct_instance(template: bytes, size: int) -> bytes:
    """A CT slice of another series whose pixel data alone is ``size`` × ``size`` × 2 bytes."""
    ds = pydicom.dcmread(io.BytesIO(template))
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = size
    ds.PixelData = b"\0\1" * (size * size)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def with_worker_stow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A server with one real worker and the default model (as in test_e2e)."""
    data_dir = tmp_path_factory.mktemp("stow-e2e")
    store = JobStore(data_dir / "state.db")
    pool = WorkerPool(store, data_dir, default_model_dir(), workers=1, threads=1)
    settings = make_settings()
    server = HttpServer(create_app(settings, store, data_dir), settings, port=0)
    pool.start()
    server.start()
    yield Running(server, store, data_dir, settings)
    server.stop()
    pool.stop(timeout=10)
    store.close()


@pytest.fixture(scope="module")
def series24(phantom_ct96: Path, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """24 contiguous slices of the phantom: a complete, small CT series."""
    return files_of(subset_series(phantom_ct96, tmp_path_factory.mktemp("stow") / "ct", 24))


def test_a_ct_series_is_stored_answered_200_with_every_instance_and_linked_to_its_job(
    serve: Callable[..., Running], series24: list[bytes]
) -> None:
    running = serve()
    response = stow(running, multipart(series24, preamble=b"a preamble is ignored\r\n"))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/dicom+json"
    answer = response.json()
    assert FAILED_SOP_SEQUENCE not in answer
    stored = [item_uids(i) for i in references(answer, REFERENCED_SOP_SEQUENCE)]
    assert stored == [uids(data) for data in series24]
    link, rel = response.headers["Link"].split(";")
    assert rel.strip() == 'rel="related"'
    job = running.get(link.strip("<> "))
    assert job.status_code == 200, job.text
    assert job.json()["state"] == "queued"
    assert job.json()["input"] == {"input_kind": "dicom", "n_files": 24, "n_slices": 24}
    assert not (running.data_dir / "stow").exists() or not any((running.data_dir / "stow").iterdir())


def test_a_non_ct_instance_is_refused_by_name_with_0122_and_the_series_stored_202(
    serve: Callable[..., Running], series24: list[bytes]
) -> None:
    running = serve()
    study = str(pydicom.dcmread(io.BytesIO(series24[0]), stop_before_pixels=True).StudyInstanceUID)
    rtstruct = rtstruct_instance(study)
    response = stow(running, multipart([*series24[:12], rtstruct, *series24[12:]]))
    assert response.status_code == 202, response.text
    answer = response.json()
    (failed,) = references(answer, FAILED_SOP_SEQUENCE)
    assert item_uids(failed) == (RT_STRUCTURE_SET_STORAGE, uids(rtstruct)[1])
    assert failed[FAILURE_REASON] == {"vr": "US", "Value": [0x0122]}
    assert len(references(answer, REFERENCED_SOP_SEQUENCE)) == 24
    assert "instance 13 is not a CT image" in response.headers["Warning"]
    assert len(running.store.list(source="http")) == 1


def test_an_instance_over_max_instance_mb_fails_with_a700_and_the_others_are_stored(
    serve: Callable[..., Running], series24: list[bytes]
) -> None:
    running = serve(max_instance_bytes=64 << 10)
    big = big_ct_instance(series24[0], 256)  # 128 KiB of pixel data
    response = stow(running, multipart([big, *series24]))
    assert response.status_code == 202, response.text
    answer = response.json()
    (failed,) = references(answer, FAILED_SOP_SEQUENCE)
    assert failed[FAILURE_REASON]["Value"] == [0xA700]
    assert item_uids(failed) == uids(big)  # read from the head of the part, the rest is dropped
    assert len(references(answer, REFERENCED_SOP_SEQUENCE)) == 24
    assert f"larger than the limit of {64 << 10}" in response.headers["Warning"]


def test_a_damaged_deflated_instance_fails_with_c000_and_the_others_are_stored(
    serve: Callable[..., Running], series24: list[bytes]
) -> None:
    from dicom_bombs import damaged_deflate

    running = serve()
    ds = pydicom.dcmread(io.BytesIO(series24[0]))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    damaged = damaged_deflate(ds)
    with pytest.raises(zlib.error):  # what pydicom lets through on such a part
        pydicom.dcmread(io.BytesIO(damaged), stop_before_pixels=True)
    response = stow(running, multipart([damaged, *series24[1:]]))
    assert response.status_code == 202, response.text
    answer = response.json()
    (failed,) = references(answer, FAILED_SOP_SEQUENCE)
    assert failed[FAILURE_REASON]["Value"] == [0xC000]
    assert len(references(answer, REFERENCED_SOP_SEQUENCE)) == 23
    assert "instance 1 is not a readable DICOM file" in response.headers["Warning"]


def test_a_deflated_instance_over_the_limit_fails_with_a700_named_by_its_file_meta_in_bounded_memory(
    serve: Callable[..., Running], series24: list[bytes], tmp_path: Path
) -> None:
    """Only the head of an instance over ``max_instance_mb`` is kept, for its UIDs; a Deflate head is
    a truncated stream (pydicom's whole-stream inflation raised zlib.error: the request failed 500)
    and may be a bomb, so it is not inflated: the file meta names the instance."""
    from dicom_bombs import CT_IMAGE_STORAGE, peak_rss_mb, reset_peak_rss, write_deflate_bomb

    running = serve(max_instance_bytes=512 << 10)
    sop = "1.2.826.0.1.3680043.10.1234.4.7"
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", 1024, sop, "1.2.3.12").read_bytes()
    assert len(bomb) > 512 << 10  # a GB inflated, about 1 MB deflated: over the limit as sent
    body = multipart([bomb, *series24[1:]])
    reset_peak_rss()
    before = peak_rss_mb()
    response = stow(running, body)
    grown = peak_rss_mb() - before
    assert response.status_code == 202, response.text
    assert grown < 48, f"peak memory grew by {grown:.0f} MB naming a Deflate instance over the limit"
    (failed,) = references(response.json(), FAILED_SOP_SEQUENCE)
    assert failed[FAILURE_REASON]["Value"] == [0xA700]
    assert item_uids(failed) == (CT_IMAGE_STORAGE, sop)
    assert len(references(response.json(), REFERENCED_SOP_SEQUENCE)) == 23


def test_sequences_nested_past_the_recursion_limit_fail_with_c000_and_the_others_are_stored(
    serve: Callable[..., Running], series24: list[bytes], tmp_path: Path
) -> None:
    from dicom_bombs import write_nested_sequences

    running = serve()
    nested = write_nested_sequences(
        tmp_path / "n.dcm", 100_000, "1.2.826.0.1.3680043.10.1234.5.2", "1.2.3.14"
    )
    response = stow(running, multipart([*series24[:5], nested.read_bytes(), *series24[5:]]))
    assert response.status_code == 202, response.text  # was 500: pydicom's RecursionError escaped
    (failed,) = references(response.json(), FAILED_SOP_SEQUENCE)
    assert failed[FAILURE_REASON]["Value"] == [0xC000]
    assert len(references(response.json(), REFERENCED_SOP_SEQUENCE)) == 24
    assert "instance 6 is not a readable DICOM file" in response.headers["Warning"]


def test_instances_of_another_study_than_the_url_names_all_fail_409(
    serve: Callable[..., Running], series24: list[bytes]
) -> None:
    running = serve()
    response = stow(running, multipart(series24[:12]), path="/dicomweb/studies/1.2.826.0.1.3680043.2.1")
    assert response.status_code == 409, response.text
    failed = references(response.json(), FAILED_SOP_SEQUENCE)
    assert len(failed) == 12 and {f[FAILURE_REASON]["Value"][0] for f in failed} == {0xC000}
    assert "Link" not in response.headers
    assert running.store.list(source="http") == []


@pytest.mark.parametrize(
    ("content_type", "detail"),
    [
        ("application/zip", "multipart/related"),
        (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', "metadata"),
        (f"multipart/form-data; boundary={BOUNDARY}", "multipart/related"),
    ],
)
def test_a_wrong_media_type_is_a_415_problem(
    serve: Callable[..., Running], series24: list[bytes], content_type: str, detail: str
) -> None:
    running = serve()
    response = stow(running, multipart(series24[:2]), **{"Content-Type": content_type})
    assert response.status_code == 415, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert detail in response.json()["detail"]
    assert running.job_dirs() == []


def test_without_a_token_the_answer_is_401_and_no_body_is_read(serve: Callable[..., Running]) -> None:
    running = serve(max_body_bytes=1 << 30)
    bodyless = requests.post(
        f"{running.url}/dicomweb/studies", headers={"Content-Type": CONTENT_TYPE}, timeout=30
    )
    assert bodyless.status_code == 401, bodyless.text
    assert bodyless.json()["type"] == "urn:rtseg:problem:unauthorized"
    assert bodyless.headers["WWW-Authenticate"].startswith("Bearer")
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: localhost\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {500 << 20}\r\n\r\n"
    )
    sent, answer, temp = _send_until_answered(running, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert sent <= 8 << 20 and temp == 0, (sent, temp)


@pytest.mark.parametrize(
    ("cut", "detail"),
    [
        (lambda body: body[: len(body) // 2], "before its closing boundary"),
        (lambda body: body[: -len(f"--{BOUNDARY}--\r\n")], "before its closing boundary"),
        (lambda body: b"no boundary anywhere", "before its closing boundary"),
        (lambda body: f"--{BOUNDARY}--\r\n".encode(), "holds no part"),
        (
            lambda body: body.replace(f"--{BOUNDARY}\r\n".encode(), f"--{BOUNDARY}junk\r\n".encode(), 1),
            "more",
        ),
    ],
    ids=["half", "no-close-delimiter", "no-boundary", "no-part", "garbage-after-boundary"],
)
def test_a_malformed_multipart_body_is_a_400_problem_and_leaves_nothing(
    serve: Callable[..., Running], series24: list[bytes], cut: Callable[[bytes], bytes], detail: str
) -> None:
    running = serve()
    response = stow(running, cut(multipart(series24[:3])))
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "urn:rtseg:problem:bad-multipart"
    assert detail in response.json()["detail"]
    assert running.job_dirs() == [] and running.store.list(source="http") == []
    assert not any((running.data_dir / "stow").iterdir())


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read: every delimiter straddles reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = data, step, 0

    def read(self, size: int = -1) -> bytes:
        block = self.data[self.at : self.at + min(self.step, size if size >= 0 else self.step)]
        self.at += len(block)
        return block


@pytest.mark.parametrize("step", [1, 3, 7, 64, 1 << 20])
def test_the_splitter_keeps_parts_intact_at_every_read_size(tmp_path: Path, step: int) -> None:
    tricky = [
        b"\r\n--" + BOUNDARY.encode()[:-1] + b"x\r\n",  # almost a delimiter
        b"--" + BOUNDARY.encode() + b"\r\n",  # a delimiter without the leading CRLF is data
        b"",
        b"\r\r\n\n\r\n",
    ]
    body = (
        b"preamble\r\n"
        + b"".join(
            f"--{BOUNDARY} \t\r\nContent-Type: application/dicom\r\nX-Folded: a\r\n\r\n".encode()
            + d
            + b"\r\n"
            for d in tricky
        )
        + f"--{BOUNDARY}--\r\nepilogue".encode()
    )
    from service.stow import _Related

    parts = _Related(Trickle(body, step), BOUNDARY.encode()).split(tmp_path, 1 << 20, 100)
    assert [p.path.read_bytes() for p in parts] == tricky
    assert [p.size for p in parts] == [len(d) for d in tricky]


@pytest.mark.slow  # a real segmentation
@pytest.mark.skipif(
    shutil.which("Orthanc") is None or not Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists(),
    reason="Orthanc with its DICOMweb plugin is required (scripts/setup.sh test)",
)
def test_orthanc_sends_a_study_with_stow_rs_and_the_job_ends_with_an_rtstruct(
    with_worker_stow: Running, series24: list[bytes], tmp_path: Path
) -> None:
    from node_helpers import wait_for
    from test_orthanc import Orthanc

    from rtseg.net import free_port

    running = with_worker_stow
    (tmp_path / "orthanc").mkdir()
    pacs = Orthanc(tmp_path / "orthanc", free_port())
    config = json.loads((pacs.root / "orthanc.json").read_text())
    config["Plugins"] = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
    config["DicomWeb"] = {
        "Enable": True,
        "Servers": {
            "rtseg": {
                "Url": f"{running.url}/dicomweb/",
                "HttpHeaders": {"Authorization": AUTH["Authorization"]},
            }
        },
    }
    (pacs.root / "orthanc.json").write_text(json.dumps(config))
    pacs.start()
    try:
        for data in series24:
            pacs.api("/instances", data)
        (study,) = pacs.api("/studies")
        sent = pacs.api("/dicom-web/servers/rtseg/stow", json.dumps({"Resources": [study]}).encode())
        assert sent is not None
        (job,) = wait_for(lambda: running.store.list(source="http"), 60, "the STOW-RS job")
        assert job.meta["via"] == "stow-rs" and job.meta["n_files"] == 24
        done = wait_for(
            lambda: (
                running.store.get(job.id) if running.store.get(job.id).state in ("done", "failed") else None
            ),
            900,
            "the job to finish",
            interval=1.0,
        )
        assert done.state == "done", done.error
        rtstruct = running.get(f"/v1/segmentations/{job.id}/rtstruct")
        assert rtstruct.status_code == 200
        ds = pydicom.dcmread(io.BytesIO(rtstruct.content))
        ct = pydicom.dcmread(io.BytesIO(series24[0]), stop_before_pixels=True)
        assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == ct.StudyInstanceUID
    finally:
        pacs.stop()


def _finished(running: Running, job_id: str) -> Any:
    job = running.store.get(job_id)
    return job if job.state in ("done", "failed", "dead_letter") else None
