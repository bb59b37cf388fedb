"""Read an RTSTRUCT back onto its CT grid (even-odd rule, voxel centres)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from rtseg.errors import RTStructError
from rtseg.volume import CTVolume

_CONTOUR_DATA = Tag(0x3006, 0x0050)
# How far (in slices) a contour may lie off its slice plane and still be on it.
PLANE_TOLERANCE = 1e-3


def rasterize_rtstruct(dataset: pydicom.Dataset, volume: CTVolume) -> dict[str, npt.NDArray[np.bool_]]:
    """Masks ``[k, j, i]`` of every ROI of ``dataset`` on the grid of ``volume``.

    A voxel is inside when its centre is inside an odd number of the ROI's
    contours on that plane (even-odd rule, so inner contours are holes).

    Raises
    ------
    RTStructError
        If the structure set is on another frame of reference than the CT, or
        a contour does not lie on a slice plane of the CT.
    """
    masks: dict[str, npt.NDArray[np.bool_]] = {}
    for name, planes in roi_planes(dataset, volume).items():
        mask = np.zeros(volume.shape, dtype=bool)
        for k, polygons in planes.items():
            mask[k] = fill_even_odd(polygons, volume.shape[1:])
        masks[name] = mask
    return masks


def roi_planes(
    dataset: pydicom.Dataset, volume: CTVolume
) -> dict[str, dict[int, list[npt.NDArray[np.float64]]]]:
    """The closed planar contours of every ROI: name → slice ``k`` → polygons of ``(i, j)`` indices.

    Patient coordinates (mm) are mapped to the CT's voxel indices through the
    inverse of its affine (ImagePositionPatient, ImageOrientationPatient,
    PixelSpacing). Raises :class:`RTStructError` as :func:`rasterize_rtstruct`.
    """
    names = _roi_names(dataset, volume.info.frame_of_reference_uid)
    inverse = np.linalg.inv(volume.affine).astype(np.float64)
    rois: dict[str, dict[int, list[npt.NDArray[np.float64]]]] = {}
    for roi in dataset.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        if number not in names:
            raise RTStructError(f"ROI contour refers to unknown ROI number {number}")
        planes: dict[int, list[npt.NDArray[np.float64]]] = defaultdict(list)
        for contour in roi.get("ContourSequence", []):
            if contour.get("ContourGeometricType", "") != "CLOSED_PLANAR":
                continue
            k, points = _on_slice(_contour_points(contour), inverse, volume.shape[0])
            planes[k].append(points)
        rois[names[number]] = dict(planes)
    return rois


def _roi_names(dataset: pydicom.Dataset, frame_of_reference_uid: str) -> dict[int, str]:
    names = {}
    for roi in dataset.get("StructureSetROISequence", []):
        referenced = str(roi.get("ReferencedFrameOfReferenceUID", ""))
        if referenced != frame_of_reference_uid:
            raise RTStructError(
                f"ROI {roi.get('ROIName', '?')!r} is on frame of reference {referenced!r}, "
                f"the CT on {frame_of_reference_uid!r}"
            )
        names[int(roi.ROINumber)] = str(roi.ROIName)
    return names


def _contour_points(contour: pydicom.Dataset) -> npt.NDArray[np.float64]:
    element = contour.get_item(_CONTOUR_DATA)
    if element is None:
        raise RTStructError("contour without ContourData")
    if isinstance(element, RawDataElement):
        # Parse the text directly: much faster than pydicom's per-value DS objects.
        text = (element.value or b"").decode("ascii").strip(" \0")
        values = np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    else:
        values = np.asarray(element.value, dtype=np.float64).ravel()
    if values.size % 3 or values.size < 9:
        raise RTStructError(f"ContourData has {values.size} values, not 3 per point for 3 or more points")
    return values.reshape(-1, 3)


def _on_slice(
    points: npt.NDArray[np.float64], inverse: npt.NDArray[np.float64], n_slices: int
) -> tuple[int, npt.NDArray[np.float64]]:
    index = points @ inverse[:3, :3].T + inverse[:3, 3]
    k = float(np.rint(index[0, 2]))
    if np.abs(index[:, 2] - k).max() > PLANE_TOLERANCE or not 0 <= k < n_slices:
        raise RTStructError("a contour does not lie on a slice plane of the CT")
    return int(k), index[:, :2]


def fill_even_odd(polygons: list[npt.NDArray[np.float64]], shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Voxels ``[j, i]`` whose centre lies inside an odd number of ``polygons`` ((i, j) points).

    Scanline fill on the centre rows with the half-open rule, so a vertex on a
    row is counted once.
    """
    ny, nx = shape
    start = np.concatenate(polygons)
    end = np.concatenate([np.roll(p, -1, axis=0) for p in polygons])
    x0, y0, x1, y1 = start[:, 0], start[:, 1], end[:, 0], end[:, 1]
    first_row = np.ceil(np.minimum(y0, y1)).astype(np.int64)
    stop_row = np.ceil(np.maximum(y0, y1)).astype(np.int64)
    first_row = np.clip(first_row, 0, ny)
    stop_row = np.clip(stop_row, 0, ny)
    count = np.maximum(stop_row - first_row, 0)
    edge = np.repeat(np.arange(len(start)), count)
    offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    row = first_row[edge] + offsets
    slope = (x1 - x0)[edge] / (y1 - y0)[edge]
    x = x0[edge] + (row - y0[edge]) * slope
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    # Each row has an even number of crossings; consecutive pairs bound the inside.
    left = np.clip(np.ceil(x[0::2]), 0, nx).astype(np.int64)
    right = np.clip(np.ceil(x[1::2]), 0, nx).astype(np.int64)
    mask = np.zeros((ny, nx), dtype=bool)
    if len(row) == 0:
        return mask
    # Accumulate only over the block the spans cover.
    r0, r1 = int(row.min()), int(row.max()) + 1
    c0, c1 = int(left.min()), int(right.max())
    diff = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int32)
    np.add.at(diff, (row[0::2] - r0, left - c0), 1)
    np.add.at(diff, (row[0::2] - r0, right - c0), -1)
    mask[r0:r1, c0:c1] = np.cumsum(diff, axis=1)[:, : c1 - c0] > 0
    return mask
