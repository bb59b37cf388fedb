"""TPS-ready RT Structure Sets: build from a label map, write atomically, read back."""

from rtseg.rtstruct.builder import (
    ModelIdentity,
    RTStructResult,
    StructureReport,
    add_description_note,
    add_review_notes,
    amend_description,
    build_rtstruct,
    write_rtstruct,
)
from rtseg.rtstruct.rasterize import rasterize_rtstruct

__all__ = [
    "ModelIdentity",
    "RTStructResult",
    "StructureReport",
    "add_description_note",
    "add_review_notes",
    "amend_description",
    "build_rtstruct",
    "rasterize_rtstruct",
    "write_rtstruct",
]
