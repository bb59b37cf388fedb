"""Small labelled cases for tests that need a real CT + labels but few slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom

from rtseg.cases import load_case
from rtseg.phantom.cohort import write_label_image


def small_case(source: Path, out: Path, n: int) -> Path:
    """The ``n`` middle slices of a labelled case (CT files and cropped labels) as a new case."""
    case = load_case(source)
    start = max(0, (case.volume.shape[0] - n) // 2)
    keep = set(case.volume.info.sop_instance_uids[start : start + n])
    (out / "ct").mkdir(parents=True)
    for path in (source / "ct").glob("*.dcm"):
        if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID in keep:
            shutil.copy2(path, out / "ct" / path.name)
    affine = case.volume.affine.copy()
    affine[:3, 3] = (affine @ np.array([0.0, 0.0, float(start), 1.0]))[:3]
    write_label_image(case.labels[start : start + n], affine, out / "labels.nii.gz")
    return out
