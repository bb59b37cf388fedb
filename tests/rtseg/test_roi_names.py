"""Clinical ROI names → TG-263 (rtseg.roi_names) and ``rtseg cases names``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from rtseg.errors import InputError
from rtseg.roi_names import (
    AMBIGUOUS,
    COMBINED,
    IGNORED,
    MAPPED,
    REJECTED,
    UNKNOWN,
    RoiNameMapper,
    load_site_names,
    rois_of,
    survey,
)

RTSEG = [sys.executable, "-m", "rtseg_app"]
TABLE = Path(__file__).parents[1] / "data" / "roi_names.tsv"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MEASURED_RECALL = 183 / 184  # docs/federation.md, "ROI names"


def taken(name: str, rtype: str | None = None) -> tuple[str, str | None]:
    d = RoiNameMapper().decide(name, rtype)
    return d.kind, d.structure


@pytest.mark.parametrize(
    ("name", "structure"),
    [
        ("Kidney_L", "Kidney_L"),
        ("Kidney Lt", "Kidney_L"),
        ("Lt Kidney", "Kidney_L"),
        ("L_Kidney", "Kidney_L"),
        ("KidneyL", "Kidney_L"),
        ("Left Kidney", "Kidney_L"),
        ("Niere links", "Kidney_L"),
        ("Nier li", "Kidney_L"),
        ("Niere Lks", "Kidney_L"),
        ("Ren sin", "Kidney_L"),
        ("Rechternier", "Kidney_R"),
        ("Long re", "Lung_R"),
        ("Lunge rechts", "Lung_R"),
        ("Lung Rt", "Lung_R"),
        ("RtLung", "Lung_R"),
        ("Pulmo dx", "Lung_R"),
        ("LUNG_LT", "Lung_L"),
    ],
)
def test_laterality_in_every_form_and_language(name: str, structure: str) -> None:
    assert taken(name) == (MAPPED, structure)


@pytest.mark.parametrize(
    ("name", "structure"),
    [
        ("LIVER", "Liver"),
        ("Lever", "Liver"),
        ("Leber", "Liver"),
        ("Milt", "Spleen"),
        ("Magen", "Stomach"),
        ("Spinal Cord", "SpinalCord"),
        ("Rückenmark", "SpinalCord"),
        ("Oesophagus", "Esophagus"),
        ("Speiseroehre", "Esophagus"),
        ("Dünndarm", "Bowel_Small"),
        ("Galblaas", "Gallbladder"),
        ("Herz", "Heart"),
        ("Wirbelkörper", "VBs"),
        ("IVC", "V_Venacava_I"),
        ("BODY", "External"),
        ("Body contour", "External"),
        ("Huid", "External"),
        ("Körper", "External"),
        ("Koerper", "External"),
        ("Liver_1", "Liver"),
    ],
)
def test_languages_accents_and_numbering(name: str, structure: str) -> None:
    assert taken(name) == (MAPPED, structure)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("z_PRV_Cord", "derived: starts with 'z_'"),
        ("zzLiver", "derived: starts with 'zz'"),
        ("_avoid", "derived: starts with '_'"),
        ("opt_PTV", "derived: starts with 'opt_'"),
        ("PTV_45", "derived: contains 'PTV'"),
        ("Body-PTV", "derived: contains 'PTV'"),
        ("Lungs-GTV", "derived: contains 'GTV'"),
        ("SpinalCord_PRV05", "derived: contains 'PRV'"),
        ("Ring_PTV", "derived: starts with 'Ring_'"),
        ("Liver+3mm", "derived: margin or dose '3mm'"),
        ("Cord+5", "derived: Boolean expression"),
        ("Liver-Stomach", "derived: Boolean expression"),
        ("Liver_exp", "derived: contains 'exp'"),
        ("Isodose 95%", "derived: contains 'isodose'"),
        ("CouchSurface", "derived: contains 'couch'"),
        ("Artefact", "derived: contains 'artefact'"),
    ],
)
def test_derived_structures_are_rejected_with_the_reason(name: str, reason: str) -> None:
    d = RoiNameMapper().decide(name)
    assert (d.kind, d.structure, d.reason) == (REJECTED, None, reason)


@pytest.mark.parametrize(
    "name", ["Kidneys", "Lungs", "Nieren", "Longen", "Lungs total", "Kidney_L+R", "Lung_Both"]
)
def test_left_and_right_together_are_reported_not_guessed(name: str) -> None:
    d = RoiNameMapper().decide(name)
    assert d.kind == COMBINED and d.structure is None
    assert d.reason.startswith("combined left+right (") and d.reason.endswith("): not mapped")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("Kidney", AMBIGUOUS), ("SC", AMBIGUOUS), ("Vena cava", AMBIGUOUS), ("Bowel", AMBIGUOUS)]
    + [("Livr", UNKNOWN), ("Kidny_L", UNKNOWN), ("Lung_L_V20", UNKNOWN), ("Rectum", UNKNOWN)],
)
def test_unclear_names_and_typos_are_never_guessed(name: str, kind: str) -> None:
    assert taken(name) == (kind, None)


def test_two_rois_of_one_case_on_one_structure_are_both_ambiguous() -> None:
    decisions = RoiNameMapper().map_case(
        [("LIVER", None), ("Lever", None), ("Nier li", "ORGAN"), ("BODY", None)]
    )
    kinds = {d.roi: (d.kind, d.structure) for d in decisions}
    assert kinds == {
        "LIVER": (AMBIGUOUS, None),
        "Lever": (AMBIGUOUS, None),
        "Nier li": (MAPPED, "Kidney_L"),
        "BODY": (MAPPED, "External"),
    }
    assert decisions[0].reason == "ambiguous: 'LIVER', 'Lever' all map to Liver in one structure set"
    # each on its own structure set: no ambiguity
    assert [d.kind for d in RoiNameMapper().map_case([("Lever", None)])] == [MAPPED]


def test_interpreted_type_rejects_targets_keeps_avoidance_and_names_the_external() -> None:
    assert taken("Liver", "PTV") == (REJECTED, None)
    assert taken("Heart", "CTV") == (REJECTED, None)
    assert taken("Couchtop", "SUPPORT") == (REJECTED, None)
    assert taken("Lt Lung", "AVOIDANCE") == (MAPPED, "Lung_L")  # Eclipse types OARs AVOIDANCE
    assert taken("Outline_Pt", "EXTERNAL") == (MAPPED, "External")
    assert RoiNameMapper().decide("Outline_Pt", "EXTERNAL").reason == "RT ROI Interpreted Type EXTERNAL"
    assert taken("Outline_Pt", "ORGAN") == (UNKNOWN, None)
    assert taken("Heart", "EXTERNAL") == (UNKNOWN, None)  # the name and the type disagree
    assert taken("Body-PTV", "EXTERNAL") == (REJECTED, None)


def test_a_model_without_the_structure_maps_nothing_to_it() -> None:
    d = RoiNameMapper(structures=["External", "Liver"]).decide("Nier li")
    assert (d.kind, d.structure) == (UNKNOWN, None)
    assert d.reason.startswith("Kidney_L is not a structure of the model")


def test_site_mapping_file_overrides_and_ignores(tmp_path: Path) -> None:
    site = tmp_path / "roi-names.toml"
    site.write_text(
        'ignore = ["Lever_oud", "BODY"]\n\n[roi_names]\n'
        '"Nier_L_lokal" = "Kidney_L"\n"z_Lever_def" = "Liver"\n'
    )
    mapper = RoiNameMapper(site=load_site_names(site))
    d = mapper.decide("NIER-L-LOKAL")  # compared after normalising
    assert (d.kind, d.structure) == (MAPPED, "Kidney_L")
    assert d.reason == "site mapping file: 'nier l lokal' → Kidney_L (roi-names.toml)"
    assert (mapper.decide("z_Lever_def").kind, mapper.decide("z_Lever_def").structure) == (MAPPED, "Liver")
    assert mapper.decide("BODY").kind == IGNORED  # wins over the built-in synonym
    assert mapper.decide("Lever_oud").reason == "site mapping file: ignore (roi-names.toml)"
    assert mapper.decide("Lever").structure == "Liver"  # the built-in table still applies
    assert RoiNameMapper().decide("Nier_L_lokal").kind == UNKNOWN  # without the site file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[roi_names]\n"Nier" = "Kidney_Left"\n', "'Nier' = 'Kidney_Left': not a structure"),
        ("[roi_names]\nLever = 3\n", "'Lever' = 3: not a structure"),
        ('ignore = "Lever"\n', "ignore must be a list of ROI names"),
        ('[names]\n"Lever" = "Liver"\n', "unknown key 'names'"),
        ('ignore = ["Lever"]\n[roi_names]\nLEVER = "Liver"\n', "'lever' is both mapped and ignored"),
        ("[roi_names\n", "not valid TOML"),
    ],
)
def test_bad_site_mapping_file_is_an_input_error_naming_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(text)
    with pytest.raises(InputError) as info:
        load_site_names(site)
    assert info.value.source == str(site) and message in info.value.message


def _table() -> list[tuple[str, str]]:
    lines = TABLE.read_text(encoding="utf-8").splitlines()
    return [(cols[0], cols[1]) for cols in (line.split("\t") for line in lines if not line.startswith("#"))]


def test_measured_precision_is_one_and_recall_holds() -> None:
    """Precision = correct mappings / mappings made; recall = correct mappings / names that should map."""
    rows = _table()
    assert len(rows) >= 200 and len({name for name, _ in rows}) == len(rows)
    mapper = RoiNameMapper()
    made = [(name, want, mapper.decide(name).structure) for name, want in rows]
    mapped = [m for m in made if m[2] is not None]
    correct = [m for m in mapped if m[1] == m[2]]
    should = [m for m in made if m[1] != "-"]
    precision, recall = len(correct) / len(mapped), len(correct) / len(should)
    print(
        f"\nROI names: {len(rows)} names, {len(should)} should map; {len(mapped)} mapped, "
        f"{len(correct)} correctly: precision {precision:.3f}, recall {recall:.3f}"
    )
    print("missed: " + ", ".join(repr(name) for name, want, got in made if want != "-" and got != want))
    assert [m for m in mapped if m[1] != m[2]] == []  # a wrong label poisons training
    assert precision == 1.0
    assert recall >= MEASURED_RECALL - 0.01


def test_real_eclipse_structure_set(realct: Path) -> None:
    """Varian Eclipse: BODY typed EXTERNAL, OARs typed AVOIDANCE or ORGAN, targets CTV/GTV."""
    ds = pydicom.dcmread(realct / "eclipse_rtstruct" / "rtss.dcm", stop_before_pixels=True)
    rois = rois_of(ds)
    assert ("Lt Lung", "AVOIDANCE") in rois and ("BODY", "EXTERNAL") in rois
    decisions = {d.roi: d for d in RoiNameMapper().map_case(rois)}
    assert {d.roi: d.structure for d in decisions.values() if d.kind == MAPPED} == {
        "BODY": "External",
        "Heart": "Heart",
        "Lt Lung": "Lung_L",
    }
    assert decisions["Breast"].reason == "derived: RT ROI Interpreted Type GTV"
    assert decisions["Tumor Bed"].reason == "derived: RT ROI Interpreted Type CTV"
    assert {decisions[n].kind for n in ("Areola", "Nodes", "Scar")} == {UNKNOWN}


# -- rtseg cases names --------------------------------------------------------------------------
def write_structure_set(path: Path, rois: list[tuple[str, str]], *, preamble: bool = True) -> None:
    """A minimal RTSTRUCT with these (name, interpreted type) ROIs, one contour each, a patient's name."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTSTRUCT, generate_uid(), "RTSTRUCT"
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-8812345"
    ds.StructureSetROISequence = Sequence()
    ds.RTROIObservationsSequence = Sequence()
    ds.ROIContourSequence = Sequence()
    for number, (name, rtype) in enumerate(rois, start=1):
        roi, observation, contour = Dataset(), Dataset(), Dataset()
        roi.ROINumber, roi.ROIName = number, name
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType = rtype
        item = Dataset()
        item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", 3
        item.ContourData = [0, 0, 0, 10, 0, 0, 0, 10, 0]
        contour.ReferencedROINumber, contour.ContourSequence = number, Sequence([item])
        ds.StructureSetROISequence.append(roi)
        ds.RTROIObservationsSequence.append(observation)
        ds.ROIContourSequence.append(contour)
    _save(ds, path, preamble)


def _save(ds: Dataset, path: Path, preamble: bool) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)


def department_export(root: Path) -> None:
    """Three patients' structure sets in a messy export, with a CT slice and two files that are not DICOM."""
    write_structure_set(
        root / "pat1" / "RS.1.dcm",
        [("BODY", "EXTERNAL"), ("LIVER", "ORGAN"), ("Nier li", "AVOIDANCE"), ("z_PRV_Cord", "CONTROL")],
    )
    write_structure_set(
        root / "pat2" / "plan" / "RTSTRUCT_0001",  # no .dcm
        [
            ("Body", "EXTERNAL"),
            ("Lever", "ORGAN"),
            ("LIVER", "ORGAN"),
            ("Kidneys", "ORGAN"),
            ("PTV_45", "PTV"),
        ],
    )
    write_structure_set(  # an archive's file without the DICOM preamble
        root / "pat3" / "rs", [("External", ""), ("LIVER", ""), ("Nier_L_lokal", "")], preamble=False
    )
    ct = Dataset()
    ct.SOPClassUID, ct.SOPInstanceUID, ct.Modality, ct.PatientName = (
        CT_IMAGE,
        generate_uid(),
        "CT",
        "Doe^Jane",
    )
    _save(ct, root / "pat1" / "CT.1.dcm", True)
    ct.SOPInstanceUID = generate_uid()
    _save(ct, root / "pat1" / "CT2", False)  # DICOM without the preamble: passed over, not unreadable
    (root / "pat1" / "notes.txt").write_text("plan notes")
    (root / "pat2" / "broken.dcm").write_bytes((root / "pat1" / "RS.1.dcm").read_bytes()[:300])


def test_cases_names_lists_every_roi_name_with_its_mapping_and_reason(tmp_path: Path) -> None:
    department_export(tmp_path / "export")
    run = subprocess.run(
        [*RTSEG, "cases", "names", "--from", str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    lines = out.splitlines()
    assert lines[0] == f"ROI names in 3 RTSTRUCT(s) under {tmp_path / 'export'} (built-in TG-263 synonyms)"
    rows = [" ".join(line.split()) for line in lines[2:]]
    assert "2 LIVER → Liver synonym 'liver' → Liver" in rows  # alone in its set in pat1 and pat3
    assert "1 Nier li → Kidney_L synonym 'nier li' → Kidney_L" in rows
    assert "1 BODY → External synonym 'body' → External" in rows
    assert "1 LIVER → ambiguous ambiguous: 'Lever', 'LIVER' all map to Liver in one structure set" in rows
    assert "1 Kidneys → combined combined left+right (Kidney_L and Kidney_R): not mapped" in rows
    assert "1 z_PRV_Cord → rejected derived: RT ROI Interpreted Type CONTROL" in rows
    assert "1 PTV_45 → rejected derived: RT ROI Interpreted Type PTV" in rows
    assert "1 Nier_L_lokal → unknown unknown" in rows
    # mapped first, in structure order; unknown last
    order = [r.split(" → ")[1].split()[0] for r in rows if " → " in r]
    assert order.index("External") < order.index("Liver") < order.index("Kidney_L") < order.index("ambiguous")
    assert order[-1] == "unknown"
    assert "unreadable: pat1/notes.txt: not a DICOM file" in lines
    assert (
        "unreadable: pat2/broken.dcm: incomplete RTSTRUCT: no StructureSetROISequence (truncated?)" in lines
    )
    assert (
        "summary: 10 distinct ROI name(s) in 3 RTSTRUCT(s): "
        "5 mapped, 2 ambiguous, 1 combined, 2 rejected, 1 unknown" in lines
    )
    assert "structure sets giving each structure: External 3, Liver 2, Kidney_L 1" in lines
    assert "files: 7 looked at, 2 unreadable" in lines
    assert "Doe" not in out + run.stderr and "PID-8812345" not in out + run.stderr
    assert "Traceback" not in run.stderr


def test_cases_names_lists_damaged_and_hostile_files_as_unreadable(tmp_path: Path) -> None:
    """A damaged Deflate structure set and sequences nested 100,000 deep (pydicom: zlib.error and
    RecursionError, which ended the survey with a traceback) are listed with the reason, and so is a
    Deflate bomb (which pydicom inflated whole)."""
    from dicom_bombs import damaged_deflate, write_deflate_bomb, write_nested_sequences

    department_export(tmp_path / "export")
    damaged = damaged_deflate(pydicom.dcmread(tmp_path / "export" / "pat1" / "RS.1.dcm"))
    (tmp_path / "export" / "pat2" / "deflated.dcm").write_bytes(damaged)
    write_nested_sequences(
        tmp_path / "export" / "nested.dcm", 100_000, "1.2.826.0.1.3680043.10.1234.5.7", "1.2.3.19"
    )
    write_deflate_bomb(tmp_path / "export" / "bomb.dcm", 1100, "1.2.826.0.1.3680043.10.1234.4.10", "1.2.3.21")
    found = survey(tmp_path / "export", RoiNameMapper())
    assert ("pat2/deflated.dcm", "malformed DICOM (zlib.error)") in found.unreadable
    assert ("nested.dcm", "malformed DICOM (RecursionError)") in found.unreadable
    assert ("bomb.dcm", "the Deflate data set inflates to more than 1024 MB") in found.unreadable
    assert len(found.structure_sets) == 3  # the readable structure sets as before


def test_cases_names_applies_the_site_mapping_file(tmp_path: Path) -> None:
    department_export(tmp_path / "export")
    site = tmp_path / "roi-names.toml"
    site.write_text('ignore = ["Kidneys"]\n[roi_names]\n"Nier_L_lokal" = "Kidney_L"\n')
    run = subprocess.run(
        [*RTSEG, "cases", "names", "--from", str(tmp_path / "export"), "--mapping", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    rows = [" ".join(line.split()) for line in run.stdout.splitlines()]
    assert f"(built-in TG-263 synonyms, site file {site})" in run.stdout.splitlines()[0]
    assert "1 Nier_L_lokal → Kidney_L site mapping file: 'nier l lokal' → Kidney_L (roi-names.toml)" in rows
    assert "1 Kidneys → ignored site mapping file: ignore (roi-names.toml)" in rows
    assert "structure sets giving each structure: External 3, Liver 2, Kidney_L 2" in rows


def test_cases_names_reports_a_bad_mapping_file_or_folder_in_one_line(tmp_path: Path) -> None:
    site = tmp_path / "roi-names.toml"
    site.write_text('[roi_names]\n"Nier" = "Kidney"\n')
    (tmp_path / "export").mkdir()
    run = subprocess.run(
        [*RTSEG, "cases", "names", "--from", str(tmp_path / "export"), "--mapping", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.startswith(
        f"rtseg cases: error: {site}: [roi_names] 'Nier' = 'Kidney': not a structure ("
    )
    assert len(run.stderr.splitlines()) == 1
    run = subprocess.run(
        [*RTSEG, "cases", "names", "--from", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (run.returncode, run.stderr) == (2, f"rtseg cases: error: {tmp_path / 'missing'}: not a folder\n")
