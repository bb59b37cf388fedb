"""rtseg.model: a real tiny nnU-Net trained on CPU, exported, and loaded every way a model folder comes."""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk

from rtseg.errors import InputError, ModelError
from rtseg.model.children import EpochProgress, nnunet_dirs
from rtseg.model.cpu import PLANS_IDENTIFIER, CpuConfig, cpu_plans, network_topology
from rtseg.model.dataset import write_raw_dataset
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    default_provenance,
    load_manifest,
    model_hash,
    structures_from_dataset_json,
)
from rtseg.model.rounds import preprocess_like_model
from rtseg.model.segmenter import NnunetSegmenter, Segmentation, outline_body
from rtseg.model.training import export_model, plan_and_preprocess, train
from rtseg.phantom.dicom_io import SeriesSpec, write_ct_series
from rtseg.volume import Orientation

SPACING = (2.0, 1.5, 1.5)
LABELS = {"background": 0, "Bright": 1, "Dark": 2}
DATASET_ID = 901
TINY = CpuConfig(
    target_spacing_zyx=SPACING,
    patch_size_zyx=(32, 48, 48),
    n_stages=3,
    base_features=4,
    max_features=16,
    epochs=2,
    iterations_per_epoch=4,
    val_iterations_per_epoch=1,
    da_workers=1,
    preprocess_workers=1,
)
# the module's model trains with the options the default recipe uses (federation tests cover SGD)
TINY_TRAIN = replace(TINY, optimizer="adamw", learning_rate=1e-3, rotation_deg=10.0)


def synthetic_case(seed: int, shape: tuple[int, int, int] = (32, 48, 48)) -> tuple[npt.NDArray[Any], ...]:
    """Noisy water with a bright (label 1) and a dark (label 2) ellipsoid at random places."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    hu = rng.normal(0.0, 20.0, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    for label, offset in ((1, 300.0), (2, -300.0)):
        centre = [rng.uniform(10, s - 10) for s in shape]
        radii = [rng.uniform(4, 7), rng.uniform(6, 10), rng.uniform(6, 10)]
        inside = sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii, strict=True)) <= 1
        inside &= labels == 0
        hu[inside] += offset
        labels[inside] = label
    return hu, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Raw dataset → plan/preprocess → 2 short epochs → exported model folder (once per module)."""
    work = tmp_path_factory.mktemp("nnunet-work")
    cases = [(f"case{i:02d}", *_split(synthetic_case(i))) for i in range(6)]
    raw = write_raw_dataset(nnunet_dirs(work).raw, DATASET_ID, "Synth", cases, LABELS)
    plan_and_preprocess(work, DATASET_ID, TINY)
    epochs: list[EpochProgress] = []
    results = train(work, DATASET_ID, TINY_TRAIN, progress=epochs.append)
    manifest = ModelManifest(
        name="synthetic-ellipsoids",
        version="0.0.1",
        structures=structures_from_dataset_json(json.loads((results / "dataset.json").read_text())),
        provenance=default_provenance(training_data={"cases": 6}, seeds={"training": TINY.seed}),
    )
    model = export_model(results, tmp_path_factory.mktemp("model") / "synth", manifest)
    return {"work": work, "raw": raw, "results": results, "model": model, "epochs": epochs}


def _split(case: tuple[npt.NDArray[Any], ...]) -> tuple[Any, ...]:
    hu, labels = case
    return hu, SPACING, labels


def _copy_model(model: Path, target: Path, *, manifest: bool = True) -> Path:
    shutil.copytree(model, target)
    if not manifest:
        (target / MANIFEST_NAME).unlink()
    return target


def _model_imports() -> dict[str, set[str]]:
    """rtseg.model's modules and the rtseg.model modules each one names: imports anywhere in the
    file (inside functions too) and module names in strings (``python -m rtseg.model._run``)."""
    folder = Path(__file__).resolve().parents[3] / "rtseg" / "model"
    modules = {f"rtseg.model.{f.stem}": f for f in folder.glob("*.py") if f.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                named.add(node.module)
                named.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                named.add(node.value)
        graph[name] = (named & modules.keys()) - {name}
    return graph


def test_model_modules_import_no_cycle() -> None:
    """The trainer, the child entry point and the steps that start it import one way only."""
    graph = _model_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False

    cycles = sorted(m for m in graph if reaches(m, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"
    assert "rtseg.model._run" in graph["rtseg.model.children"]  # the check sees the child's start


def test_raw_dataset_is_nnunet_layout(trained: dict[str, Any]) -> None:
    raw = trained["raw"]
    doc = json.loads((raw / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "CT"} and doc["labels"] == LABELS
    assert doc["numTraining"] == 6 and doc["file_ending"] == ".nii.gz"
    image = sitk.ReadImage(str(raw / "imagesTr" / "case03_0000.nii.gz"))
    assert image.GetSpacing() == tuple(reversed(SPACING))
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    hu, labels = synthetic_case(3)
    assert np.allclose(sitk.GetArrayFromImage(image), hu)
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / "case03.nii.gz"))), labels
    )


def test_raw_dataset_refuses_inconsistent_labels(tmp_path: Path) -> None:
    hu, labels = synthetic_case(0)
    with pytest.raises(InputError, match="not in the label table"):
        write_raw_dataset(tmp_path, 5, "Bad", [("a", hu, SPACING, labels)], {"background": 0, "Bright": 1})
    good = write_raw_dataset(tmp_path, 5, "Good", [("a", hu.astype(np.int16), SPACING, labels)], LABELS)
    written = sitk.ReadImage(str(good / "imagesTr" / "a_0000.nii.gz"))
    assert written.GetPixelID() == sitk.sitkInt16  # integer HU are not inflated to float32
    with pytest.raises(InputError, match="differ"):
        other = {"background": 0, "Dark": 1, "Bright": 2}
        write_raw_dataset(tmp_path, 5, "Good", [("b", hu, SPACING, labels)], other)


def test_topology_handles_anisotropic_ct() -> None:
    strides, kernels = network_topology((3.0, 0.8, 0.8), (48, 96, 96), 4)
    assert strides[0] == [1, 1, 1] and len(strides) == len(kernels) == 4
    assert strides[1] == [1, 2, 2] and kernels[0] == [1, 3, 3]  # z is coarse until x/y catch up
    assert kernels[-1] == [3, 3, 3]
    with pytest.raises(InputError):
        network_topology((1.0, 1.0, 1.0), (4, 4, 4), 4)


def test_plans_rewritten_for_cpu(trained: dict[str, Any]) -> None:
    plans = json.loads((trained["model"] / "plans.json").read_text())
    assert list(plans["configurations"]) == ["3d_fullres"]
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [32, 48, 48] and cfg["spacing"] == list(SPACING)
    arch = cfg["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 3 and arch["features_per_stage"] == [4, 8, 16]
    assert cpu_plans(plans, TINY) == plans  # idempotent


def test_training_reports_every_epoch(trained: dict[str, Any]) -> None:
    epochs = trained["epochs"]
    assert [e.epoch for e in epochs] == [0, 1]
    assert all(np.isfinite(e.train_loss) and len(e.pseudo_dice) == 2 for e in epochs)


def test_training_uses_configured_optimizer_and_rotation(trained: dict[str, Any]) -> None:
    import torch

    checkpoint = torch.load(
        trained["results"] / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    group = checkpoint["optimizer_state"]["param_groups"][0]
    assert group["amsgrad"] is True and "momentum" not in group  # AdamW, not nnU-Net's SGD
    logs = "".join(p.read_text() for p in (trained["results"] / "fold_all").glob("training_log_*.txt"))
    assert "rotation for augmentation: ±10.0°" in logs


def test_unknown_optimizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="optimizer must be one of"):
        plan_and_preprocess(tmp_path, 998, replace(TINY, optimizer="lion"))
    with pytest.raises(InputError, match="rotation_deg"):
        plan_and_preprocess(tmp_path, 998, replace(TINY, rotation_deg=270.0))


def test_exported_checkpoint_is_stock_and_small(trained: dict[str, Any]) -> None:
    import torch

    path = trained["model"] / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    # trained without mirroring (it would swap Kidney_L and Kidney_R), so never mirrored at inference
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    assert "optimizer_state" not in checkpoint and "grad_scaler_state" not in checkpoint
    original = trained["results"] / "fold_all" / "checkpoint_final.pth"
    assert path.stat().st_size < original.stat().st_size
    manifest = load_manifest(trained["model"])
    assert manifest.name == "synthetic-ellipsoids" and manifest.folds == ("all",)
    assert [(s.name, s.label) for s in manifest.structures] == [("Bright", 1), ("Dark", 2)]


def test_stock_nnunet_predictor_loads_export(trained: dict[str, Any]) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained["model"]), use_folds=("all",))
    assert predictor.trainer_name == "nnUNetTrainer"


@pytest.fixture(scope="module")
def segmenter(trained: dict[str, Any]) -> NnunetSegmenter:
    return NnunetSegmenter(trained["model"], device="cpu", threads=2)


@pytest.fixture(scope="module")
def probe() -> npt.NDArray[Any]:
    return synthetic_case(100, shape=(30, 52, 44))[0]


def test_segment_ct_volume_in_any_position(
    segmenter: NnunetSegmenter, probe: npt.NDArray[Any], tmp_path: Path
) -> None:
    volume = write_ct_series(
        np.round(probe).astype(np.int16), SPACING, (-30.0, -40.0, 100.0), tmp_path, SeriesSpec("model", "FFP")
    )
    result = segmenter.segment(volume)
    assert isinstance(result, Segmentation) and result.manifest is segmenter.manifest
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    orientation = Orientation.from_affine(volume.affine)
    hu = orientation.to_canonical(volume.hu)
    canonical = outline_body(segmenter.predict_canonical(hu, SPACING), hu, SPACING, segmenter.manifest)
    assert np.array_equal(orientation.to_canonical(result.labels), canonical)
    assert segmenter.loaded_via == "trainer"


def test_the_body_outline_is_drawn_beside_the_prediction_unless_the_series_is_long(
    trained: dict[str, Any], probe: npt.NDArray[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: the outline (CT only) runs in a second thread while the model predicts, the same
    labels; a long series, predicted in z-chunks to bound memory, draws it afterwards in one thread."""
    import threading

    from rtseg.model import segmenter as module

    threads: list[str] = []
    draw = module.body_mask

    def recorded(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return draw(*args)

    monkeypatch.setattr(module, "body_mask", recorded)
    volume = write_ct_series(
        np.round(probe).astype(np.int16),
        SPACING,
        (-30.0, -40.0, 100.0),
        tmp_path,
        SeriesSpec("overlap", "HFS"),
    )
    short = NnunetSegmenter(trained["model"], device="cpu", threads=2)
    chunked = NnunetSegmenter(trained["model"], device="cpu", threads=2, chunk_slices=volume.shape[0] // 2)
    beside = short.segment(volume).labels
    after = chunked.segment(volume).labels
    assert threads[0].startswith("rtseg-outline") and threads[1] == threading.main_thread().name
    assert np.array_equal(beside, after) and np.count_nonzero(beside) > 0


def test_foreign_trainer_name_falls_back_to_plans(
    trained: dict[str, Any], segmenter: NnunetSegmenter, probe: npt.NDArray[Any], tmp_path: Path
) -> None:
    import torch

    model = _copy_model(trained["model"], tmp_path / "foreign")
    path = model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "SomeForeignTrainer"
    torch.save(checkpoint, path)
    foreign = NnunetSegmenter(model, device="cpu")
    assert foreign.loaded_via == "plans"
    expected = segmenter.predict_canonical(probe, SPACING)
    assert np.array_equal(foreign.predict_canonical(probe, SPACING), expected)


class _TouchOnUnpickle:
    """A pickled object that, unpickled, creates a file: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused_unopened(trained: dict[str, Any], tmp_path: Path) -> None:
    """A model folder from elsewhere (federation, registry, a colleague) cannot run code in the node."""
    import torch

    from rtseg.model.checkpoints import load_checkpoint

    marker = tmp_path / "code-ran"
    model = _copy_model(trained["model"], tmp_path / "crafted")
    path = model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["init_args"]["payload"] = _TouchOnUnpickle(marker)
    torch.save(checkpoint, path)
    with pytest.raises(ModelError, match="could run code") as info:
        NnunetSegmenter(model, device="cpu")
    assert info.value.source == str(path)
    with pytest.raises(ModelError, match="could run code"):
        load_checkpoint(path)  # also the path of --from-model start weights and model export
    assert not marker.exists()
    assert "network_weights" in load_checkpoint(trained["model"] / "fold_all" / "checkpoint_final.pth")


def test_plain_nnunet_folder_gets_derived_manifest(trained: dict[str, Any], tmp_path: Path) -> None:
    model = _copy_model(
        trained["model"],
        tmp_path / "Dataset901_Synth" / "nnUNetTrainer__nnUNetPlans__3d_fullres",
        manifest=False,
    )
    manifest = load_manifest(model)
    assert manifest.name == "Dataset901_Synth" and manifest.configuration == "3d_fullres"
    assert manifest.folds == ("all",) and manifest.checkpoint == "checkpoint_final.pth"
    assert [(s.name, s.label) for s in manifest.structures] == [("Bright", 1), ("Dark", 2)]
    assert manifest.version == "nnunet-" + model_hash(model)
    assert model_hash(model) == model_hash(trained["model"])  # the manifest is not part of the hash


def test_missing_checkpoint_is_a_model_error(trained: dict[str, Any], tmp_path: Path) -> None:
    model = _copy_model(trained["model"], tmp_path / "broken")
    (model / "fold_all" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match="missing checkpoint"):
        NnunetSegmenter(model, device="cpu")
    (model / MANIFEST_NAME).unlink()
    with pytest.raises(ModelError, match="no fold_"):
        NnunetSegmenter(model, device="cpu")


def test_wrong_channel_count_is_a_model_error(trained: dict[str, Any], tmp_path: Path) -> None:
    model = _copy_model(trained["model"], tmp_path / "twochannels")
    doc = json.loads((model / "dataset.json").read_text())
    doc["channel_names"] = {"0": "CT", "1": "PET"}
    (model / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="2 input channels"):
        NnunetSegmenter(model, device="cpu")


class _Stop(Exception):
    pass


@pytest.mark.slow  # a second training run
def test_progress_callback_can_stop_training(trained: dict[str, Any]) -> None:
    def stop(epoch: EpochProgress) -> None:
        raise _Stop(epoch.epoch)

    with pytest.raises(_Stop):
        train(trained["work"], DATASET_ID, TINY, fold="0", progress=stop)
    assert not (trained["results"] / "fold_0" / "checkpoint_final.pth").exists()


@pytest.mark.slow  # a second training run
def test_training_can_start_from_a_checkpoint(trained: dict[str, Any]) -> None:
    """The default recipe's stage 2: the network starts from stage 1's weights, not from random ones."""
    import torch

    start = trained["results"] / "fold_all" / "checkpoint_final.pth"
    barely = replace(TINY_TRAIN, epochs=1, iterations_per_epoch=1, learning_rate=1e-8)
    results = train(trained["work"], DATASET_ID, barely, fold="1", start_from=start)
    before = torch.load(start, map_location="cpu", weights_only=False)["network_weights"]
    after = torch.load(results / "fold_1" / "checkpoint_final.pth", map_location="cpu", weights_only=False)[
        "network_weights"
    ]
    assert before.keys() == after.keys()
    drift = max(float((before[k].float() - v.float()).abs().max()) for k, v in after.items())
    assert drift < 1e-5  # one step at lr 1e-8; random initial weights would differ by ~0.1


@pytest.mark.slow  # a child process that imports torch and nnU-Net
def test_start_checkpoint_of_another_network_is_refused(trained: dict[str, Any], tmp_path: Path) -> None:
    import torch

    checkpoint = torch.load(
        trained["results"] / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    key = next(k for k in checkpoint["network_weights"] if k.endswith(".weight"))
    checkpoint["network_weights"][key] = torch.zeros(3, 3)  # another network's shape
    foreign = tmp_path / "foreign.pth"
    torch.save(checkpoint, foreign)
    with pytest.raises(ModelError, match="does not fit the network of these plans"):
        train(trained["work"], DATASET_ID, TINY_TRAIN, fold="2", start_from=foreign)
    with pytest.raises(InputError, match="no checkpoint to start training from"):
        train(trained["work"], DATASET_ID, TINY_TRAIN, start_from=tmp_path / "missing.pth")


@pytest.mark.slow  # a child process that imports torch and nnU-Net
def test_another_dataset_is_preprocessed_with_a_models_plans(trained: dict[str, Any], tmp_path: Path) -> None:
    """``--from-model`` (default recipe, partial-labels study): the model's plans, renamed; no planning."""
    model = trained["model"]
    cases = [(f"other{i}", *_split(synthetic_case(100 + i, (28, 40, 44)))) for i in range(2)]
    write_raw_dataset(nnunet_dirs(tmp_path).raw, 902, "Other", cases, LABELS)

    folder = preprocess_like_model(tmp_path, 902, "Other", model, TINY)

    assert folder == nnunet_dirs(tmp_path).preprocessed / "Dataset902_Other"
    model_plans = json.loads((model / "plans.json").read_text())
    plans = json.loads((folder / f"{PLANS_IDENTIFIER}.json").read_text())
    assert plans == {**model_plans, "dataset_name": "Dataset902_Other"}
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
    assert fingerprint == json.loads((model / "dataset_fingerprint.json").read_text())
    assert len(fingerprint["spacings"]) == 6  # the model's cases, not these two
    segmentations = sorted(p.name for p in (folder / "gt_segmentations").iterdir())
    assert segmentations == ["other0.nii.gz", "other1.nii.gz"]


def test_a_model_with_other_labels_is_refused_before_preprocessing(tmp_path: Path) -> None:
    """Before: renamed plans let such a model through to a shape error when its weights were loaded."""
    cases = [(f"other{i}", *_split(synthetic_case(100 + i, (28, 40, 44)))) for i in range(1)]
    write_raw_dataset(nnunet_dirs(tmp_path).raw, 903, "Other", cases, LABELS)
    with pytest.raises(ModelError, match="has other labels than the dataset .*Liver") as refused:
        preprocess_like_model(tmp_path, 903, "Other", default_model_dir(), TINY)
    assert "its weights cannot be continued on these cases" in str(refused.value)
    hostile = tmp_path / "hostile"
    shutil.copytree(default_model_dir(), hostile)
    (hostile / "dataset.json").write_text("[1, 2]")  # a peer's model folder that lies
    with pytest.raises(ModelError, match="dataset.json has no 'labels' table"):
        preprocess_like_model(tmp_path, 903, "Other", hostile, TINY)
    assert not nnunet_dirs(tmp_path).preprocessed.exists() or not any(
        nnunet_dirs(tmp_path).preprocessed.iterdir()
    )


def test_steps_out_of_order_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no raw dataset"):
        plan_and_preprocess(tmp_path, 998, TINY)
    with pytest.raises(InputError, match="not preprocessed"):
        train(tmp_path, 998, TINY)


@pytest.mark.slow  # a child process that imports torch and nnU-Net
def test_failed_child_is_a_model_error_with_its_output(tmp_path: Path) -> None:
    broken = nnunet_dirs(tmp_path).preprocessed / "Dataset998_Broken"
    broken.mkdir(parents=True)
    (broken / "nnUNetPlans.json").write_text("{}")
    with pytest.raises(ModelError, match="nnU-Net train failed") as info:
        train(tmp_path, 998, TINY)
    assert "Traceback" in str(info.value) and info.value.source is not None


def test_cross_validation_folder_loads_as_ensemble(
    trained: dict[str, Any], segmenter: NnunetSegmenter, probe: npt.NDArray[Any], tmp_path: Path
) -> None:
    """The layout nnU-Net leaves after 5-fold training elsewhere: fold_0..N, no manifest."""
    model = _copy_model(trained["model"], tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres", manifest=False)
    (model / "fold_all").rename(model / "fold_0")
    shutil.copytree(model / "fold_0", model / "fold_1")
    ensemble = NnunetSegmenter(model, device="cpu")
    assert ensemble.manifest.folds == ("0", "1") and ensemble.loaded_via == "trainer"
    # two identical members average to the single model
    assert np.array_equal(
        ensemble.predict_canonical(probe, SPACING), segmenter.predict_canonical(probe, SPACING)
    )


@pytest.mark.parametrize(
    "runtime",
    # torch's inductor compiles for about a minute: slow
    [pytest.param("compile", marks=pytest.mark.slow), "onnxruntime", "openvino"],
)
def test_bench_runtime_levers_give_the_same_labels(
    trained: dict[str, Any], probe: npt.NDArray[Any], runtime: str
) -> None:
    """`rtseg bench --levers` swaps the network's runtime; the labels must not change."""
    from rtseg_app.bench.inference import runtime_network

    reference = NnunetSegmenter(trained["model"], device="cpu", threads=2, min_island_ml=0.0)
    expected = reference.predict_canonical(probe, SPACING)
    exported = "torch" if runtime == "compile" else runtime  # the exported runtimes are [node] engine
    swapped = NnunetSegmenter(trained["model"], device="cpu", threads=2, min_island_ml=0.0, runtime=exported)
    if runtime == "compile":
        swapped._predictor.network = runtime_network(swapped._predictor, runtime)
    assert type(swapped._predictor.network).__name__ != type(reference._predictor.network).__name__
    labels = swapped.predict_canonical(probe, SPACING)
    assert labels.shape == expected.shape
    assert (labels == expected).mean() > 0.999
