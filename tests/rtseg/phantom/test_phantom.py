"""The synthetic cohort: geometry in every patient position, determinism, anatomy, centers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtseg.cases import load_case
from rtseg.phantom import anatomy
from rtseg.phantom.cohort import (
    CENTERS,
    SHIFT_FACTORS,
    CenterSpec,
    make_case,
    read_label_image,
    shifted_center,
    write_case,
)
from rtseg.structures import BY_NAME, STRUCTURES
from rtseg.volume import Orientation

MATRIX = 96  # small images keep the suite fast; geometry is the same at 512


@pytest.fixture(scope="module")
def positions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("positions")
    for position in ("HFS", "FFS", "HFP", "FFP"):
        write_case("A", 3, 0, out, matrix=MATRIX, position=position)
    return out


def _centroid_lps(labels: np.ndarray, affine: np.ndarray, label: int) -> np.ndarray:
    k, j, i = (v.mean() for v in np.nonzero(labels == label))
    return (affine @ np.array([i, j, k, 1.0]))[:3]


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_geometry_consistent_with_patient_position(positions_dir: Path, position: str) -> None:
    case_dir = positions_dir / f"A_s3_000_{position}"
    files = sorted((case_dir / "ct").glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert first.PatientPosition == position
    iop = [float(v) for v in first.ImageOrientationPatient]
    expected = {
        "HFS": [1, 0, 0, 0, 1, 0],
        "FFS": [-1, 0, 0, 0, 1, 0],
        "HFP": [-1, 0, 0, 0, -1, 0],
        "FFP": [1, 0, 0, 0, -1, 0],
    }[position]
    assert iop == expected
    case = load_case(case_dir)  # the labels are checked against the CT grid here
    labels, affine = case.labels, case.volume.affine
    # Anatomy is where it belongs in patient coordinates, whatever the position:
    liver = _centroid_lps(labels, affine, BY_NAME["Liver"].label)
    spleen = _centroid_lps(labels, affine, BY_NAME["Spleen"].label)
    heart = _centroid_lps(labels, affine, BY_NAME["Heart"].label)
    cord = _centroid_lps(labels, affine, BY_NAME["SpinalCord"].label)
    assert liver[0] < spleen[0], "liver must be on the patient's right (−x), spleen on the left"
    assert heart[2] > liver[2], "heart must be superior (+z) to the liver"
    assert cord[1] > liver[1], "spinal cord must be posterior (+y) to the liver"


def test_same_anatomy_in_every_position(positions_dir: Path) -> None:
    canonical = {}
    for position in ("HFS", "FFS", "HFP", "FFP"):
        case = load_case(positions_dir / f"A_s3_000_{position}")
        canonical[position] = case.canonical()[2]
    # Head-first or feet-first changes only how the scanner stores the images.
    assert np.array_equal(canonical["HFS"], canonical["FFS"])
    assert np.array_equal(canonical["HFP"], canonical["FFP"])
    # Prone flattens the body on the table side; the organs stay where they are.
    liver = BY_NAME["Liver"].label
    sup, pro = canonical["HFS"] == liver, canonical["HFP"] == liver
    assert 2 * (sup & pro).sum() / (sup.sum() + pro.sum()) > 0.9


def test_deterministic_per_seed_and_varied_across_seeds() -> None:
    a = make_case("B", 11, 2, matrix=64)[2]
    b = make_case("B", 11, 2, matrix=64)[2]
    c = make_case("B", 12, 2, matrix=64)[2]
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.labels, c.labels)


def test_written_case_has_all_structures_unique_uids_and_realistic_hu(tmp_path: Path) -> None:
    info = write_case("A", 5, 1, tmp_path, matrix=MATRIX)
    case_dir = tmp_path / info.case_id
    meta = json.loads((case_dir / "case.json").read_text())
    assert meta["case_id"] == info.case_id
    labels, _ = read_label_image(case_dir / "labels.nii.gz")
    present = set(np.unique(labels)) - {0}
    expected = {s.label for s in STRUCTURES}
    if info.variant.startswith("nephrectomy"):
        missing = BY_NAME["Kidney_" + info.variant[-1]].label
        expected.discard(missing)
        assert missing not in present
    assert expected <= present
    assert present <= {s.label for s in STRUCTURES}
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (case_dir / "ct").iterdir()]
    assert len(set(uids)) == len(uids) == info.n_slices
    case = load_case(case_dir)
    hu = case.volume.hu
    lung = hu[case.labels == BY_NAME["Lung_L"].label]
    bone = hu[case.labels == BY_NAME["VBs"].label]
    liver = hu[case.labels == BY_NAME["Liver"].label]
    assert -950 < np.median(lung) < -650
    assert np.median(bone) > 150
    assert 30 < np.median(liver) < 160


def test_nephrectomy_variant_has_one_kidney() -> None:
    # find a nephrectomy case among the first indices of a seed (deterministic)
    for index in range(40):
        patient, grid, body, _ = make_case("A", 21, index, matrix=64)
        if patient.variant.startswith("nephrectomy"):
            side = patient.variant[-1]
            other = "R" if side == "L" else "L"
            assert not (body.labels == BY_NAME[f"Kidney_{side}"].label).any()
            assert (body.labels == BY_NAME[f"Kidney_{other}"].label).any()
            return
    pytest.fail("no nephrectomy case in 40 draws")


def test_centers_differ_in_protocol() -> None:
    a, b = CENTERS["A"], CENTERS["B"]
    assert max(a.slice_thickness) <= min(b.slice_thickness)
    assert a.noise[1] < b.noise[0]
    assert set(b.positions) - {"HFS"}, "center B has non-HFS positions"
    thick_a = [make_case("A", 1, i, matrix=32)[1].spacing[0] for i in range(4)]
    thick_b = [make_case("B", 1, i, matrix=32)[1].spacing[0] for i in range(4)]
    assert max(thick_a) < min(thick_b) + 1e-6


def test_the_study_centers_differ_in_population_scanner_slices_fov_contrast_and_positions() -> None:
    c, d = CENTERS["C"], CENTERS["D"]
    assert c.ages[1] < d.ages[0], "C treats infants and toddlers, D adolescents"
    assert max(c.slice_thickness) < min(d.slice_thickness) and c.noise[1] < d.noise[0]
    assert not c.sharp_kernel and d.sharp_kernel and c.min_fov < d.min_fov
    assert c.oral_contrast < d.oral_contrast and "nc" in d.phases and "nc" not in c.phases
    assert set(d.positions) == {"HFS", "FFS", "HFP", "FFP"} and c.positions.get("HFS", 0) > 0.9
    ages = {x: [make_case(x, 5, i, matrix=32)[0].age for i in range(4)] for x in ("C", "D")}
    assert max(ages["C"]) <= 5.0 and min(ages["D"]) >= 11.0


def test_a_shifted_center_is_its_base_center_with_one_factor_of_the_other() -> None:
    assert set(SHIFT_FACTORS) == {"population", "scanner", "slices", "fov", "contrast", "positions"}
    for factor, fields in SHIFT_FACTORS.items():
        shifted = CENTERS[shifted_center("C", factor)]
        for name in CenterSpec.__dataclass_fields__:
            if name in ("name", "draws_as"):
                continue
            source = CENTERS["D"] if name in fields else CENTERS["C"]
            assert getattr(shifted, name) == getattr(source, name), (factor, name)
    # the same child as the base center's case: same draws, only the scanner differs
    base, grid, body, scan = make_case("C", 3000, 1, matrix=32)
    other, grid_s, body_s, scan_s = make_case(shifted_center("C", "scanner"), 3000, 1, matrix=32)
    assert (base.age, base.variant, base.phase, base.seed) == (
        other.age,
        other.variant,
        other.phase,
        other.seed,
    )
    assert grid == grid_s and np.array_equal(body.labels, body_s.labels)
    assert scan_s["noise"] > 2 * scan["noise"]


def test_centers_a_and_b_keep_their_cases() -> None:
    """Cases of A and B are the default model's training and test data: new centers must not change them."""
    patient, grid, _, _ = make_case("A", 1000, 0, matrix=32)
    assert (round(patient.age, 3), patient.variant, grid.shape) == (
        1.51,
        "normal",
        (105, 32, 32),
    )  # before C, D


def test_cli_phantom_and_bad_center(tmp_path: Path) -> None:
    rtseg = [sys.executable, "-m", "rtseg_app"]
    ok = subprocess.run(
        [
            *rtseg,
            "phantom",
            "--center",
            "B",
            "--cases",
            "1",
            "--seed",
            "4",
            "--matrix",
            "64",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "B_s4_000" in ok.stdout
    assert (tmp_path / "B_s4_000" / "labels.nii.gz").is_file()
    bad = subprocess.run(
        [*rtseg, "phantom", "--center", "E", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "Traceback" not in bad.stderr


def test_orientation_roundtrip_all_positions(positions_dir: Path) -> None:
    for position in ("HFS", "FFS", "HFP", "FFP"):
        case = load_case(positions_dir / f"A_s3_000_{position}")
        o = Orientation.from_affine(case.volume.affine)
        assert np.array_equal(o.from_canonical(o.to_canonical(case.labels)), case.labels)


def test_anatomy_builder_names_say_what_they_are() -> None:
    """The case painter's attributes and methods are words, not letters (HU is the unit's own name)."""
    tree = ast.parse(Path(anatomy.__file__).read_text())
    builder = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Builder")
    names = {n.name for n in builder.body if isinstance(n, ast.FunctionDef)}
    names |= {
        n.attr
        for n in ast.walk(builder)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }
    assert sorted(n for n in names if len(n.strip("_")) <= 2 and n != "hu") == []
