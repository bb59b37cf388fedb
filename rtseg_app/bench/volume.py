"""The benchmark CT: a phantom case resampled to a chosen matrix and slice count, with its label map.

Drawing a phantom directly at 512×512 is slow; the anatomy is drawn at up to
256² and interpolated (HU linear, labels nearest) to the benchmark's grid, which
keeps the field of view and the body's extent. Written once as DICOM under the
work folder and reused; copies (same pixels, new UIDs) stand in for distinct
patients when several series must be in flight at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.ndimage import zoom

from rtseg.ct import load_series
from rtseg.phantom.cohort import make_case, read_label_image, write_labels
from rtseg.phantom.dicom_io import SeriesSpec, write_ct_series
from rtseg.volume import CTVolume

log = logging.getLogger(__name__)

CENTER, SEED = "A", 4242  # a fixed phantom: every run measures the same anatomy
MAX_DRAW_MATRIX = 256
# HU, labels, spacing (z, y, x) and LPS origin of canonical voxel [0, 0, 0]
Canonical = tuple[
    npt.NDArray[np.float32], npt.NDArray[np.uint8], tuple[float, float, float], npt.NDArray[np.float64]
]


def bench_case_dir(work: Path, slices: int, matrix: int, copy: int = 0) -> Path:
    return work / (f"bench-ct-{slices}x{matrix}" + (f"-copy{copy}" if copy else ""))


def bench_volume(work: Path, slices: int, matrix: int) -> tuple[CTVolume, npt.NDArray[np.uint8]]:
    """The benchmark CT (``slices`` × ``matrix``², HFS) and its ``[k, j, i]`` labels, cached in ``work``."""
    folder = bench_series(work, slices, matrix)
    volume = load_series(folder / "ct")
    labels, _ = read_label_image(folder / "labels.nii.gz")
    return volume, labels


def bench_series(work: Path, slices: int, matrix: int, copy: int = 0) -> Path:
    """Folder of the benchmark case (``ct/`` and ``labels.nii.gz``); ``copy`` > 0: the same with new UIDs."""
    folder = bench_case_dir(work, slices, matrix, copy)
    if (folder / "labels.nii.gz").is_file():
        return folder
    hu, labels, spacing, origin = _canonical(work, slices, matrix)
    spec = SeriesSpec(uid_seed=f"rtseg-bench/{slices}/{matrix}/{copy}", patient_position="HFS")
    volume = write_ct_series(hu, spacing, origin, folder / "ct", spec)
    write_labels(labels, volume, folder / "labels.nii.gz")
    return folder


def _canonical(
    work: Path, slices: int, matrix: int
) -> tuple[
    npt.NDArray[np.float32], npt.NDArray[np.uint8], tuple[float, float, float], npt.NDArray[np.float64]
]:
    """Canonical HU, labels, spacing (z, y, x) and origin of the benchmark CT, drawn once and cached."""
    cache = work / f"bench-ct-{slices}x{matrix}.npz"
    if not cache.is_file():
        draw = min(matrix, MAX_DRAW_MATRIX)
        _, grid, body, _ = make_case(CENTER, SEED, 0, draw, position="HFS")
        factors = (slices / grid.shape[0], matrix / draw, matrix / draw)
        hu = zoom(body.hu, factors, order=1, grid_mode=True, mode="nearest")
        labels = zoom(body.labels, factors, order=0, grid_mode=True, mode="nearest")
        spacing = [s * n / m for s, n, m in zip(grid.spacing, grid.shape, hu.shape, strict=True)]
        work.mkdir(parents=True, exist_ok=True)
        np.savez(cache, hu=hu, labels=labels, spacing=spacing, origin=np.asarray(grid.origin))
        log.info("benchmark CT %s drawn (spacing %s mm)", hu.shape, spacing)
    data = np.load(cache)
    s = [float(v) for v in data["spacing"]]
    return data["hu"], data["labels"], (s[0], s[1], s[2]), data["origin"]
