"""A site's imported cases with unknown structures train with nnU-Net's ignore label, automatically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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
