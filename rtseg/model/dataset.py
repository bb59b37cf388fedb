"""Canonical volumes → an nnU-Net v2 raw dataset (``DatasetXXX_Name``)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from rtseg.body import body_mask
from rtseg.errors import InputError

# (case id, HU array [z, y, x] canonical, spacing (z, y, x) mm, labels [z, y, x] or None)
Case = tuple[str, npt.NDArray[Any], tuple[float, float, float], npt.NDArray[Any] | None]

IGNORE = "ignore"  # nnU-Net v2's ignore label: its voxels count in no loss term
EXTERNAL = "External"  # the body outline's label: in a partial case it also covers unknown organs
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")  # nnU-Net splits folder names on "_"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise InputError(f"dataset id must be 1..999, got {dataset_id}")
    if not _DATASET_NAME.match(name):
        raise InputError(f"dataset name {name!r} must be letters, digits and '-' only")
    return f"Dataset{dataset_id:03d}_{name}"


def write_raw_dataset(
    raw_root: Path,
    dataset_id: int,
    name: str,
    cases: Iterable[Case],
    labels: Mapping[str, int],
    unknown: Mapping[str, Collection[str]] | None = None,
) -> Path:
    """Write ``cases`` as an nnU-Net raw dataset under ``raw_root``; returns the dataset folder.

    Parameters
    ----------
    raw_root
        The ``nnUNet_raw`` folder (for training: ``children.nnunet_dirs(work_dir).raw``).
    dataset_id, name
        Give the folder name ``DatasetXXX_Name``.
    cases
        ``(case_id, image_zyx, spacing_zyx, labels_zyx)`` in canonical orientation;
        ``image_zyx`` in HU. Cases without labels go to ``imagesTs``.
    labels
        ``dataset.json`` labels, ``{"background": 0, name: id, ...}``; every label
        array may only contain these ids.
    unknown
        Case id → structures nobody contoured in that case (``case.json`` "unknown").
        Such a case's unlabelled and External voxels inside the body become the
        ignore label (see :func:`mark_unknown`), and ``dataset.json`` then declares
        ``"ignore"`` as the highest id, so nnU-Net's loss skips them.
    """
    labels = _checked_labels(labels)
    partial = _checked_unknown(unknown or {}, labels)
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    had_ignore = _check_existing_labels(folder / "dataset.json", labels)
    ignore = max(labels.values()) + 1
    if partial and ignore > 255:
        raise InputError("no uint8 label id left for the ignore label: at most 254 labels with partial cases")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    allowed = np.array(sorted(labels.values()))
    n_training, seen = 0, set[str]()
    for case_id, image, spacing, label in cases:
        _check_case(case_id, image, spacing, label, seen)
        if label is None:
            _write(folder / "imagesTs" / f"{case_id}_0000.nii.gz", _hu(image), spacing)
            continue
        foreign = np.setdiff1d(np.unique(label), allowed)
        if foreign.size:
            raise InputError(f"case {case_id}: label values {foreign.tolist()} are not in the label table")
        if case_id in partial:
            label = mark_unknown(label, image, spacing, labels.get(EXTERNAL), ignore)
            had_ignore = True
        _write(folder / "imagesTr" / f"{case_id}_0000.nii.gz", _hu(image), spacing)
        _write(folder / "labelsTr" / f"{case_id}.nii.gz", label.astype(np.uint8), spacing)
        n_training += 1
    if n_training == 0:
        raise InputError("no labelled case: nothing to train on")
    doc = {
        "channel_names": {"0": "CT"},
        "labels": {**labels, IGNORE: ignore} if had_ignore else labels,
        "numTraining": len(list((folder / "labelsTr").glob("*.nii.gz"))),
        "file_ending": ".nii.gz",
        "name": name,
    }
    (folder / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    return folder


def mark_unknown(
    label: npt.NDArray[Any],
    image: npt.NDArray[Any],
    spacing: tuple[float, float, float],
    external: int | None,
    ignore: int,
) -> npt.NDArray[np.uint8]:
    """A partial case's label map with every voxel an unknown structure could occupy set to ``ignore``.

    Those are the voxels inside the body (the labelled voxels and the body
    outline found on the CT, :func:`rtseg.body.body_mask`) that carry no
    contoured organ: background or External, since a clinician's BODY contour
    covers the organs nobody drew. Outside the body every structure is truly
    absent, so background stays background there; contoured organs stay as they are.
    """
    out = label.astype(np.uint8)
    body = body_mask(image, spacing) | (out > 0)
    free = out == 0
    if external is not None:
        free |= out == external
    out[body & free] = ignore
    return out


def _checked_unknown(unknown: Mapping[str, Collection[str]], labels: dict[str, int]) -> set[str]:
    """Ids of the cases with unknown structures; every structure named must be in the label table."""
    for case_id, names in unknown.items():
        foreign = sorted(set(names) - set(labels) - {"background"})
        if foreign:
            raise InputError(f"case {case_id}: unknown structures {foreign} are not in the label table")
    return {case_id for case_id, names in unknown.items() if names}


def _checked_labels(labels: Mapping[str, int]) -> dict[str, int]:
    out = {str(k): int(v) for k, v in labels.items()}
    if out.get("background") != 0:
        raise InputError("labels must map 'background' to 0")
    values = sorted(out.values())
    if values != list(range(len(values))):
        raise InputError(f"label ids must be consecutive from 0, got {values}")
    if max(values) > 255:
        raise InputError("at most 255 foreground labels")
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def _check_existing_labels(path: Path, labels: dict[str, int]) -> bool:
    """Data added to an existing dataset must use the same label table; True if it declares ``ignore``."""
    if not path.is_file():
        return False
    old = dict(json.loads(path.read_text()).get("labels") or {})
    had_ignore = old.pop(IGNORE, None) is not None
    if old != labels:
        raise InputError(f"labels {labels} differ from those of the existing dataset {old}", source=str(path))
    return had_ignore


def _check_case(
    case_id: str,
    image: npt.NDArray[Any],
    spacing: tuple[float, float, float],
    label: npt.NDArray[Any] | None,
    seen: set[str],
) -> None:
    if not _CASE_ID.match(case_id):
        raise InputError(f"case id {case_id!r} must be letters, digits, '_' and '-' only")
    if case_id in seen:
        raise InputError(f"duplicate case id {case_id!r}")
    seen.add(case_id)
    if image.ndim != 3:
        raise InputError(f"case {case_id}: image must be 3-D [z, y, x], got shape {image.shape}")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise InputError(f"case {case_id}: spacing must be three positive numbers, got {spacing}")
    if label is not None and label.shape != image.shape:
        raise InputError(f"case {case_id}: labels shape {label.shape} differs from image {image.shape}")


def _hu(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Integer HU stay int16 (half the disk of float32); anything else becomes float32."""
    if np.issubdtype(image.dtype, np.integer):
        if image.min() < -32768 or image.max() > 32767:
            raise InputError("integer HU values outside the int16 range")
        return image.astype(np.int16)
    return image.astype(np.float32)


def _write(path: Path, array: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))  # array [z, y, x] → ITK (x, y, z)
    # SimpleITK's setters carry no type hints.
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))  # type: ignore[no-untyped-call]
    image.SetOrigin((0.0, 0.0, 0.0))  # type: ignore[no-untyped-call]
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # canonical [z, y, x] = ITK's LPS identity
    image.SetDirection(identity)  # type: ignore[no-untyped-call]
    sitk.WriteImage(image, str(path), useCompression=True)
