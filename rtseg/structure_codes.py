"""SNOMED CT codes of the 19 structures, for the segment descriptions of a DICOM SEG.

One row per TG-263 name of :data:`rtseg.structures.STRUCTURES`: the segmented
property type (SNOMED CT, scheme ``SCT``) and, for paired organs, the laterality
that goes into the type modifier. Every structure is in the category "Anatomical
Structure" (SCT 91723000, DICOM CID 7150).

Sources: the DICOM standard's code tables as pydicom ships them
(``pydicom.sr.codedict.codes.SCT``, PS3.16 CID 7151 "Segmentation Property
Types"), and the AAPM TG-263 → SNOMED CT map of HL7's mCODE implementation guide
for ``A_Aorta`` (15825003 "Aorta", not the abdominal aorta) and ``VBs``
(3572006 "Structure of body of vertebra", which PS3.16 does not list).
``External``, the patient's body outline, is 38266002 "Entire body" (CID 7151).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """A coded concept: value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class StructureCode:
    """How one structure is described in a SEG: property type and optional laterality."""

    type: Code
    laterality: Code | None = None


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")  # CID 7150 category
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")

STRUCTURE_CODES: dict[str, StructureCode] = {
    "External": StructureCode(_sct("38266002", "Entire body")),
    "Liver": StructureCode(_sct("10200004", "Liver")),
    "Spleen": StructureCode(_sct("78961009", "Spleen")),
    "Kidney_L": StructureCode(_sct("64033007", "Kidney"), LEFT),
    "Kidney_R": StructureCode(_sct("64033007", "Kidney"), RIGHT),
    "Stomach": StructureCode(_sct("69695003", "Stomach")),
    "Pancreas": StructureCode(_sct("15776009", "Pancreas")),
    "Duodenum": StructureCode(_sct("38848004", "Duodenum")),
    "Bowel_Small": StructureCode(_sct("30315005", "Small intestine")),
    "Colon": StructureCode(_sct("71854001", "Colon")),
    "Gallbladder": StructureCode(_sct("28231008", "Gallbladder")),
    "Esophagus": StructureCode(_sct("32849002", "Esophagus")),
    "Heart": StructureCode(_sct("80891009", "Heart")),
    "Lung_L": StructureCode(_sct("39607008", "Lung"), LEFT),
    "Lung_R": StructureCode(_sct("39607008", "Lung"), RIGHT),
    "SpinalCord": StructureCode(_sct("2748008", "Spinal cord")),
    "VBs": StructureCode(_sct("3572006", "Vertebral body")),
    "A_Aorta": StructureCode(_sct("15825003", "Aorta")),
    "V_Venacava_I": StructureCode(_sct("64131007", "Inferior vena cava")),
}
# A structure of another model (not in the table): coded by its category alone, as SNOMED's
# "Anatomical structure"; its TG-263 name is the segment label.
UNKNOWN_STRUCTURE = StructureCode(_sct("91723000", "Anatomical Structure"))


def code_for(name: str) -> StructureCode:
    """The SEG coding of structure ``name`` (an unknown name: a generic anatomical structure)."""
    return STRUCTURE_CODES.get(name, UNKNOWN_STRUCTURE)
