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
        return np.digitize(array, (-200, 0, 200)).astype(np.uint8)

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


@pytest.fixture(scope="module")
def segmenters() -> tuple[NnunetSegmenter, NnunetSegmenter]:
    """The default model as the node loads it: one prediction, and the shift ensemble."""
    model = default_model_dir()
    return (
        NnunetSegmenter(model, device="cpu", threads=2),
        NnunetSegmenter(model, device="cpu", threads=2, shift_ensemble=True),
    )


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_default_model_shift_ensemble_in_every_patient_position(
    position: str, segmenters: tuple[NnunetSegmenter, NnunetSegmenter], tmp_path: Path
) -> None:
    """The node's setting on the default model: the vote stays on the prediction's voxels in every
    position (each structure's centre within a voxel of the single prediction's) and differs from it
    only at boundaries."""
    from rtseg.ct.load import load_series
    from rtseg.phantom.cohort import write_case

    info = write_case("A", 11, 0, tmp_path, matrix=96, position=position)
    volume = load_series(tmp_path / info.case_id / "ct")
    assert volume.info.patient_position == position
    single = NnunetSegmenter(default_model_dir(), device="cpu", threads=2).segment(volume).labels
    voted = (
        NnunetSegmenter(default_model_dir(), device="cpu", threads=2, shift_ensemble=True)
        .segment(volume)
        .labels
    )
    assert voted.shape == single.shape
    changed = np.count_nonzero(voted != single) / np.count_nonzero(single)
    assert 0 < changed < 0.05
    pixel = np.asarray(volume.spacing)
    for label in np.unique(single[single > 1]):  # organs (1 is the External)
        a, b = np.argwhere(single == label), np.argwhere(voted == label)
        if len(a) < 50:
            continue
        assert len(b) > 0.8 * len(a)
        assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) * pixel < pixel), label
