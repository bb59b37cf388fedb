"""Load a DICOM CT series (a folder or a list of files) into a :class:`~rtseg.volume.CTVolume`."""

from rtseg.ct.geometry import (
    CT_IMAGE_STORAGE,
    MIN_SLICES,
    SeriesSummary,
    check_instance_size,
    find_series,
    load_series,
    series_uid_of,
    sop_uid_of,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "MIN_SLICES",
    "SeriesSummary",
    "check_instance_size",
    "find_series",
    "load_series",
    "series_uid_of",
    "sop_uid_of",
]
