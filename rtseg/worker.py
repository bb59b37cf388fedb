"""Segmentation workers: the one consumer of the job queue, for the DICOM node and the HTTP service.

:class:`WorkerPool` starts ``workers`` processes (multiprocessing *spawn*); each
loads the model once, lowers its priority and bounds torch's threads so the
DICOM SCP and the HTTP service stay responsive, then loops
``store.claim_next()`` → segment → ``running → sending`` (when
``job.meta["destinations"]`` is non-empty) or ``running → done``.

Job contract (paths relative to the data directory; files land in ``jobs/<id>/``):

* DICOM input (default): ``input_dir`` holds one CT series → ``rtstruct.dcm``
  (``job.output_path``) with UIDs derived from the job id, so a rerun after a
  crash writes the same instance; ``meta["write_labels"]`` also writes
  ``labels.nii.gz`` on the CT grid.
* ``meta["input_kind"] == "nifti"``: ``input_dir/ct.nii.gz`` → ``labels.nii.gz``
  only (``job.output_path``), no RTSTRUCT.
* ``job.result``: structures (name, volume_ml, n_contours, flags), omitted,
  n_slices, timings, model {name, version}, files {rtstruct?, labels?}.
* A :class:`~rtseg.errors.RtsegError` fails the job with its message. The pool
  supervises its workers: one that dies (``kill -9``, OOM) is restarted and its
  job queued again, or failed after ``crash_limit`` deaths on it; after a restart
  of the whole node :meth:`WorkerPool.start` requeues jobs left running
  (``store.recover()``) and :class:`JobRunner` fails them after :data:`MAX_ATTEMPTS` claims.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from rtseg.errors import InputError, RtsegError
from rtseg.jobs import Job, JobState, JobStore
from rtseg.model.chunked import CHUNK_SLICES
from rtseg.model.streamed import remove_left_behind
from rtseg.privacy import configure_logging, forward_logs, listen_for_logs, redact_uids, uid_key
from rtseg.settings import Settings
from rtseg.structures import MIN_ISLAND_ML

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job that killed its worker this often is failed, not retried forever
SUPERVISE_S = 1.0  # how often the pool looks for dead workers
RESTART_BACKOFF_S = 30.0  # a worker that dies before loading its model is restarted at most this often
WORKER_NICE = 10
POLL_S = 0.1  # an idle worker's look for a queued job (a read; turnaround waits for it)
ENGINE_CACHE = "engines"  # under the data directory: networks exported for [node] engine
SCRATCH = "scratch"  # under the data directory: a big model's logits, streamed while a job runs


def _job_uid(kind: str, job_id: str) -> str:
    digest = hashlib.sha256(f"rtseg/{kind}/{job_id}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def rtstruct_uids(job_id: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of a job's RTSTRUCT: the same on every run of the job."""
    return _job_uid("series", job_id), _job_uid("instance", job_id)


def seg_uids(job_id: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of a job's DICOM SEG: fixed per job, like the RTSTRUCT's."""
    return _job_uid("seg-series", job_id), _job_uid("seg-instance", job_id)


def output_formats(meta: Mapping[str, Any]) -> frozenset[str]:
    """The DICOM objects a job must produce: ``meta["formats"]`` (HTTP) and every destination's formats."""
    formats = set(meta.get("formats") or ("rtstruct",))
    for destination in meta.get("destinations") or ():
        formats.update(destination.get("formats") or ("rtstruct",))
    return frozenset(formats)


def description_note(meta: Mapping[str, Any]) -> str | None:
    """What a DICOM job's RTSTRUCT must tell the reviewer about its series, from the job's meta.

    ``supersedes``: the job made before the rest of the series arrived;
    ``late_instances``: instances that arrived after segmentation and are not contoured.
    """
    notes = []
    if meta.get("supersedes"):
        earlier = str(meta["supersedes"])
        why = (
            "re-segmented on request"
            if meta.get("resegment")
            else "made before the rest of the series arrived"
        )
        notes.append(f"SUPERSEDES RTSTRUCT {rtstruct_uids(earlier)[1]} (rtseg job {earlier}), {why}")
    if meta.get("late_instances"):
        notes.append(
            f"INCOMPLETE SERIES: {meta['late_instances']} instance(s) arrived after segmentation"
            " and are not contoured"
        )
    return "; ".join(notes) or None


def job_dir(job: Job) -> str:
    """Folder of a job's outputs, relative to the data directory."""
    return f"jobs/{job.id}"


@dataclass(frozen=True)
class WorkerConfig:
    db_path: Path
    data_dir: Path
    model_dir: Path
    threads: int | None
    log_level: int
    min_island_ml: float = MIN_ISLAND_ML
    chunk_slices: int = CHUNK_SLICES  # longer series are predicted in z-chunks
    region_check: bool = True  # refuse series that do not show the model's body region
    write_preview: bool = False  # also write jobs/<id>/preview.png once delivery is queued
    engine: str = "auto"  # what runs the network ([node] engine); exports cached in <data_dir>/engines
    shift_ensemble: bool = False  # vote eight half-voxel-shifted predictions ([node] shift_ensemble)


@dataclass(frozen=True)
class PoolStatus:
    """What ``/readyz`` and ``/metrics`` say about a pool: configured vs ready workers, restarts."""

    configured: int
    ready: int
    missing: tuple[str, ...]  # workers not running with a model loaded (dead, restarting, loading)
    restarts: int


class _Slot:
    """One configured worker: its current process and the flag it sets once its model is loaded."""

    def __init__(self, name: str, proc: BaseProcess, ready: Any) -> None:
        self.name = name
        self.proc = proc
        self.ready = ready  # a lock-free shared byte: a worker killed mid-write cannot block us
        self.started = time.monotonic()

    def is_ready(self) -> bool:
        return self.proc.is_alive() and bool(self.ready.value)


class WorkerPool:
    """Worker processes that segment queued jobs, supervised: a dead worker is restarted.

    Parameters
    ----------
    store
        The job store (its database file is opened again in each worker).
    data_dir
        Root of every job's relative paths.
    model_dir
        nnU-Net model folder, loaded once per worker.
    workers
        Number of processes (each holds a model in memory).
    threads
        Torch CPU threads per worker; default: CPU count divided by workers.
    min_island_ml
        Structure pieces under this volume (ml) are dropped; 0 keeps every voxel the model labels.
    crash_limit
        A job whose worker died this many times is failed instead of queued again.
    region_check
        Fail jobs whose series does not show the model's body region (``[selection] region_check``).
    write_preview
        Write the contour preview ``preview.png`` beside each RTSTRUCT (``[node] write_preview``).
    chunk_slices
        Series of more slices are predicted in z-chunks of about this many (``[node] chunk_slices``).
    engine
        What runs the network (``[node] engine``, :mod:`rtseg.model.engines`).
    shift_ensemble
        Vote the labels of eight copies of each CT shifted by about half a model
        voxel (``[node] shift_ensemble``, :mod:`rtseg.model.shifts`).
    """

    @classmethod
    def from_settings(
        cls, settings: Settings, store: JobStore, data_dir: Path, model_dir: Path
    ) -> WorkerPool:
        """The pool ``[node]`` and ``[selection]`` describe (``rtseg serve`` and ``rtseg http``).

        Raises :class:`ModelError` when ``[node] engine`` names a runtime that is
        not installed: the node stops at startup, not in every worker.
        """
        from rtseg.model.engines import require_runtime

        n = settings.node
        require_runtime(n.engine)
        return cls(
            store,
            data_dir,
            model_dir,
            n.workers,
            n.inference_threads,
            n.min_island_ml,
            n.worker_crash_limit,
            region_check=settings.selection.region_check,
            write_preview=n.write_preview,
            chunk_slices=n.chunk_slices,
            engine=n.engine,
            shift_ensemble=n.shift_ensemble,
        )

    def __init__(
        self,
        store: JobStore,
        data_dir: Path,
        model_dir: Path,
        workers: int = 1,
        threads: int | None = None,
        min_island_ml: float = MIN_ISLAND_ML,
        crash_limit: int = MAX_ATTEMPTS,
        *,
        region_check: bool = True,
        write_preview: bool = False,
        chunk_slices: int = CHUNK_SLICES,
        engine: str = "auto",
        shift_ensemble: bool = False,
    ) -> None:
        self.store = store
        threads = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
        level = logging.getLogger().getEffectiveLevel()
        self.config = WorkerConfig(
            store.db_path,
            Path(data_dir),
            Path(model_dir),
            threads,
            level,
            min_island_ml,
            chunk_slices,
            region_check,
            write_preview,
            engine,
            shift_ensemble,
        )
        self.workers = workers
        self.crash_limit = crash_limit
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        # workers log through this process's handlers: one writer of the log file, one formatter
        self._log_queue: Any = self._ctx.Queue()
        self._log_listener: Any = None
        self._stopping = threading.Event()
        self._slots: list[_Slot] = []
        self._supervisor: threading.Thread | None = None

    def start(self) -> list[Job]:
        """Requeue jobs of dead workers, start the workers and their supervisor; returns the requeued."""
        recovered = self.store.recover()
        for job in recovered:
            log.warning("job %s was interrupted while segmenting: queued again", job.id)
        remove_left_behind(self.config.data_dir / SCRATCH)  # no worker runs yet: all of it is left over
        self._stopping.clear()
        if self._log_listener is None:
            self._log_listener = listen_for_logs(self._log_queue)
        self._slots = [self._spawn(f"rtseg-worker-{n}") for n in range(self.workers)]
        self._supervisor = threading.Thread(target=self._supervise_loop, name="rtseg-workers", daemon=True)
        self._supervisor.start()
        return recovered

    def _spawn(self, name: str) -> _Slot:
        ready = self._ctx.RawValue("b", 0)
        proc = self._ctx.Process(
            target=worker_main,
            args=(self.config, os.getpid(), ready, self._log_queue),
            name=name,
            daemon=True,
        )
        proc.start()
        return _Slot(name, proc, ready)

    def alive(self) -> int:
        return sum(slot.proc.is_alive() for slot in self._slots)

    def status(self) -> PoolStatus:
        missing = tuple(slot.name for slot in self._slots if not slot.is_ready())
        if not self._slots:
            missing = tuple(f"rtseg-worker-{n}" for n in range(self.workers))
        return PoolStatus(self.workers, self.workers - len(missing), missing, self.restarts)

    def _supervise_loop(self) -> None:
        while not self._stopping.wait(SUPERVISE_S):
            try:
                self.supervise()
            except Exception:  # noqa: BLE001 - the supervisor must outlive a failed check
                log.exception("worker supervision failed")

    def supervise(self, min_interval_s: float = RESTART_BACKOFF_S) -> int:
        """Restart dead workers and requeue (or fail) the jobs they were running; returns restarts.

        A worker that died before it loaded its model (e.g. a bad model folder) is
        restarted at most every ``min_interval_s``; one that died on a job at once.
        """
        restarted = 0
        for i, slot in enumerate(self._slots):
            if slot.proc.is_alive() or self._stopping.is_set():
                continue
            if slot.proc.exitcode == 0 and slot.ready.value:
                continue  # it was told to stop (SIGTERM to the process group): the node is stopping
            self._release_jobs(slot)
            if not slot.ready.value and time.monotonic() - slot.started < min_interval_s:
                continue
            log.error("worker %s stopped (exit code %s): restarting it", slot.name, slot.proc.exitcode)
            self._slots[i] = self._spawn(slot.name)
            self.restarts += 1
            restarted += 1
        return restarted

    def _release_jobs(self, slot: _Slot) -> None:
        pid = slot.proc.pid
        if pid is not None:
            remove_left_behind(self.config.data_dir / SCRATCH, pid)
        for job in self.store.recover_worker(pid, self.crash_limit) if pid is not None else []:
            if job.state == JobState.FAILED:
                log.error("job %s failed: %s", job.id, job.error)
            else:
                log.warning("job %s: its worker %s died: queued again", job.id, slot.name)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask workers to stop (SIGTERM: after the current job); kill those still busy after ``timeout``.

        A signal, not a shared event: a worker that died waiting on a multiprocessing
        Event would make ``Event.set()`` block forever (e.g. after a SIGTERM to the
        whole process group, as systemd sends). A killed job is requeued at the next start.
        """
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        procs = [slot.proc for slot in self._slots]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker %s still busy after %.0f s: killing it", proc.name, timeout)
                proc.kill()
                proc.join()
        self._slots.clear()
        if self._log_listener is not None:
            self._log_listener.stop()  # writes what the workers sent before they stopped
            self._log_listener = None


def worker_main(config: WorkerConfig, parent_pid: int, ready: Any = None, log_queue: Any = None) -> None:
    """Entry point of a worker process: claim and run jobs until SIGTERM or the parent is gone.

    ``ready`` (a shared byte) is set once the model is loaded: the pool reports the worker ready.
    ``log_queue`` takes every log record to the pool's process (stderr, the log file).
    """
    if log_queue is not None:
        forward_logs(log_queue, config.log_level)
    else:
        configure_logging(config.log_level)
    stopping: list[int] = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))  # finish the job first
    _limit_resources(config.threads)
    from rtseg.model.registry import registry_of

    store = JobStore(config.db_path)
    registry = registry_of(config.model_dir)  # None: a fixed model folder, never swapped
    generation = registry.generation() if registry is not None else 0  # read before loading
    runner = load_runner(store, config)
    if runner is None:
        return
    if ready is not None:
        ready.value = 1
    while not stopping and os.getppid() == parent_pid:  # an orphan stops: a new node will recover
        if registry is not None and registry.generation() != generation:
            # hot swap between jobs: every job runs (and is recorded) with one model
            generation = registry.generation()
            runner = load_runner(store, config) or runner
        job = store.claim_next(worker=os.getpid())
        if job is None:
            time.sleep(POLL_S)
            continue
        runner.run(job)
    store.close()


def load_runner(store: JobStore, config: WorkerConfig) -> JobRunner | None:
    """A runner with the model of ``config.model_dir`` (a registry's ``current`` link is pinned first)."""
    from rtseg.model.segmenter import NnunetSegmenter
    from rtseg.pipeline import model_identity

    model_dir = config.model_dir.resolve()
    try:
        segmenter = NnunetSegmenter(
            model_dir,
            threads=config.threads,
            min_island_ml=config.min_island_ml,
            chunk_slices=config.chunk_slices,
            runtime=config.engine,
            shift_ensemble=config.shift_ensemble,
            export_cache=config.data_dir / ENGINE_CACHE,
            scratch=config.data_dir / SCRATCH,
        )
    except RtsegError as exc:
        log.error("worker cannot load the model: %s", exc)
        return None
    identity = model_identity(segmenter.manifest, model_dir)
    log.info("worker: model %s %s loaded", identity.name, identity.version)
    return JobRunner(
        store,
        config.data_dir,
        segmenter,
        identity,
        region_check=config.region_check,
        write_preview=config.write_preview,
    )


def _limit_resources(threads: int | None) -> None:
    try:
        os.nice(WORKER_NICE)
    except OSError as exc:
        log.warning("cannot lower the worker's priority (%s)", exc)
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(threads)
        os.environ["nnUNet_def_n_proc"] = str(threads)


class _Recorder:
    """A Segmenter proxy that keeps the last volume and labels (for ``write_labels``)."""

    def __init__(self, segmenter: Any) -> None:
        self._segmenter = segmenter
        self.manifest = segmenter.manifest
        self.last: tuple[Any, Any] | None = None

    def segment(self, volume: Any) -> Any:
        segmentation = self._segmenter.segment(volume)
        self.last = (volume, segmentation)
        return segmentation


class JobRunner:
    """Runs one claimed job to its next state (in a worker process, or inline in tests)."""

    def __init__(
        self,
        store: JobStore,
        data_dir: Path,
        segmenter: Any,
        identity: Any,
        *,
        region_check: bool = True,
        write_preview: bool = False,
    ) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.segmenter = segmenter
        self.identity = identity
        self.region_check = region_check
        self.write_preview = write_preview
        self._volume: Any = None  # the CT of the job just segmented, for its preview

    def run(self, job: Job) -> Job:
        if job.attempts > MAX_ATTEMPTS:
            return self._fail(job, f"the worker stopped {job.attempts - 1} times while segmenting this job")
        started = time.perf_counter()
        try:
            if job.meta.get("input_kind") == "nifti":
                files, result = self._run_nifti(job)
            else:
                files, result = self._run_dicom(job)
        except RtsegError as exc:
            return self._fail(job, str(exc), refused=isinstance(exc, InputError))
        except Exception as exc:  # noqa: BLE001 - a bug must fail this job, not kill the worker
            log.exception("job %s: internal error", job.id)
            return self._fail(job, f"internal error ({type(exc).__name__}); see the node log")
        result["files"] = files
        result["model"] = {"name": self.identity.name, "version": self.identity.version}
        target = JobState.SENDING if job.meta.get("destinations") else JobState.DONE
        output = files.get("rtstruct") or files.get("labels")
        done = self.store.transition(
            job.id,
            JobState.RUNNING,
            target,
            output_path=output,
            result=result,
            model_version=self.identity.version,
            error=None,
        )
        log.info("job %s segmented in %.1f s → %s", job.id, time.perf_counter() - started, target)
        self._late_note(done, result.get("note"))
        self._preview(done)
        return done

    def _preview(self, job: Job) -> None:
        """``preview.png`` beside the RTSTRUCT, after delivery is queued: a failure only logs."""
        volume, self._volume = self._volume, None
        rtstruct = (job.result.get("files") or {}).get("rtstruct")
        if not self.write_preview or volume is None or not rtstruct:
            return
        from rtseg.preview import PREVIEW_FILE, flags_by_structure, render_preview

        out = self.data_dir / job_dir(job) / PREVIEW_FILE
        try:
            render_preview(
                volume, self.data_dir / rtstruct, flags_by_structure(job.result["structures"]), out
            )
        except (RtsegError, OSError) as exc:
            log.warning("job %s: no contour preview (%s)", job.id, redact_uids(str(exc)))
        except Exception as exc:  # noqa: BLE001 - the job is done: a bug in the preview must not stop the worker
            log.error("job %s: no contour preview (internal error %s)", job.id, type(exc).__name__)

    def _late_note(self, job: Job, written: str | None) -> None:
        # instances flagged late while this job ran: the node's assembler saw it still running
        note = description_note(job.meta) if job.meta.get("late_instances") else None
        if note and note != written and job.output_path and job.output_path.endswith(".dcm"):
            from rtseg.rtstruct import amend_description

            try:
                amend_description(self.data_dir / job.output_path, note)
            except OSError as exc:
                log.error("job %s: cannot mark its RTSTRUCT incomplete (%s)", job.id, exc.strerror)

    def _fail(self, job: Job, message: str, *, refused: bool = False) -> Job:
        """Fail ``job``; ``refused``: its input is unusable (an InputError), answered as bad input."""
        log.warning("job %s failed: %s", job.id, redact_uids(message))  # the job keeps the whole message
        result = {"input_refused": True} if refused else {}
        return self.store.transition(job.id, JobState.RUNNING, JobState.FAILED, error=message, result=result)

    def _out(self, job: Job, name: str) -> tuple[str, Path]:
        rel = f"{job_dir(job)}/{name}"
        path = self.data_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return rel, path

    def _run_dicom(self, job: Job) -> tuple[dict[str, str], dict[str, Any]]:
        from rtseg.phantom.cohort import write_label_image
        from rtseg.pipeline import clean_segmentation, segment_series

        recorder = _Recorder(self.segmenter)
        rel, out = self._out(job, "rtstruct.dcm")
        folder = self.data_dir / job.input_dir
        # the instances of the completed series only: later ones belong to a newer job
        listed = job.meta.get("instances")
        source = [folder / f"{key}.dcm" for key in listed] if listed else folder
        note = description_note(self.store.get(job.id).meta)  # fresh: late instances may be flagged
        outcome = segment_series(
            source,
            recorder,
            out,
            identity=self.identity,
            rtstruct_uids=rtstruct_uids(job.id),
            note=note,
            region_check=self.region_check,
        )
        files = {"rtstruct": rel}
        want_seg = "seg" in output_formats(job.meta)
        self._volume = recorder.last[0] if recorder.last is not None else None
        if (job.meta.get("write_labels") or want_seg) and recorder.last is not None:
            volume, segmentation = recorder.last
            # the label map and the SEG say what the RTSTRUCT says
            segmentation, _, _ = clean_segmentation(volume, segmentation)
            if job.meta.get("write_labels"):
                labels_rel, labels_path = self._out(job, "labels.nii.gz")
                write_label_image(segmentation.labels, volume.affine, labels_path)
                files["labels"] = labels_rel
            if want_seg:
                files["seg"] = self._write_seg(job, volume, segmentation)
        result = {
            "structures": [asdict(s) for s in outcome.structures],
            "omitted": list(outcome.omitted),
            "dropped": list(outcome.dropped),
            "flags": list(outcome.flags),
            "n_slices": outcome.n_slices,
            "timings": {k: round(v, 3) for k, v in outcome.timings.items()},
        }
        if note:
            result["note"] = note
        if self._volume is not None:
            # what the RTSTRUCT references, as keys: the closed loop pairs an approved structure set
            # with its job without opening every RTSTRUCT the node ever wrote
            info = self._volume.info
            result["references"] = {
                "series": uid_key(info.series_instance_uid),
                "frame": uid_key(info.frame_of_reference_uid),
            }
        return files, result

    def _write_seg(self, job: Job, volume: Any, segmentation: Any) -> str:
        """The job's DICOM SEG (``seg.dcm``), with UIDs fixed per job; its path relative to the data dir."""
        from rtseg.seg import write_seg

        rel, out = self._out(job, "seg.dcm")
        structures = segmentation.manifest.structures
        write_seg(volume, segmentation.labels, structures, self.identity, out, uids=seg_uids(job.id))
        return rel

    def _run_nifti(self, job: Job) -> tuple[dict[str, str], dict[str, Any]]:
        from rtseg.phantom.cohort import write_label_image
        from rtseg.pipeline import clean_segmentation

        t0 = time.perf_counter()
        volume = load_nifti(self.data_dir / job.input_dir / "ct.nii.gz")
        load_s = time.perf_counter() - t0
        # the same drops as the DICOM path: a label map never shows what an RTSTRUCT would not
        segmentation, dropped, notes = clean_segmentation(volume, self.segmenter.segment(volume))
        rel, out = self._out(job, "labels.nii.gz")
        write_label_image(segmentation.labels, volume.affine, out)
        structures = []
        for s in segmentation.manifest.structures:
            count = int((segmentation.labels == s.label).sum())
            if count:
                structures.append({"name": s.name, "volume_ml": round(count * volume.voxel_volume_ml, 2)})
        timings = {"load_s": load_s, "segment_s": segmentation.seconds, "total_s": time.perf_counter() - t0}
        result = {
            "structures": structures,
            "dropped": [f"{name}: {reason}" for name, reason in dropped.items()],
            "flags": [f"{name}: {note}" for name, said in notes.items() for note in said],
            "n_slices": volume.shape[0],
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        return {"labels": rel}, result


def load_nifti(path: Path) -> Any:
    """A CT NIfTI as a :class:`~rtseg.volume.CTVolume` (HU, LPS affine; no DICOM identity)."""
    import numpy as np
    import SimpleITK as sitk

    from rtseg.volume import CTVolume, SeriesInfo

    if not path.is_file():
        raise InputError("no ct.nii.gz in the job's input", source=path.name)
    try:
        image: Any = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read the NIfTI file ({str(exc).strip().splitlines()[-1]})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the NIfTI image must be a 3-D scalar volume", source=path.name)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    info = SeriesInfo("", "", "", "", (), "HFS", modality="CT")
    return CTVolume(hu, affine, info)
