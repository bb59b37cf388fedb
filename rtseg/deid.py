"""De-identification of CT slices copied into a site's training cases.

DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile, with the
Retain Longitudinal Temporal Information with Modified Dates option, through
``dicognito`` (a maintained, pydicom-only anonymiser) plus what it leaves:

* every UID except class and transfer syntax UIDs is replaced by a hash of the
  site's secret and the UID, so one source UID always becomes one new UID, in
  every file and every run: series, study and frame of reference relations and
  the references between slices hold (dicognito);
* person names, IDs, addresses, equipment and institution are replaced, dates
  and times shifted by one secret offset (dicognito);
* then the patient's name and ID become the case's pseudonym, the birth date
  is emptied, private elements and the profile's free-text and "X" attributes
  below are removed, and the profile's codes are recorded in the data set.

Geometry is never touched: ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness, PatientPosition and the pixel data are copied as
they are. The secret lives in the import index (outside the case folders).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

# PS3.15 Table E.1-1 attributes with action X (remove) or Z (empty) that dicognito does not
# replace by a generated value: free text, descriptions and history can name the patient.
_REMOVE = (
    "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "Arbitrary",
    "AuthorObserverSequence",
    "CommentsOnThePerformedProcedureStep",
    "ContributionDescription",
    "DerivationDescription",
    "ImageComments",
    "InterpretationText",
    "MedicalAlerts",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientComments",
    "PatientState",
    "PerformedProcedureStepDescription",
    "ReferencedPatientSequence",
    "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence",
    "RequestAttributesSequence",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription",
    "SeriesDescription",
    "StudyDescription",
    "TextComments",
    "TextString",
    "TopicAuthor",
    "TopicKeywords",
    "TopicSubject",
    "TopicTitle",
)
_EMPTY = ("PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge", "PatientWeight", "PatientSize")
# DICOM PS3.16 CID 7050: the profile and the option applied
_METHODS = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)


class Deidentifier:
    """De-identifies the data sets of one output folder with one secret.

    Parameters
    ----------
    secret
        The import index's secret: the same secret maps the same source UID to
        the same new UID, and shifts dates by the same offset, in every run.
    """

    def __init__(self, secret: str) -> None:
        self._anonymizer = Anonymizer(seed=secret)

    def apply(self, ds: Dataset, pseudonym: str) -> None:
        """De-identify ``ds`` (file meta included) in place; ``pseudonym`` becomes name and ID."""
        self._anonymizer.anonymize(ds)
        ds.remove_private_tags()
        for keyword in _REMOVE:
            if keyword in ds:
                delattr(ds, keyword)
        for keyword in _EMPTY:
            if keyword in ds:
                ds[keyword].value = ""
        ds.PatientName = pseudonym
        ds.PatientID = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "rtseg: PS3.15 Basic Profile (dicognito), dates shifted"
        ds.DeidentificationMethodCodeSequence = Sequence([_code(v, m) for v, m in _METHODS])


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def copy_deidentified(source: Path, target: Path, deid: Deidentifier, pseudonym: str) -> None:
    """Read one DICOM file, de-identify it and write it to ``target``."""
    ds = pydicom.dcmread(source)
    deid.apply(ds, pseudonym)
    ds.save_as(target, enforce_file_format=True)
