"""A model folder can never run code: plans naming callables are refused on every way a model is loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from rtseg.errors import ModelError
from rtseg.model.checkpoints import load_checkpoint
from rtseg.model.children import child_env
from rtseg.model.cpu import CpuConfig
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import load_manifest, read_json
from rtseg.model.plans_check import check_plans
from rtseg.model.registry import Registry
from rtseg_app.cli import main

NONLIN = "configurations.3d_fullres.architecture.arch_kwargs.nonlin"


def shell_payloads(marker: Path) -> list[tuple[str, dict[str, Any]]]:
    """Callables plus keyword arguments that, called by nnU-Net, would create ``marker``."""
    return [
        ("subprocess.Popen", {"args": f"touch {marker}", "shell": True}),
        ("os.system", {"command": f"touch {marker}"}),
    ]


def crafted_model(out: Path, nonlin: str, kwargs: dict[str, Any]) -> Path:
    """The embedded default model with ``nonlin`` (and its kwargs) as the network's nonlinearity."""
    shutil.copytree(default_model_dir(), out)
    plans = read_json(out / "plans.json")
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["nonlin"], arch["nonlin_kwargs"] = nonlin, kwargs
    (out / "plans.json").write_text(json.dumps(plans, indent=1))
    return out


def appeared(marker: Path, seconds: float = 2.0) -> bool:
    """Whether ``marker`` exists within ``seconds`` (a Popen'd shell needs a moment)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if marker.exists():
            return True
        time.sleep(0.1)
    return marker.exists()


@pytest.mark.parametrize("index", [0, 1], ids=["subprocess.Popen", "os.system"])
def test_segmenter_refuses_plans_that_name_a_callable(tmp_path: Path, index: int) -> None:
    from rtseg.model.segmenter import NnunetSegmenter

    marker = tmp_path / "code-ran"
    nonlin, kwargs = shell_payloads(marker)[index]
    model = crafted_model(tmp_path / "model", nonlin, kwargs)
    with pytest.raises(ModelError) as info:
        NnunetSegmenter(model, device="cpu")
    assert not appeared(marker), "loading the model folder ran the command its plans name"
    assert info.value.source == str(model / "plans.json")
    assert NONLIN in info.value.message and repr(nonlin) in info.value.message


def test_registry_and_gate_refuse_such_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rtseg.model.gate import run_gate

    marker = tmp_path / "code-ran"
    model = crafted_model(tmp_path / "model", *shell_payloads(marker)[0])
    data = tmp_path / "data"
    assert main(["model", "promote", str(model), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{model / 'plans.json'}: {NONLIN} is 'subprocess.Popen'" in err and "Traceback" not in err
    registry = Registry(data)
    assert [v.name for v in registry.list()] == [registry.current().name]  # only the default model
    with pytest.raises(ModelError, match="nonlin"):
        registry.add(model)
    with pytest.raises(ModelError, match="nonlin"):
        run_gate(model, tmp_path / "no-cases", registry)
    assert not appeared(marker)


@pytest.mark.parametrize("name", ["plans.json", "rtseg-model.json", "dataset.json"])
def test_a_model_file_nested_past_the_stack_is_a_model_error_in_one_line(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON nested 100,000 deep (1 MB): json raised RecursionError, a traceback from every command."""
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    doc = json.loads((model / name).read_text())
    (model / name).write_text(json.dumps(doc)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    from rtseg.model.segmenter import NnunetSegmenter

    with pytest.raises(ModelError, match=f"{re.escape(name)} nests deeper than JSON can be read"):
        NnunetSegmenter(model, device="cpu")
    if name != "dataset.json":  # what `model info` reads
        assert main(["model", "info", "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert f"{name} nests deeper than JSON can be read" in err and "Traceback" not in err


def test_plans_nested_deeper_than_plans_are_refused_before_the_stack_is() -> None:
    """Plans also come from a federation coordinator, parsed: the check must not recurse without end."""
    plans = json.loads((default_model_dir() / "plans.json").read_text())
    check_plans(plans, "ok")  # nnU-Net's own plans nest 7 levels
    deep: Any = 1
    for _ in range(5_000):
        deep = [deep]
    plans["x"] = deep
    with pytest.raises(
        ModelError, match=r"plans\.x(\[0\]){31} nests deeper than 32 levels: not nnU-Net plans"
    ):
        check_plans(plans, "coordinator")


def test_checkpoint_naming_a_dotted_trainer_or_carrying_bad_plans_is_refused(tmp_path: Path) -> None:
    import torch

    model = crafted_model(tmp_path / "model", "torch.nn.LeakyReLU", {"inplace": True})
    path = model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "os.system"
    torch.save(checkpoint, path)
    with pytest.raises(ModelError, match="trainer_name 'os.system' is not a class name"):
        load_checkpoint(path)
    checkpoint["trainer_name"] = "nnUNetTrainer"
    checkpoint["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][
        "conv_op"
    ] = "builtins.exec"
    torch.save(checkpoint, path)
    with pytest.raises(ModelError, match="conv_op is 'builtins.exec'"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            ["architecture", "network_class_name"],
            "subprocess.Popen",
            "network_class_name is 'subprocess.Popen'",
        ),
        (["architecture", "_kw_requires_import"], ["conv_op", "n_stages"], "lists 'n_stages'"),
        (["resampling_fn_data"], "system", "resampling_fn_data is 'system'"),
        (["preprocessor_name"], "Popen", "preprocessor_name is 'Popen'"),
        (["normalization_schemes"], ["os"], "normalization_schemes[0] is 'os'"),
        (["data_identifier"], "../../elsewhere", "data_identifier name '../../elsewhere'"),
        (["resampling_fn_data_kwargs"], {"order": {1, 2}}, "order is a set"),
    ],
)
def test_every_field_nnunet_resolves_is_checked(field: list[str], value: Any, message: str) -> None:
    plans = read_json(default_model_dir() / "plans.json")
    target = plans["configurations"]["3d_fullres"]
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    with pytest.raises(ModelError, match=re.escape(message)):
        check_plans(plans, "plans.json")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_reader_writer", "subprocess"),
        ("label_manager", "system"),
        ("experiment_planner_used", "Popen"),
        ("dataset_name", "/tmp/elsewhere"),
        ("plans_name", "../nnUNetPlans"),
    ],
)
def test_top_level_names_are_checked(key: str, value: str) -> None:
    plans = read_json(default_model_dir() / "plans.json")
    plans[key] = value
    with pytest.raises(ModelError, match=key):
        check_plans(plans, "plans.json")


def test_default_model_loads_unrefused() -> None:
    model = default_model_dir()
    check_plans(read_json(model / "plans.json"), str(model / "plans.json"))
    assert load_manifest(model).name
    assert "network_weights" in load_checkpoint(model / "fold_all" / "checkpoint_final.pth")


PLANNERS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, SimpleITK as sitk
    from pathlib import Path
    from nnunetv2.paths import nnUNet_raw, nnUNet_preprocessed
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners
    nnUNetPlannerResEncM = residual_encoder_unet_planners.nnUNetPlannerResEncM
    from nnunetv2.experiment_planning.experiment_planners.resampling.resample_with_torch import (
        nnUNetPlanner_torchres,
    )
    dataset_json, fingerprint = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    raw = Path(nnUNet_raw) / "Dataset902_Planners"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    blank = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8))
    sitk.WriteImage(blank, str(raw / "imagesTr/a_0000.nii.gz"))
    sitk.WriteImage(blank, str(raw / "labelsTr/a.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    pre = Path(nnUNet_preprocessed) / "Dataset902_Planners"
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    for planner in (ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlanner_torchres):
        plan_experiment_dataset(902, planner)
    print(json.dumps(sorted(str(p) for p in pre.glob("*Plans*.json"))))
    """
)


def test_plans_nnunet_planners_write_pass(tmp_path: Path) -> None:
    """No false refusals: the plans of nnU-Net's default, ResEnc and torch-resampling planners."""
    import numpy as np

    from rtseg.federation.fingerprint import FingerprintAccumulator, pooled_fingerprint

    labels = {"background": 0, "Liver": 1, "Spleen": 2}
    accumulator = FingerprintAccumulator(labels)
    rng = np.random.default_rng(0)
    for _ in range(2):
        image = rng.normal(40, 80, (40, 96, 96)).round().astype(np.int16)
        accumulator.add(image, (3.0, 1.0, 1.0), (rng.random(image.shape) * 3).astype(np.uint8))
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    fingerprint = pooled_fingerprint([accumulator.result()])
    done = subprocess.run(
        [sys.executable, "-c", PLANNERS, json.dumps(dataset_json), json.dumps(fingerprint)],
        env=child_env(tmp_path, CpuConfig()),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = [Path(p) for p in json.loads(done.stdout.strip().splitlines()[-1])]
    assert len(files) >= 3, files
    for path in files:
        plans = json.loads(path.read_text())
        check_plans(plans, str(path))
    classes = {
        json.loads(p.read_text())["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
        for p in files
    }
    assert {c.rsplit(".", 1)[1] for c in classes} == {"PlainConvUNet", "ResidualEncoderUNet"}
