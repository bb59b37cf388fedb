"""Pseudo-labels: a case's unknown structures filled from a prediction, recorded "filled"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt

from rtseg.cases import load_case
from rtseg.model.manifest import ModelManifest
from rtseg.model.segmenter import Segmentation
from rtseg.phantom.cohort import write_case
from rtseg.pseudo_labels import fill_unknown
from rtseg.structures import STRUCTURES
from rtseg.study.partial import drop_structures
from rtseg.volume import CTVolume

LABEL = {s.name: s.label for s in STRUCTURES}


class GivenPrediction:
    """Stands in for a model whose prediction the test knows exactly: the fill is what is tested."""

    def __init__(self, labels: npt.NDArray[np.uint8]) -> None:
        self.labels = labels
        self.manifest = ModelManifest(name="given", version="0", structures=STRUCTURES)

    def segment(self, volume: CTVolume) -> Segmentation:
        assert volume.shape == self.labels.shape
        return Segmentation(self.labels, self.manifest, 0.0)


def test_fill_sets_unknown_structures_where_predicted_and_keeps_contoured_ones(tmp_path: Path) -> None:
    case_id = write_case("A", 7, 0, tmp_path, matrix=48).case_id
    case_dir = tmp_path / case_id
    (case_dir / "case.json").write_text(json.dumps({"source": "site-import"}))
    truth = load_case(case_dir).labels
    drop_structures(case_dir, {"Liver", "Kidney_L"}, LABEL)
    prediction = truth.copy()
    prediction[truth == LABEL["Liver"]] = LABEL["Stomach"]  # a wrong guess over a contoured organ

    filled = fill_unknown(case_dir, GivenPrediction(prediction))

    labels = load_case(case_dir).labels
    assert np.array_equal(labels[truth == LABEL["Liver"]], truth[truth == LABEL["Liver"]])  # a person's wins
    others = truth != LABEL["Liver"]
    assert np.array_equal(labels[others], truth[others])  # every dropped organ back where predicted
    states = json.loads((case_dir / "case.json").read_text())["structures"]
    assert states["Liver"] == states["Kidney_L"] == states["External"] == "contoured"
    assert sorted(filled) == sorted(n for n in LABEL if n not in ("Liver", "Kidney_L", "External"))
    assert all(states[n] == "filled" for n in filled)
    assert fill_unknown(case_dir, GivenPrediction(prediction)) == []  # nothing unknown is left
