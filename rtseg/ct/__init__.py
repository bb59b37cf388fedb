"""Load a DICOM CT series (a folder or a list of files) into a :class:`~rtseg.volume.CTVolume`.

Two passes keep a 300-800 slice series fast and small in memory:

1. every candidate file's header is parsed once, without its pixel data; the files
   are grouped by SeriesInstanceUID, non-image objects (RTDOSE, RTSTRUCT, SR ...)
   and scouts are set aside, one CT series is chosen and its geometry checked;
2. the chosen slices are read in sorted order, decoded once each (native or
   compressed, through pydicom's pixel handlers) and written into a
   preallocated volume in Hounsfield units.

Every problem with the input is raised as :class:`~rtseg.errors.InputError`
naming the file or folder. Logs carry counts, shortened UIDs and timings only.

Modules, in import order (each imports only those before it):
:mod:`~rtseg.ct.header` (one file's header), :mod:`~rtseg.ct.geometry`,
:mod:`~rtseg.ct.scan` (pass 1), :mod:`~rtseg.ct.pixels` (pass 2) and
:mod:`~rtseg.ct.load` (the public API, re-exported here).
"""

from rtseg.ct.header import (
    CT_IMAGE_STORAGE,
    READ_ERRORS,
    SeriesSummary,
    check_deflated_file,
    series_uid_of,
    sop_uid_of,
)
from rtseg.ct.load import MIN_SLICES, check_instance_size, check_stack, find_series, load_series, read_head

__all__ = [
    "CT_IMAGE_STORAGE",
    "MIN_SLICES",
    "READ_ERRORS",
    "SeriesSummary",
    "check_deflated_file",
    "check_instance_size",
    "check_stack",
    "find_series",
    "load_series",
    "read_head",
    "series_uid_of",
    "sop_uid_of",
]
