"""rtseg.worker: real worker processes with the real default model, on the shared job store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from node_helpers import subset_series, wait_for

from rtseg.ct import load_series
from rtseg.jobs import FINAL, JobState, JobStore
from rtseg.model.default import default_model_dir
from rtseg.phantom.cohort import read_label_image
from rtseg.worker import SCRATCH, WORKER_NICE, WorkerPool, rtstruct_uids

DEST = {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 1, "tls": False}


def _nifti(ct_dir: Path, out: Path) -> None:
    volume = load_series(ct_dir)
    image = sitk.GetImageFromArray(np.asarray(volume.hu, dtype=np.int16))
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in volume.affine[:3, 3]])
    image.SetDirection([float(v) for v in (volume.affine[:3, :3] / spacing).ravel()])
    out.mkdir(parents=True)
    sitk.WriteImage(image, str(out / "ct.nii.gz"))


@pytest.mark.slow  # > 60 s: several segmentations and restarts
def test_workers_segment_dicom_and_nifti_jobs_and_recover(tmp_path: Path, phantom_ct96: Path) -> None:
    data = tmp_path / "data"
    ct = subset_series(phantom_ct96, data / "inputs" / "dicom", 24)
    _nifti(ct, data / "inputs" / "nifti")
    (data / "inputs" / "empty").mkdir()
    store = JobStore(data / "state.db")
    # a DICOM job whose worker "died" while segmenting: running, recovered at start
    crashed = store.create(
        "dicom",
        "k1",
        "inputs/dicom",
        state=JobState.RUNNING,
        meta={"destinations": [DEST], "write_labels": True},
    )
    nifti = store.create("http", "k2", "inputs/nifti", state=JobState.QUEUED, meta={"input_kind": "nifti"})
    empty = store.create("http", "k3", "inputs/empty", state=JobState.QUEUED)
    tired = store.create("dicom", "k4", "inputs/dicom", state=JobState.QUEUED)
    store.update(tired.id, attempts=3)  # claimed three times already: killed its worker each time

    left = data / SCRATCH / "rtseg-logits-999999-x"  # a big model's logits, of a worker killed mid-job
    left.mkdir(parents=True)
    (left / "logits.f16").write_bytes(b"\0" * 64)
    pool = WorkerPool(store, data, default_model_dir(), workers=1, threads=1)
    assert [j.id for j in pool.start()] == [crashed.id]
    assert list((data / SCRATCH).iterdir()) == []
    try:
        (proc,) = [slot.proc for slot in pool._slots]
        niced = min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE)
        wait_for(
            lambda: os.getpriority(os.PRIO_PROCESS, proc.pid) == niced, 60, "the worker to lower its priority"
        )
        jobs = [crashed, nifti, empty, tired]
        wait_for(lambda: all(store.get(j.id).state in FINAL | {JobState.SENDING} for j in jobs), 900, "jobs")
    finally:
        pool.stop()
    assert pool.alive() == 0

    done = store.get(crashed.id)
    assert done.state == JobState.SENDING and done.output_path == f"jobs/{crashed.id}/rtstruct.dcm"
    rtstruct = pydicom.dcmread(data / done.output_path)
    assert (rtstruct.SeriesInstanceUID, rtstruct.SOPInstanceUID) == rtstruct_uids(crashed.id)
    assert rtstruct.StudyInstanceUID == pydicom.dcmread(next(ct.iterdir())).StudyInstanceUID
    labels, _ = read_label_image(data / done.result["files"]["labels"])
    assert labels.shape == (24, 96, 96)
    assert done.result["model"]["name"] == "rtseg-peds-abdomen" and done.model_version
    assert done.result["n_slices"] == 24 and done.result["timings"]["segment_s"] > 0
    assert {s["name"] for s in done.result["structures"]} <= {s.name for s in _structures()}

    n = store.get(nifti.id)
    assert n.state == JobState.DONE and n.output_path == f"jobs/{nifti.id}/labels.nii.gz"
    nifti_labels, _ = read_label_image(data / n.output_path)
    assert nifti_labels.shape == (24, 96, 96)
    assert not (data / "jobs" / nifti.id / "rtstruct.dcm").exists()
    # same CT, same model: the NIfTI path and the DICOM path agree
    assert np.mean(nifti_labels == labels) > 0.99

    e = store.get(empty.id)
    assert e.state == JobState.FAILED and "no DICOM files" in str(e.error)
    t = store.get(tired.id)
    assert t.state == JobState.FAILED and "stopped 3 times" in str(t.error)


def test_bad_model_folder_stops_the_worker_cleanly(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    (model / "fold_all" / "checkpoint_final.pth").unlink()
    store = JobStore(tmp_path / "state.db")
    job = store.create("http", "k", "inputs/x", state=JobState.QUEUED)
    pool = WorkerPool(store, tmp_path, model, workers=1, threads=1)
    pool.start()
    wait_for(lambda: pool.alive() == 0, 120, "the worker to give up")
    assert pool.status().missing == ("rtseg-worker-0",)  # /readyz names it
    assert pool.supervise() == 0  # no model: not restarted in a tight loop
    pool.stop()
    assert store.get(job.id).state == JobState.QUEUED  # never claimed


def _structures() -> list[object]:
    from rtseg.model.manifest import load_manifest

    return list(load_manifest(default_model_dir()).structures)


@pytest.fixture(autouse=True)
def _model_present() -> None:
    default_model_dir()  # a clear ModelError if this installation lacks the model


def test_the_worker_segmenter_chunks_long_series_as_node_settings_say(tmp_path: Path) -> None:
    from rtseg.settings import load_settings
    from rtseg.worker import load_runner

    config = tmp_path / "rtseg.toml"
    config.write_text("[node]\nchunk_slices = 120\nshift_ensemble = true\n")
    store = JobStore(tmp_path / "jobs.db")
    pool = WorkerPool.from_settings(load_settings(config, environ={}), store, tmp_path, default_model_dir())
    runner = load_runner(store, pool.config)
    assert runner is not None and runner.segmenter.chunk_slices == 120
    assert runner.segmenter.shift_ensemble  # and off unless asked for:
    assert not load_settings(None, environ={}).node.shift_ensemble
    assert runner.segmenter.scratch == tmp_path / SCRATCH  # streamed logits stay in the data directory
    store.close()


def test_pool_from_settings_loads_the_configured_engine_with_its_cache_in_the_data_dir(
    tmp_path: Path,
) -> None:
    from rtseg.settings import load_settings
    from rtseg.worker import ENGINE_CACHE, load_runner

    settings = load_settings(
        environ={"RTSEG_NODE_ENGINE": "onnxruntime", "RTSEG_NODE_INFERENCE_THREADS": "1"}
    )
    store = JobStore(tmp_path / "state.db")
    pool = WorkerPool.from_settings(settings, store, tmp_path, default_model_dir())
    assert pool.config.engine == "onnxruntime"
    runner = load_runner(store, pool.config)  # what each worker process does at start
    assert runner is not None and runner.segmenter.runtime == "onnxruntime"
    assert [p.name for p in (tmp_path / ENGINE_CACHE).rglob("*.onnx")] == ["fold_0.onnx"]
    store.close()
