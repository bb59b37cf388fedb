"""The fixed structure set of rtseg: TG-263 names, label ids and colours.

Label ids are those of the default model's ``dataset.json``. Label 1
(``External``) marks body voxels that belong to no organ; the External contour
is the union of every non-zero label, so it outlines the whole body.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Structure:
    """One region of interest: TG-263 name, label id, display colour, RT type."""

    name: str
    label: int
    color: tuple[int, int, int]
    rt_type: str = "ORGAN"  # RTROIInterpretedType


STRUCTURES: tuple[Structure, ...] = (
    Structure("External", 1, (0, 255, 0), "EXTERNAL"),
    Structure("Liver", 2, (160, 82, 45)),
    Structure("Spleen", 3, (157, 108, 162)),
    Structure("Kidney_L", 4, (255, 165, 0)),
    Structure("Kidney_R", 5, (255, 215, 0)),
    Structure("Stomach", 6, (255, 182, 193)),
    Structure("Pancreas", 7, (240, 230, 140)),
    Structure("Duodenum", 8, (255, 99, 71)),
    Structure("Bowel_Small", 9, (205, 133, 63)),
    Structure("Colon", 10, (139, 69, 19)),
    Structure("Gallbladder", 11, (0, 128, 0)),
    Structure("Esophagus", 12, (255, 127, 80)),
    Structure("Heart", 13, (220, 20, 60)),
    Structure("Lung_L", 14, (0, 191, 255)),
    Structure("Lung_R", 15, (30, 144, 255)),
    Structure("SpinalCord", 16, (255, 255, 0)),
    Structure("VBs", 17, (245, 222, 179)),
    Structure("A_Aorta", 18, (255, 0, 0)),
    Structure("V_Venacava_I", 19, (0, 0, 255)),
)

BY_NAME: dict[str, Structure] = {s.name: s for s in STRUCTURES}
EXTERNAL = "External"
# Connected pieces of a structure smaller than this (ml) are specks, never anatomy: inference drops
# them (rtseg.model.inference.suppress_islands); the node's default for node.min_island_ml.
MIN_ISLAND_ML = 0.2
OAR_NAMES: tuple[str, ...] = tuple(s.name for s in STRUCTURES if s.name != EXTERNAL)


def dataset_labels() -> dict[str, int]:
    """The ``labels`` entry of an nnU-Net ``dataset.json`` for this structure set."""
    return {"background": 0, **{s.name: s.label for s in STRUCTURES}}


def color_for(name: str) -> tuple[int, int, int]:
    """Fixed colour of a structure; stable for names outside the table too.

    A name we do not know gets a colour from a SHA-256 of the name (never
    Python's salted ``hash()``), so it is the same in every run.
    """
    if name in BY_NAME:
        return BY_NAME[name].color
    digest = hashlib.sha256(name.encode()).digest()
    return (64 + digest[0] % 192, 64 + digest[1] % 192, 64 + digest[2] % 192)
