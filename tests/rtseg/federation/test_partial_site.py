"""A site's imported cases with unknown structures train with nnU-Net's ignore label, automatically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rtseg.errors import FederationError, InputError
from rtseg.federation.schedule import SiteSettings
from rtseg.federation.task import DATASET_ID, Site, prepare_data
from rtseg.model.children import dataset_folder, nnunet_dirs
from rtseg.phantom.cohort import write_case
from rtseg.structures import STRUCTURES, dataset_labels
from rtseg.study.partial import drop_structures

LABEL = {s.name: s.label for s in STRUCTURES}


def test_site_with_partial_case_gets_ignore_label(tmp_path: Path) -> None:
    data = tmp_path / "cases"
    full = write_case("A", 5, 0, data, matrix=48).case_id
    partial = write_case("A", 5, 1, data, matrix=48).case_id
    drop_structures(data / partial, {"Liver", "Kidney_L"}, LABEL)  # as `rtseg cases import` records it
    site = Site("site-0", data, tmp_path / "work")

    prepare_data(site, dataset_labels(), (6.0, 6.0, 6.0))

    raw = dataset_folder(nnunet_dirs(site.work_dir).raw, DATASET_ID)
    assert raw is not None
    ignore = max(LABEL.values()) + 1
    assert json.loads((raw / "dataset.json").read_text())["labels"] == {**dataset_labels(), "ignore": ignore}

    def written(case_id: str) -> set[int]:
        image = sitk.ReadImage(str(raw / "labelsTr" / f"{case_id}.nii.gz"))
        return set(np.unique(sitk.GetArrayFromImage(image)).tolist())

    assert ignore not in written(full) and LABEL["Stomach"] in written(full)
    assert written(partial) <= {0, LABEL["Liver"], LABEL["Kidney_L"], ignore}  # no External, no lesson
    assert ignore in written(partial) and LABEL["Liver"] in written(partial)


def test_partial_labels_background_trains_the_unknown_structures_as_they_are(tmp_path: Path) -> None:
    """The naive switch (``partial_labels = "background"``): no ignore label, the External stays."""
    data = tmp_path / "cases"
    partial = write_case("A", 5, 1, data, matrix=48).case_id
    drop_structures(data / partial, {"Liver", "Kidney_L"}, LABEL)
    site = Site.from_node_config(
        {
            "site-id": "s",
            "data-dir": str(data),
            "work-dir": str(tmp_path / "work"),
            "partial-labels": "background",
        }
    )

    prepare_data(site, dataset_labels(), (6.0, 6.0, 6.0))

    raw = dataset_folder(nnunet_dirs(site.work_dir).raw, DATASET_ID)
    assert raw is not None
    assert json.loads((raw / "dataset.json").read_text())["labels"] == dataset_labels()
    image = sitk.ReadImage(str(raw / "labelsTr" / f"{partial}.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(image)).tolist()) == {
        0,
        LABEL["External"],
        LABEL["Liver"],
        LABEL["Kidney_L"],
    }


def test_partial_labels_is_a_site_setting_with_two_values(tmp_path: Path) -> None:
    table = {"coordinator": "127.0.0.1:9", "site_id": "a", "data_dir": "d", "work_dir": "w", "insecure": True}
    assert SiteSettings.from_mapping(table, "site.toml").partial_labels == "ignore"
    naive = SiteSettings.from_mapping({**table, "partial_labels": "Background"}, "site.toml")
    assert naive.partial_labels == "background"
    with pytest.raises(
        InputError, match="federation.partial_labels must be ignore or background, got 'zero'"
    ):
        SiteSettings.from_mapping({**table, "partial_labels": "zero"}, "site.toml")
    with pytest.raises(FederationError, match="partial-labels must be ignore or background, got 'zero'"):
        Site.from_node_config({"site-id": "s", "data-dir": "d", "work-dir": "w", "partial-labels": "zero"})


def test_partial_study_refuses_a_start_folder_that_is_no_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--from-model`` is checked before any cohort is generated: one line, exit 2, nothing written."""
    from rtseg.study.partial import main

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    work = tmp_path / "work"
    assert main(["--work", str(work), "--from-model", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty}: ") and len(err.strip().splitlines()) == 1
    assert not work.exists()
