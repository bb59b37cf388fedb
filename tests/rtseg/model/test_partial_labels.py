"""Incomplete contour sets: voxels an unknown structure could occupy become nnU-Net's ignore label."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk

from rtseg.body import body_mask
from rtseg.model.children import nnunet_dirs
from rtseg.model.dataset import IGNORE, write_raw_dataset

SPACING = (3.0, 2.0, 2.0)
LABELS = {"background": 0, "External": 1, "Liver": 2, "Stomach": 3}


def _phantom(shape: tuple[int, int, int] = (12, 40, 40)) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]:
    """Air around a water cylinder (the body, label External) holding two boxes (Liver, Stomach)."""
    z, y, x = np.indices(shape)
    body = (y - 20) ** 2 + (x - 20) ** 2 <= 15**2
    hu = np.where(body, 20, -1000).astype(np.int16)
    labels = np.where(body, 1, 0).astype(np.uint8)
    labels[:, 12:20, 10:18] = 2
    labels[:, 22:28, 20:30] = 3
    hu[labels == 2] = 60
    return hu, labels


def _written(raw: Path, case_id: str) -> npt.NDArray[Any]:
    return np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case_id}.nii.gz"))))


def test_partial_case_becomes_ignore_inside_body_and_full_case_is_untouched(tmp_path: Path) -> None:
    hu, full = _phantom()
    partial = full.copy()
    partial[partial == 3] = 1  # the stomach was not contoured: the BODY contour covers it
    cases = [("full", hu, SPACING, full), ("partial", hu, SPACING, partial)]
    raw = write_raw_dataset(
        nnunet_dirs(tmp_path).raw, 950, "Partial", cases, LABELS, unknown={"partial": {"Stomach"}}
    )

    ignore = max(LABELS.values()) + 1
    doc = json.loads((raw / "dataset.json").read_text())
    assert doc["labels"] == {**LABELS, IGNORE: ignore}  # nnU-Net: the ignore label is the highest id
    assert np.array_equal(_written(raw, "full"), full)

    got = _written(raw, "partial")
    body = body_mask(hu, SPACING) | (partial > 0)
    assert np.array_equal(got[partial == 2], partial[partial == 2])  # contoured organs kept
    assert np.all(got[body & (partial != 2)] == ignore)  # could be the stomach: no lesson either way
    assert np.all(got[~body] == 0)  # outside the body is background for every structure
    assert set(np.unique(got)) == {0, 2, ignore}


def test_fully_labelled_cohort_declares_no_ignore_label(tmp_path: Path) -> None:
    hu, full = _phantom()
    raw = write_raw_dataset(
        nnunet_dirs(tmp_path).raw, 951, "Full", [("a", hu, SPACING, full)], LABELS, unknown={}
    )
    assert json.loads((raw / "dataset.json").read_text())["labels"] == LABELS


def test_unknown_structure_outside_the_label_table_is_refused(tmp_path: Path) -> None:
    from rtseg.errors import InputError

    hu, full = _phantom()
    with pytest.raises(InputError, match="Pancreas"):
        write_raw_dataset(
            nnunet_dirs(tmp_path).raw,
            952,
            "Bad",
            [("a", hu, SPACING, full)],
            LABELS,
            unknown={"a": {"Pancreas"}},
        )


@pytest.mark.slow
def test_mixed_cohort_trains_and_exported_model_has_no_ignore_output(tmp_path: Path) -> None:
    """Half the cases lack Dark: nnU-Net trains with the ignore label; the model never predicts it."""
    import torch
    from test_model import LABELS as SYNTH
    from test_model import SPACING as SYNTH_SPACING
    from test_model import TINY, TINY_TRAIN, synthetic_case

    from rtseg.model.manifest import ModelManifest, default_provenance, structures_from_dataset_json
    from rtseg.model.segmenter import NnunetSegmenter
    from rtseg.model.training import export_model, plan_and_preprocess, train

    cases, unknown = [], {}
    for i in range(6):
        hu, labels = synthetic_case(i)
        if i % 2:
            labels[labels == SYNTH["Dark"]] = 0  # nobody contoured it
            unknown[f"case{i:02d}"] = {"Dark"}
        cases.append((f"case{i:02d}", hu, SYNTH_SPACING, labels))
    work = tmp_path / "work"
    write_raw_dataset(nnunet_dirs(work).raw, 953, "Mixed", cases, SYNTH, unknown=unknown)
    plan_and_preprocess(work, 953, TINY)
    results = train(work, 953, TINY_TRAIN)
    assert json.loads((results / "dataset.json").read_text())["labels"][IGNORE] == 3
    dataset = json.loads((results / "dataset.json").read_text())
    manifest = ModelManifest(
        name="mixed",
        version="0.0.1",
        structures=structures_from_dataset_json(dataset),
        provenance=default_provenance(training_data={"cases": 6}, seeds={"training": 0}),
    )
    model = export_model(results, tmp_path / "model", manifest)

    assert json.loads((model / "dataset.json").read_text())["labels"] == SYNTH  # a plain model outside
    weights = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    heads = [v for k, v in weights["network_weights"].items() if "seg_layers" in k and k.endswith("weight")]
    assert {int(w.shape[0]) for w in heads} == {len(SYNTH)}  # background, Bright, Dark: no ignore channel
    probe = synthetic_case(100)[0]
    predicted = NnunetSegmenter(model, device="cpu", threads=1).predict_canonical(probe, SYNTH_SPACING)
    assert set(np.unique(predicted).tolist()) <= set(SYNTH.values())
