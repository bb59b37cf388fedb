"""``rtseg cases report``: per site cases, structures per case, volumes and a coverage heat map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rtseg.phantom.cohort import write_label_image
from rtseg.site_import import ImportOptions, case_record
from rtseg.structures import STRUCTURES

LABEL = {s.name: s.label for s in STRUCTURES}
AFFINE = np.diag([2.0, 2.0, 5.0, 1.0])  # 2 × 2 × 5 mm = 0.02 ml per voxel


def _case(site: Path, case_id: str, organs: dict[str, int], *, record: bool = True) -> None:
    """An imported-style case: a body of 1000 voxels, ``organs`` of the given voxel counts, case.json."""
    folder = site / case_id
    (folder / "ct").mkdir(parents=True)
    labels = np.zeros((10, 20, 20), np.uint8)
    flat = labels.reshape(-1)
    flat[:1000] = LABEL["External"]
    start = 0
    for name, n in organs.items():
        flat[start : start + n] = LABEL[name]
        start += n
    write_label_image(labels, AFFINE, folder / "labels.nii.gz")
    if record:  # the import's own record: contoured what has a mask, the rest unknown
        masks = dict.fromkeys(["External", *organs], True)
        (folder / "case.json").write_text(json.dumps(case_record(masks, ImportOptions())))


def _report(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-m", "rtseg_app", "cases", "report", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_cases_report_per_site_with_heat_map(tmp_path: Path) -> None:
    cases = tmp_path / "sites"
    _case(cases / "north", "p001", {"Liver": 100, "Kidney_L": 10})
    _case(cases / "north", "p002", {"Liver": 300})
    _case(cases / "north", "p003", {"Liver": 200, "Kidney_L": 30})
    _case(cases / "south", "s001", {"Heart": 50}, record=False)  # a phantom-style case: fully labelled
    (cases / "south" / "s002" / "ct").mkdir(parents=True)
    (cases / "south" / "s002" / "labels.nii.gz").write_text("not a label map")
    png = tmp_path / "coverage.png"

    done = _report("--cases", str(cases), "--out", str(png))

    assert done.returncode == 0, done.stderr
    out = done.stdout
    north, south = out.split("site south")
    assert "site north: 3 case(s)" in north
    assert "contoured per case     median    3  min  2  max  3" in north
    assert "unknown per case       median   16  min 16  max 17" in north
    rows = {line.split()[0]: line.split()[1:] for line in north.splitlines()[3:] if line.startswith("  ")}
    assert rows["Liver"] == ["3", "0", "0", "4.0"]  # median of 100, 200, 300 voxels × 0.02 ml
    assert rows["Kidney_L"] == ["2", "0", "1", "0.4"]  # the unknown case does not count
    assert rows["Stomach"] == ["0", "0", "3", "-"]
    assert rows["External"] == ["3", "0", "0", "20.0"]  # the body: every labelled voxel
    assert south.startswith(": 1 case(s)")  # the unreadable case is not counted
    assert "unreadable: s002:" in south  # listed with its reason, the report goes on
    south_rows = {line.split()[0]: line.split()[1:] for line in south.splitlines() if line.startswith("  ")}
    assert south_rows["Heart"] == ["1", "0", "0", "1.0"]  # no case.json: fully contoured
    assert south_rows["Stomach"] == ["1", "0", "0", "-"]  # contoured and absent: no volume
    assert f"coverage heat map: {png}" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 600


def test_cases_report_names_a_folder_without_cases(tmp_path: Path) -> None:
    done = _report("--cases", str(tmp_path))
    assert done.returncode != 0
    assert "no cases found" in done.stderr and str(tmp_path) in done.stderr
    assert "Traceback" not in done.stderr
