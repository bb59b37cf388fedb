"""Segment a CT volume with a model folder: the :class:`Segmenter` protocol and its nnU-Net implementation."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from rtseg.body import apply_body_outline, body_mask
from rtseg.errors import InputError, ModelError
from rtseg.model.checkpoints import load_checkpoint
from rtseg.model.chunked import CHUNK_SLICES
from rtseg.model.inference import STREAM_MB, predict_labels, suppress_islands
from rtseg.model.manifest import CANONICAL_ORIENTATION, ModelManifest, load_manifest, read_json
from rtseg.model.shifts import predict_shift_ensemble
from rtseg.structures import EXTERNAL, MIN_ISLAND_ML
from rtseg.volume import CTVolume, Orientation

if TYPE_CHECKING:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

log = logging.getLogger(__name__)
ENGINES = ("rtseg", "nnunet")


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Label map of one volume: ``labels`` is uint8 ``[k, j, i]`` on the volume's own grid."""

    labels: npt.NDArray[np.uint8]
    manifest: ModelManifest
    seconds: float
    # pieces of a structure under this volume are specks (the segmenter's min_island_ml); the
    # segmenter drops them on its own grid, :func:`rtseg.pipeline.clean_segmentation` on this one
    min_piece_ml: float = MIN_ISLAND_ML


class Segmenter(Protocol):
    """Anything that turns a CT volume into a label map of the manifest's structures."""

    manifest: ModelManifest

    def segment(self, volume: CTVolume) -> Segmentation: ...


class NnunetSegmenter:
    """An nnU-Net v2 model folder loaded once, predicting one volume at a time.

    Parameters
    ----------
    model_dir
        A results folder (``dataset.json``, ``plans.json``, ``fold_*/checkpoint``),
        with or without ``rtseg-model.json``.
    device
        ``"cpu"``, ``"cuda"`` or a ``torch.device``; default CUDA when available.
    threads
        Torch CPU threads (process-wide, ``torch.set_num_threads``); default unchanged.
    tile_step_size, use_mirroring
        Sliding-window overlap and test-time mirroring (mirroring costs up to 8×).
    engine
        ``"rtseg"`` (:mod:`rtseg.model.inference`: all torch threads, argmax at
        the model's spacing with only boundary voxels interpolated, structure
        islands under ``MIN_ISLAND_ML`` dropped) or ``"nnunet"``
        (``predict_single_npy_array``: all logits at full resolution at once,
        nnU-Net's labels unchanged).
    min_island_ml
        With the rtseg engine: pieces of a structure smaller than this (ml, on
        the model's grid) give way to the next most likely class; 0 keeps them.
        With any engine the result carries it (``Segmentation.min_piece_ml``):
        :func:`rtseg.pipeline.clean_segmentation` drops smaller pieces on the CT's grid.
    folds
        Subset of the manifest's folds to ensemble; default all of them.
    chunk_slices
        With the rtseg engine: a series of more slices than this is predicted
        in z-chunks of about this many (:mod:`rtseg.model.chunked`: same labels,
        memory bounded by the chunk); 0 never chunks.
    body_outline
        :meth:`segment` clips the labels to the patient's body found in the CT
        numbers and labels the rest of the body External
        (:mod:`rtseg.body`): no couch, mattress or mask in the External.
    runtime
        What runs the network (``[node] engine``): ``"torch"``, ``"onnxruntime"``,
        ``"openvino"`` (the weights exported to ONNX, :mod:`rtseg.model.runtimes`)
        or ``"auto"`` (torch on CUDA, else the runtime measured fastest on a CPU).
    export_cache
        Folder that keeps the exported network between loads (the node's
        ``<data_dir>/engines``); None exports it anew at every load.
    stream_mb, scratch
        With the rtseg engine on the CPU: model-grid logits of more than
        ``stream_mb`` MB (None: never) are streamed to a file under ``scratch``
        (the node's ``<data_dir>/scratch``; None: the system's temporary
        folder) while the sliding window runs (:mod:`rtseg.model.streamed`:
        same labels, memory bounded by one patch's depth of logits).
    shift_ensemble
        :meth:`segment` votes the labels of eight copies of the CT shifted by
        about half a model voxel (:mod:`rtseg.model.shifts`; ``[node]
        shift_ensemble``): eight predictions, not for a series predicted in z-chunks.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str | torch.device | None = None,
        threads: int | None = None,
        tile_step_size: float = 0.5,
        use_mirroring: bool = False,
        folds: tuple[str, ...] | None = None,
        engine: str = "rtseg",
        min_island_ml: float = MIN_ISLAND_ML,
        body_outline: bool = True,
        chunk_slices: int = CHUNK_SLICES,
        runtime: str = "torch",
        export_cache: Path | None = None,
        stream_mb: float | None = STREAM_MB,
        scratch: Path | None = None,
        shift_ensemble: bool = False,
    ) -> None:
        if engine not in ENGINES:
            raise ModelError(f"unknown inference engine {engine!r}: choose one of {', '.join(ENGINES)}")
        self.engine = engine
        self.min_island_ml = min_island_ml
        self.chunk_slices = chunk_slices
        self.stream_mb = stream_mb
        self.scratch = scratch
        self.body_outline = body_outline
        self.shift_ensemble = shift_ensemble
        self.model_dir = Path(model_dir)
        manifest = load_manifest(self.model_dir)
        if folds is not None:
            manifest = replace(manifest, folds=tuple(str(f) for f in folds))
        if manifest.orientation != CANONICAL_ORIENTATION:
            raise ModelError(f"unsupported model orientation {manifest.orientation!r}", source=str(model_dir))
        self.manifest = manifest
        _check_model_files(self.model_dir, manifest)
        _prepare_nnunet_environment()
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError("CUDA was requested but this torch sees no CUDA device", source=str(model_dir))
        self.loaded_via = ""  # "trainer" (nnU-Net's own loader) or "plans" (built from plans.json)
        from rtseg.model.engines import resolve_runtime

        self.runtime = resolve_runtime(runtime, self.device.type)
        self._predictor = self._load(tile_step_size, use_mirroring)
        if self.runtime != "torch":
            self._predictor.network = self._exported_network(export_cache)
        self._lock = threading.Lock()  # one prediction at a time: the predictor holds state

    def segment(self, volume: CTVolume) -> Segmentation:
        """Labels of ``volume`` on its own ``[k, j, i]`` grid, whatever the patient position."""
        start = time.perf_counter()
        orientation = Orientation.from_affine(volume.affine)
        canonical = orientation.to_canonical(np.asarray(volume.hu))
        spacing = orientation.canonical_spacing(volume.spacing)
        if not self.body_outline:
            labels = self._labels(canonical, spacing)
        elif self._long_series(canonical):  # one after the other: each holds whole-series arrays
            labels = outline_body(self._labels(canonical, spacing), canonical, spacing, self.manifest)
        else:
            # The outline needs only the CT: it is drawn in a second thread while the model predicts
            # (most of both is numpy and torch work outside the GIL; 1.1-1.6 s of a 512² × 200 job).
            with ThreadPoolExecutor(1, thread_name_prefix="rtseg-outline") as pool:
                body = pool.submit(body_mask, canonical, spacing)
                labels = self._labels(canonical, spacing)
                labels = apply_body_outline(
                    labels, body.result(), external_label(self.manifest), in_place=True
                )
        return Segmentation(
            orientation.from_canonical(labels), self.manifest, time.perf_counter() - start, self.min_island_ml
        )

    def _labels(
        self, canonical: npt.NDArray[Any], spacing: tuple[float, float, float]
    ) -> npt.NDArray[np.uint8]:
        """The model's labels of a canonical array: one prediction, or the shift ensemble's vote."""
        if not self.shift_ensemble:
            return self.predict_canonical(canonical, spacing)
        if self._long_series(canonical):  # eight label maps of a long series: not within its memory bound
            log.info("shift ensemble: not for a series predicted in z-chunks; one prediction")
            return self.predict_canonical(canonical, spacing)
        model_spacing = [float(s) for s in self._predictor.configuration_manager.spacing]
        return predict_shift_ensemble(self.predict_canonical, canonical, spacing, model_spacing)

    def _long_series(self, array_zyx: npt.NDArray[Any]) -> bool:
        """Whether rtseg's path predicts this series in z-chunks, to bound its memory."""
        return self.engine == "rtseg" and 0 < self.chunk_slices < array_zyx.shape[0]

    def predict_canonical(
        self, array_zyx: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]
    ) -> npt.NDArray[np.uint8]:
        """Labels for a canonical ``[z, y, x]`` HU array with spacing ``(z, y, x)`` in mm."""
        # rtseg's path takes the stored dtype (int16) and converts only what it crops (a long series: a
        # slab at a time); nnU-Net's own path gets float32
        image = _model_input(array_zyx, as_float=self.engine != "rtseg")
        with self._lock:
            if self.engine == "rtseg":
                return predict_labels(
                    self._predictor,
                    image,
                    spacing_zyx,
                    self.min_island_ml,
                    self.chunk_slices,
                    stream_mb=self.stream_mb,
                    scratch=self.scratch,
                ).labels
            labels = self._predictor.predict_single_npy_array(
                image, {"spacing": [float(s) for s in spacing_zyx]}, None, None, False
            )
        return np.asarray(labels).astype(np.uint8, copy=False)

    def probabilities_canonical(
        self, array_zyx: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]
    ) -> npt.NDArray[np.float32]:
        """Class probabilities ``[class, z, y, x]`` of a canonical HU array (class index = label id)."""
        image = _model_input(array_zyx)
        with self._lock:
            _, probabilities = self._predictor.predict_single_npy_array(
                image, {"spacing": [float(s) for s in spacing_zyx]}, None, None, True
            )
        return np.asarray(probabilities, dtype=np.float32)

    def _load(self, tile_step_size: float, use_mirroring: bool) -> nnUNetPredictor:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        for fold in self.manifest.folds:  # plain data only, before nnU-Net unpickles them whole
            load_checkpoint(self.model_dir / f"fold_{fold}" / self.manifest.checkpoint)
        chatter = io.StringIO()  # on CPU nnU-Net prints a CUDA notice to stdout, whatever it is given
        with contextlib.redirect_stdout(chatter):
            predictor = nnUNetPredictor(
                tile_step_size=tile_step_size,
                use_gaussian=True,
                use_mirroring=use_mirroring,
                perform_everything_on_device=self.device.type == "cuda",
                device=self.device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
        if chatter.getvalue().strip():
            log.debug("nnU-Net: %s", chatter.getvalue().strip())
        try:
            predictor.initialize_from_trained_model_folder(
                str(self.model_dir), use_folds=self.manifest.folds, checkpoint_name=self.manifest.checkpoint
            )
            self.loaded_via = "trainer"
        except (RuntimeError, ImportError, AttributeError, AssertionError, KeyError) as exc:
            # nnU-Net finds the checkpoint's trainer class by name; an unknown or
            # unimportable one (e.g. timm/torchvision on CPU torch) or a checkpoint
            # without trainer_name/init_args ends here.
            log.warning("nnU-Net's loader failed (%s); building the network from plans.json", exc)
            _initialize_from_plans(predictor, self.model_dir, self.manifest)
            self.loaded_via = "plans"
        except (ValueError, TypeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise ModelError(f"cannot load the model ({exc!r})", source=str(self.model_dir)) from exc
        log.info(
            "model %s %s loaded via %s on %s",
            self.manifest.name,
            self.manifest.version,
            self.loaded_via,
            self.device,
        )
        return predictor

    def _exported_network(self, export_cache: Path | None) -> torch.nn.Module:
        """The predictor's network with every fold exported to :attr:`runtime` (cached when asked)."""
        import torch

        from rtseg.model.manifest import model_hash
        from rtseg.model.runtimes import ExportCache, exported_network

        predictor = self._predictor
        channels = len(predictor.dataset_json.get("channel_names") or {"0": "CT"})
        shape = (1, channels, *(int(s) for s in predictor.configuration_manager.patch_size))
        cache = None
        if export_cache is not None:
            digest = model_hash(
                self.model_dir, folds=self.manifest.folds, checkpoint=self.manifest.checkpoint, short=False
            )
            cache = ExportCache(export_cache, digest, shape)
        network = getattr(predictor.network, "_orig_mod", predictor.network)
        started = time.perf_counter()
        exported = exported_network(
            network,
            predictor.list_of_parameters,
            self.runtime,
            input_shape=shape,
            threads=torch.get_num_threads(),
            cache=cache,
        )
        log.info("network runs on %s (%.1f s to prepare)", self.runtime, time.perf_counter() - started)
        return exported


class EnsembleSegmenter:
    """Several model folders, each with its own plans, averaged on their class probabilities.

    Unlike the folds of one model folder (which share plans and ensemble inside
    nnU-Net), the members may differ in normalisation and spacing; they must
    predict the same label table. The first member's manifest names the ensemble.
    """

    def __init__(self, members: list[NnunetSegmenter], name: str) -> None:
        if not members:
            raise ModelError("an ensemble needs at least one model")
        labels = members[0].manifest.labels()
        if any(m.manifest.labels() != labels for m in members):
            raise ModelError("ensemble members predict different label tables")
        if list(labels.values()) != list(range(len(labels))):
            raise ModelError("ensembling needs consecutive label ids (class index = label id)")
        self.members = members
        self.manifest = replace(members[0].manifest, name=name)

    def segment(self, volume: CTVolume) -> Segmentation:
        start = time.perf_counter()
        orientation = Orientation.from_affine(volume.affine)
        canonical = orientation.to_canonical(np.asarray(volume.hu))
        spacing = orientation.canonical_spacing(volume.spacing)
        mean = self.members[0].probabilities_canonical(canonical, spacing)
        for member in self.members[1:]:
            mean += member.probabilities_canonical(canonical, spacing)
        import torch

        external = frozenset(s.label for s in self.manifest.structures if s.name == EXTERNAL)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        min_ml = self.members[0].min_island_ml
        scores = suppress_islands(torch.from_numpy(mean), voxel_ml, min_ml, keep=external)
        labels = scores.argmax(dim=0).numpy().astype(np.uint8)
        if self.members[0].body_outline:
            labels = outline_body(labels, canonical, spacing, self.manifest)
        return Segmentation(
            orientation.from_canonical(labels), self.manifest, time.perf_counter() - start, min_ml
        )


def outline_body(
    labels: npt.NDArray[np.uint8],
    hu_zyx: npt.NDArray[Any],
    spacing_zyx: tuple[float, float, float],
    manifest: ModelManifest,
) -> npt.NDArray[np.uint8]:
    """Canonical labels clipped to the body in ``hu_zyx``, the rest of the body the model's External.

    The External is the label named ``External`` (or ``BODY``, as a foreign model
    may call it); a model without one has its labels clipped only. ``labels`` is
    changed in place (a long series holds one label map, not two).
    """
    return apply_body_outline(labels, body_mask(hu_zyx, spacing_zyx), external_label(manifest), in_place=True)


def external_label(manifest: ModelManifest) -> int | None:
    """The label named ``External`` (or ``BODY``, as a foreign model may call it); None if none is."""
    names = {EXTERNAL.lower(), "body"}
    return next((s.label for s in manifest.structures if s.name.lower() in names), None)


def _model_input(array_zyx: npt.NDArray[Any], as_float: bool = True) -> npt.NDArray[Any]:
    if array_zyx.ndim != 3 or min(array_zyx.shape) < 1:
        raise InputError(f"expected a 3-D [z, y, x] array, got shape {array_zyx.shape}")
    return (np.asarray(array_zyx, dtype=np.float32) if as_float else np.asarray(array_zyx))[None]


def _initialize_from_plans(predictor: nnUNetPredictor, model_dir: Path, manifest: ModelManifest) -> None:
    """Build the stock network from ``plans.json`` and load the fold weights into ``predictor``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from rtseg.model.network import plain_state_dict, plans_network

    dataset_json = read_json(model_dir / "dataset.json")
    checkpoints = [load_checkpoint(model_dir / f"fold_{f}" / manifest.checkpoint) for f in manifest.folds]
    init_args = checkpoints[0].get("init_args") or {}
    configuration = init_args.get("configuration", manifest.configuration)
    try:
        plans_manager = PlansManager(read_json(model_dir / "plans.json"))
        configuration_manager = plans_manager.get_configuration(configuration)
        network = plans_network(plans_manager, configuration, dataset_json, deep_supervision=False)
        parameters = [plain_state_dict(c["network_weights"]) for c in checkpoints]
        network.load_state_dict(parameters[0])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, ImportError) as exc:
        raise ModelError(
            f"cannot build the network from plans.json and load its weights ({exc!r}); a trainer with"
            f" its own architecture ({checkpoints[0].get('trainer_name')}) needs that trainer installed",
            source=str(model_dir),
        ) from exc
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        parameters,
        dataset_json,
        "nnUNetTrainer",
        checkpoints[0].get("inference_allowed_mirroring_axes"),
    )


def _check_model_files(model_dir: Path, manifest: ModelManifest) -> None:
    for fold in manifest.folds:
        path = model_dir / f"fold_{fold}" / manifest.checkpoint
        if not path.is_file():
            raise ModelError(f"missing checkpoint fold_{fold}/{manifest.checkpoint}", source=str(model_dir))
    plans = read_json(model_dir / "plans.json")
    if manifest.configuration not in plans.get("configurations", {}):
        raise ModelError(f"plans.json has no configuration {manifest.configuration!r}", source=str(model_dir))
    dataset = read_json(model_dir / "dataset.json")
    channels = dataset.get("channel_names") or dataset.get("modality")  # "modality": nnU-Net v1 name
    if not isinstance(channels, dict) or len(channels) != 1:
        count = len(channels) if isinstance(channels, dict) else "an unknown number of"
        raise ModelError(
            f"the model expects {count} input channels; rtseg gives it one (CT)", source=str(model_dir)
        )


def _prepare_nnunet_environment() -> None:
    """Give nnU-Net harmless settings before it is imported here (it reads them at import).

    Prediction needs none of nnU-Net's folders; values a user has set win.
    """
    unused = os.path.join(os.path.expanduser("~"), ".cache", "rtseg", "nnunet-unused")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(name, unused)
    os.environ.setdefault("nnUNet_n_proc_DA", "1")  # else nnU-Net shells out to `hostname` at import
    os.environ.setdefault("nnUNet_def_n_proc", "1")
