"""The one error hierarchy of rtseg.

Every error a user can cause or meet derives from :class:`RtsegError`; the CLI,
the DICOM node and the HTTP service translate these (and only these) into a
message, a DIMSE status or a problem response, each in one place.
"""

from __future__ import annotations


class RtsegError(Exception):
    """Base class: a problem rtseg can explain to its user in one sentence."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source  # file or directory the problem is about, if any

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message


class InputError(RtsegError):
    """The input (CT series, file, archive, configuration value) is not usable."""


class ModelError(RtsegError):
    """A model folder is missing, incomplete or cannot be loaded or run."""


class RTStructError(RtsegError):
    """An RTSTRUCT cannot be built from the given segmentation."""


class SegError(RtsegError):
    """A DICOM Segmentation cannot be built from the given segmentation."""


class FederationError(RtsegError):
    """A federation cannot start, a round cannot complete, or a site's data does not fit."""


class TooLargeError(InputError):
    """One input object is, inflates or decodes to more than a configured size bound.

    ``inflated`` tells a Deflate stream that grows beyond the bound (a decompression
    bomb) from an object that is simply too large.
    """

    def __init__(self, message: str, *, source: str | None = None, inflated: bool = False) -> None:
        super().__init__(message, source=source)
        self.inflated = inflated


class RegionError(InputError):
    """The series does not show the body region the model contours (a head for an abdominal model)."""
