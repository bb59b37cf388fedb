"""The shift ensemble (rtseg.model.shifts): integer shifts that come back exactly, and the vote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from rtseg.model import shifts
from rtseg.model.default import default_model_dir
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.model.shifts import CORNERS, predict_shift_ensemble, shift_steps, shifted, unshift_labels, vote


def test_shifted_moves_content_by_the_offset_and_repeats_the_edge() -> None:
    a = np.arange(5 * 4 * 3).reshape(5, 4, 3)
    out = shifted(a, (2, 0, -1))
    assert np.array_equal(out[2:, :, :2], a[:3, :, 1:])  # out[i] = a[i - offset]
    assert np.array_equal(out[0], a[0, :, :][:, [1, 2, 2]]) and np.array_equal(out[1], out[0])
    assert np.array_equal(out[:, :, 2], out[:, :, 1])  # the emptied last column repeats its neighbour
    assert a[0, 0, 0] == 0 and out is not a  # the input is left alone
    with pytest.raises(ValueError, match="leaves nothing"):
        shifted(a, (5, 0, 0))


@pytest.mark.parametrize("offset", [(1, 0, 0), (0, 2, 1), (1, 1, 1), (0, -1, 2)])
def test_unshift_brings_labels_back_onto_their_voxels(offset: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, (7, 9, 8)).astype(np.uint8)
    fallback = np.full(labels.shape, 99, np.uint8)
    back = unshift_labels(shifted(labels, offset), offset, fallback)
    valid = np.ones(labels.shape, bool)
    for axis, k in enumerate(offset):
        rows = [slice(None)] * 3
        rows[axis] = slice(labels.shape[axis] - k, None) if k > 0 else slice(0, -k)
        if k:
            valid[tuple(rows)] = False
    assert np.array_equal(back[valid], labels[valid])
    assert np.all(back[~valid] == 99)  # rows the shifted copy never had: the unshifted prediction's


def test_vote_takes_the_majority_and_breaks_ties_toward_the_first_member() -> None:
    first = np.array([1, 1, 2, 3, 4], np.uint8)
    others = [
        np.array([2, 1, 5, 5, 6], np.uint8),
        np.array([2, 1, 5, 5, 7], np.uint8),
        np.array([2, 1, 2, 6, 8], np.uint8),
    ]
    # voxel 0: 2 wins 3-1; 1: all agree; 2: 2 and 5 tie 2-2, the first member says 2;
    # 3: 5 wins 2-1-1; 4: five labels once each, the first member's 4 is among the top
    assert vote([first, *others]).tolist() == [2, 1, 2, 5, 4]
    # a tie the first member is not part of goes to the lowest label
    assert vote([np.array([9], np.uint8), *(np.array([v], np.uint8) for v in (3, 3, 1, 1))]).tolist() == [1]


def test_shift_steps_are_about_half_a_model_voxel() -> None:
    assert shift_steps((4.0, 3.0, 3.0), (2.5, 0.7, 0.7)) == (1, 2, 2)
    assert shift_steps((4.0, 3.0, 3.0), (5.0, 1.5, 1.5)) == (1, 1, 1)  # at least one voxel
    assert shift_steps((4.0, 3.0, 3.0), (1.0, 0.5, 0.5)) == (2, 3, 3)


def test_every_shifted_copy_comes_back_onto_the_unshifted_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A predictor that labels by HU alone moves with the CT: after un-shifting, every copy's labels
    must equal the unshifted ones voxel for voxel (a wrong sign or step would move them)."""
    rng = np.random.default_rng(7)
    hu = rng.normal(0, 300, (12, 20, 18)).astype(np.int16)
    calls: list[npt.NDArray[Any]] = []

    def by_hu(array: npt.NDArray[Any], spacing: tuple[float, float, float]) -> npt.NDArray[np.uint8]:
        calls.append(array)
        return np.asarray(np.digitize(array, (-200, 0, 200)), dtype=np.uint8)

    members: list[npt.NDArray[np.uint8]] = []

    def recorded(given: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
        members.extend(given)
        return vote(given)

    monkeypatch.setattr(shifts, "vote", recorded)
    labels = predict_shift_ensemble(by_hu, hu, (2.0, 1.0, 1.0), (4.0, 3.0, 3.0))
    assert len(calls) == len(CORNERS) == len(members) == 8
    assert len({a.tobytes() for a in calls}) == 8  # eight different copies went to the model
    for member in members:
        assert np.array_equal(member, members[0])
    assert np.array_equal(labels, by_hu(hu, (2.0, 1.0, 1.0)))


def test_a_series_too_thin_to_shift_gets_one_prediction() -> None:
    calls = []

    def predict(array: npt.NDArray[Any], spacing: tuple[float, float, float]) -> npt.NDArray[np.uint8]:
        calls.append(1)
        return np.zeros(array.shape, np.uint8)

    predict_shift_ensemble(predict, np.zeros((1, 8, 8), np.int16), (3.0, 1.0, 1.0), (4.0, 3.0, 3.0))
    assert len(calls) == 1


def test_default_model_shift_ensemble_in_every_patient_position(tmp_path: Path) -> None:
    """The node's setting on the default model: the same CT written in HFS, FFS, HFP and FFP gets the
    same voted labels on the patient; the vote keeps the organs where the single prediction has them
    (no common move of their centres) and differs from it only at boundaries."""
    from rtseg.ct.load import load_series
    from rtseg.phantom.cohort import write_case
    from rtseg.phantom.dicom_io import SeriesSpec, write_ct_series
    from rtseg.volume import Orientation

    info = write_case("A", 11, 0, tmp_path, matrix=96, position="HFS")
    whole = load_series(tmp_path / info.case_id / "ct")
    orientation = Orientation.from_affine(whole.affine)
    hu = orientation.to_canonical(np.asarray(whole.hu))
    middle = hu.shape[0] // 2
    hu = np.ascontiguousarray(hu[middle - 20 : middle + 20])  # 40 slices of the abdomen: one patch
    spacing = orientation.canonical_spacing(whole.spacing)
    model = default_model_dir()
    single_model = NnunetSegmenter(model, device="cpu", threads=2)
    voting_model = NnunetSegmenter(model, device="cpu", threads=2, shift_ensemble=True)
    voted: dict[str, npt.NDArray[np.uint8]] = {}
    for position in ("HFS", "FFS", "HFP", "FFP"):
        volume = write_ct_series(
            hu, spacing, (-70.0, -90.0, 40.0), tmp_path / position, SeriesSpec("vote", position)
        )
        assert volume.info.patient_position == position
        position_orientation = Orientation.from_affine(volume.affine)
        voted[position] = position_orientation.to_canonical(voting_model.segment(volume).labels)
        if position == "HFS":
            single = position_orientation.to_canonical(single_model.segment(volume).labels)
    for position in ("FFS", "HFP", "FFP"):
        assert np.array_equal(voted[position], voted["HFS"]), position
    vote = voted["HFS"]
    changed = np.count_nonzero(vote != single) / np.count_nonzero(single)
    assert 0 < changed < 0.05
    organs = [
        int(label) for label in np.unique(single) if label > 1 and np.count_nonzero(single == label) >= 50
    ]
    assert len(organs) >= 8  # an abdomen: most organs are in the slab
    moved = []
    for label in organs:  # 1 is the External
        a, b = np.argwhere(single == label), np.argwhere(vote == label)
        assert len(b) > 0.8 * len(a), label
        moved.append(b.mean(axis=0) - a.mean(axis=0))
    # a shifted copy put back one voxel off would move every organ the same way
    assert np.all(np.abs(np.median(moved, axis=0)) < 0.5), moved
    assert np.all(np.abs(moved) < 2.0), moved  # voxels; a thin organ's end slices may come or go
