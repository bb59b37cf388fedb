"""Bad uploads get a 4xx problem JSON saying what is wrong, and leave nothing behind (real server)."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from svc_helpers import Running, zip_folder

PROBLEM = "application/problem+json"


def assert_problem(response: object, status: int, slug: str | None, *words: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["Content-Type"] == PROBLEM  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert body["status"] == status
    assert body["title"]
    if slug is not None:
        assert body["type"] == f"urn:rtseg:problem:{slug}"
    for word in words:
        assert word in str(body["detail"]), body
    return body


def assert_nothing_left(running: Running) -> None:
    assert running.job_dirs() == []
    assert running.store.counts() == {k: 0 for k in running.store.counts()}
    leftovers = {p.name for p in running.data_dir.iterdir()} - {
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "jobs",
    }
    assert leftovers == set()


def zip_of(entries: list[tuple[zipfile.ZipInfo | str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def series_files(ct: Path) -> list[Path]:
    return sorted(ct.iterdir())


def test_zip_of_a_phantom_series_is_queued(serve: Callable[..., Running], phantom_zip: bytes) -> None:
    running = serve()
    response = running.post(phantom_zip)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued"
    assert job["input"] == {"input_kind": "dicom", "n_files": 116, "n_slices": 116}
    assert response.headers["Location"] == f"/v1/segmentations/{job['id']}"
    inputs = sorted((running.data_dir / "jobs" / job["id"] / "input").iterdir())
    assert len(inputs) == 116 and all(p.name.endswith(".dcm") for p in inputs)
    assert not (running.data_dir / "jobs" / job["id"] / "spool").exists()


def test_multipart_dicom_files_are_queued(serve: Callable[..., Running], phantom_ct96: Path) -> None:
    running = serve()
    files = [("file", (p.name, p.read_bytes(), "application/dicom")) for p in series_files(phantom_ct96)]
    response = running.post(files=files)
    assert response.status_code == 202, response.text
    assert response.json()["input"]["n_files"] == len(files)


def test_declared_body_over_the_limit_is_refused_before_it_is_read(serve: Callable[..., Running]) -> None:
    running = serve(max_body_bytes=1 << 20)
    conn = http.client.HTTPConnection(running.server.host, running.server.port, timeout=10)
    conn.putrequest("POST", "/v1/segmentations")
    conn.putheader("Authorization", "Bearer test-token-0123456789")
    conn.putheader("Content-Type", "application/zip")
    conn.putheader("Content-Length", str(10 << 30))  # 10 GiB announced, none sent
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert response.getheader("Content-Type") == PROBLEM
    assert json.loads(response.read())["status"] == 413
    conn.close()
    assert_nothing_left(running)


def test_sent_body_over_the_limit_is_413(serve: Callable[..., Running]) -> None:
    running = serve(max_body_bytes=1 << 20)
    response = running.post(os.urandom((1 << 20) + 10))
    assert response.status_code == 413
    assert response.headers["Content-Type"] == PROBLEM
    assert_nothing_left(running)


def test_zip_bomb_by_ratio(serve: Callable[..., Running]) -> None:
    running = serve()
    response = running.post(zip_of([("a.dcm", b"\0" * (20 << 20))]))
    assert_problem(response, 413, "zip-bomb", "compressed more than")
    assert_nothing_left(running)


def test_zip_bomb_by_total_size(serve: Callable[..., Running]) -> None:
    running = serve(max_uncompressed_bytes=4 << 20)
    entries = [(f"{i}.dcm", os.urandom(1 << 20)) for i in range(5)]
    response = running.post(zip_of(entries, zipfile.ZIP_STORED))
    assert_problem(response, 413, "zip-bomb", "unpacks to")
    assert_nothing_left(running)


def test_zip_entry_lying_about_its_size(serve: Callable[..., Running], phantom_ct96: Path) -> None:
    """A zip whose central directory declares less than the entry really holds."""
    running = serve()
    data = series_files(phantom_ct96)[0].read_bytes() * 4
    raw = bytearray(zip_of([("a.dcm", data)], zipfile.ZIP_STORED))
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (1000).to_bytes(4, "little")  # uncompressed size in the directory
    response = running.post(bytes(raw))
    assert response.status_code in (400, 413)
    assert response.headers["Content-Type"] == PROBLEM
    assert_nothing_left(running)


def test_too_many_entries(serve: Callable[..., Running]) -> None:
    running = serve(max_files=10)
    response = running.post(zip_of([(f"{i}.dcm", b"x") for i in range(11)]))
    assert_problem(response, 413, "too-many", "11 files")
    assert_nothing_left(running)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../../evil.dcm", "outside the archive"),
        ("series/../../evil.dcm", "outside the archive"),
        ("/tmp/evil.dcm", "absolute path"),
        ("C:/evil.dcm", "absolute path"),
        ("..\\evil.dcm", "outside the archive"),
    ],
)
def test_unsafe_entry_names(serve: Callable[..., Running], tmp_path: Path, name: str, words: str) -> None:
    running = serve()
    info = zipfile.ZipInfo("placeholder")
    info.filename = name  # ZipInfo would normalise some names; set it raw, as an attacker would
    response = running.post(zip_of([(info, b"x")]))
    assert_problem(response, 400, "unsafe-path", words)
    assert_nothing_left(running)
    assert not list(tmp_path.rglob("evil.dcm"))
    assert not Path("/tmp/evil.dcm").exists()


def test_symlink_entry(serve: Callable[..., Running]) -> None:
    running = serve()
    info = zipfile.ZipInfo("series/link.dcm")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    response = running.post(zip_of([(info, b"/etc/passwd")]))
    assert_problem(response, 400, "symlink", "symbolic link")
    assert_nothing_left(running)


def test_non_dicom_file_in_zip(serve: Callable[..., Running], phantom_ct96: Path) -> None:
    running = serve()
    entries = [(f"s/{p.name}", p.read_bytes()) for p in series_files(phantom_ct96)[:5]]
    response = running.post(zip_of([*entries, ("s/notes.txt", b"patient notes")]))
    assert_problem(response, 422, "not-dicom", "s/notes.txt", "not a DICOM file")
    assert_nothing_left(running)


def test_macos_metadata_is_skipped(serve: Callable[..., Running], phantom_ct96: Path) -> None:
    running = serve()
    entries = [(f"s/{p.name}", p.read_bytes()) for p in series_files(phantom_ct96)]
    response = running.post(zip_of([*entries, ("__MACOSX/s/._x", b"junk"), ("s/.DS_Store", b"junk")]))
    assert response.status_code == 202, response.text


def _rewrite(ct: Path, out: Path, change: Callable[[int, pydicom.Dataset], bool]) -> Path:
    """Copy a series, letting ``change`` edit each dataset (return False to drop the file)."""
    out.mkdir()
    for index, path in enumerate(series_files(ct)):
        ds = pydicom.dcmread(path)
        if change(index, ds):
            ds.save_as(out / path.name)
    return out


def test_two_series_in_one_upload(serve: Callable[..., Running], phantom_ct96: Path, tmp_path: Path) -> None:
    def split(index: int, ds: pydicom.Dataset) -> bool:
        if index % 2:
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"
        return True

    running = serve()
    response = running.post(zip_folder(_rewrite(phantom_ct96, tmp_path / "two", split)))
    assert_problem(response, 422, "invalid-upload", "exactly one CT series", "found 2")
    assert_nothing_left(running)


def test_non_ct_series(serve: Callable[..., Running], phantom_ct96: Path, tmp_path: Path) -> None:
    def to_mr(_index: int, ds: pydicom.Dataset) -> bool:
        ds.Modality = "MR"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        return True

    running = serve()
    response = running.post(zip_folder(_rewrite(phantom_ct96, tmp_path / "mr", to_mr)))
    assert_problem(response, 422, "not-ct", "MR, not CT")
    assert_nothing_left(running)


def test_missing_slice(serve: Callable[..., Running], phantom_ct96: Path, tmp_path: Path) -> None:
    running = serve()
    holed = _rewrite(phantom_ct96, tmp_path / "holed", lambda index, _ds: index != 50)
    response = running.post(zip_folder(holed))
    body = assert_problem(response, 422, "invalid-series")
    assert "missing" in str(body["detail"]) or "gap" in str(body["detail"])
    assert str(running.data_dir) not in str(body["detail"])  # no server paths in answers
    assert_nothing_left(running)


def test_damaged_zip(serve: Callable[..., Running], phantom_zip: bytes) -> None:
    running = serve()
    response = running.post(phantom_zip[: len(phantom_zip) // 2])
    assert response.status_code == 422 or response.status_code == 400
    assert response.headers["Content-Type"] == PROBLEM
    assert_nothing_left(running)


def test_unsupported_media_type(serve: Callable[..., Running]) -> None:
    running = serve()
    response = running.post(b"hello", headers={"Content-Type": "text/plain"})
    assert_problem(response, 415, "unsupported-media-type", "multipart/form-data")
    assert_nothing_left(running)


@pytest.mark.parametrize("media_type", ["application/octet-stream", "application/x-tar", "image/png"])
def test_a_zip_under_another_content_type_is_415(
    serve: Callable[..., Running], phantom_zip: bytes, media_type: str
) -> None:
    """The README promises 415 for other content types: a valid zip declared octet-stream is refused."""
    running = serve()
    response = running.post(phantom_zip, headers={"Content-Type": media_type})
    body = assert_problem(response, 415, "unsupported-media-type", "application/zip", "multipart/form-data")
    assert media_type in str(body["detail"])
    assert_nothing_left(running)


def test_multipart_without_files(serve: Callable[..., Running]) -> None:
    running = serve()
    response = running.post(files={"note": (None, "no file here")})
    assert_problem(response, 400, "invalid-upload", "no file")
    assert_nothing_left(running)


def test_zip_next_to_dicom_files_in_multipart(serve: Callable[..., Running], phantom_ct96: Path) -> None:
    running = serve()
    first = series_files(phantom_ct96)[0]
    files = [("file", ("a.dcm", first.read_bytes())), ("file", ("b.zip", zip_of([("x.dcm", b"x")])))]
    assert_problem(running.post(files=files), 422, "not-dicom", "b.zip", "zip")
    assert_nothing_left(running)


def _nifti(tmp_path: Path, shape: tuple[int, int, int] = (20, 32, 32)) -> bytes:
    image = sitk.GetImageFromArray(np.full(shape, -1000, dtype=np.int16))
    image.SetSpacing((1.5, 1.5, 3.0))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    return path.read_bytes()


def test_nifti_is_accepted_for_research(serve: Callable[..., Running], tmp_path: Path) -> None:
    running = serve()
    response = running.post(files={"file": ("scan.nii.gz", _nifti(tmp_path))})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["input"]["input_kind"] == "nifti"
    stored = running.data_dir / "jobs" / job["id"] / "input" / "ct.nii.gz"
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(stored))).shape == (20, 32, 32)
    assert running.store.get(job["id"]).meta["input_kind"] == "nifti"


def test_uncompressed_nifti_is_stored_compressed(serve: Callable[..., Running], tmp_path: Path) -> None:
    running = serve()
    raw = gzip.decompress(_nifti(tmp_path))
    response = running.post(files={"file": ("scan.nii", raw)})  # no media type names a bare NIfTI
    assert response.status_code == 202, response.text
    stored = running.data_dir / "jobs" / response.json()["id"] / "input" / "ct.nii.gz"
    assert gzip.decompress(stored.read_bytes()) == raw


def test_truncated_nifti(serve: Callable[..., Running], tmp_path: Path) -> None:
    running = serve()
    raw = gzip.decompress(_nifti(tmp_path))
    response = running.post(gzip.compress(raw[: len(raw) // 2]), headers={"Content-Type": "application/gzip"})
    assert_problem(response, 422, "bad-nifti", "truncated")
    assert_nothing_left(running)


def test_gzip_that_is_not_nifti(serve: Callable[..., Running]) -> None:
    running = serve()
    response = running.post(gzip.compress(b"hello" * 100), headers={"Content-Type": "application/gzip"})
    assert_problem(response, 422, "bad-nifti", "not a NIfTI")
    assert_nothing_left(running)


def test_multipart_file_names_are_never_paths(
    serve: Callable[..., Running], phantom_ct96: Path, tmp_path: Path
) -> None:
    running = serve()
    files = [("file", (f"../../{p.name}", p.read_bytes())) for p in series_files(phantom_ct96)]
    response = running.post(files=files)
    assert response.status_code == 202, response.text
    stored = sorted(p.name for p in (running.data_dir / "jobs" / response.json()["id"] / "input").iterdir())
    assert stored == [f"{i:05d}.dcm" for i in range(1, len(files) + 1)]
    assert not list(tmp_path.glob("*.dcm")) and not list(running.data_dir.glob("*.dcm"))


def test_sequences_nested_past_the_recursion_limit_are_a_422_naming_the_file(
    serve: Callable[..., Running], phantom_ct96: Path, tmp_path: Path
) -> None:
    from dicom_bombs import write_nested_sequences

    running = serve()
    nested = write_nested_sequences(
        tmp_path / "IM9.dcm", 100_000, "1.2.826.0.1.3680043.10.1234.5.3", "1.2.3.15"
    )
    files = [("file", (p.name, p.read_bytes())) for p in series_files(phantom_ct96)]
    response = running.post(files=[*files, ("file", ("IM9.dcm", nested.read_bytes()))])
    assert_problem(response, 422, None, "'IM9.dcm'", "sequences nested deeper than a DICOM reader can follow")
    assert_nothing_left(running)


def test_deflate_bomb_upload_is_413_in_bounded_memory(serve: Callable[..., Running], tmp_path: Path) -> None:
    from dicom_bombs import peak_rss_mb, reset_peak_rss, write_deflate_bomb

    running = serve()  # max_instance_mb: the default 64
    bomb = write_deflate_bomb(tmp_path / "IM0001.dcm", 256, "1.2.826.0.1.3680043.10.1234.4.1", "1.2.3.11")
    reset_peak_rss()
    before = peak_rss_mb()
    with bomb.open("rb") as fh:
        response = running.post(files=[("file", ("IM0001.dcm", fh, "application/dicom"))])
    grown = peak_rss_mb() - before
    assert grown < 48, f"peak memory grew by {grown:.0f} MB checking a 256 MB Deflate bomb"
    assert_problem(response, 413, "too-large", "'IM0001.dcm'", "inflates to more than 64 MB")
    assert_nothing_left(running)
