"""End to end: phantom cohort → tiny nnU-Net training → `rtseg segment` → RTSTRUCT → dciodvfy → plastimatch.

The model here is real (nnU-Net, trained for a few iterations on real phantom
cases) and tiny, so its contours are rough; what is tested is that every step
runs for real and that the RTSTRUCT carries exactly the labels the model
predicted, in the right place, in every patient position.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from test_rtstruct import dciodvfy, on_ct_grid

from rtseg.cases import load_case
from rtseg.ct import load_series
from rtseg.model.children import nnunet_dirs
from rtseg.model.cpu import CpuConfig
from rtseg.model.dataset import write_raw_dataset
from rtseg.model.default import canonical_cases
from rtseg.model.manifest import ModelManifest, default_provenance
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.model.training import export_model, plan_and_preprocess, train
from rtseg.phantom.cohort import generate_cohort, write_case
from rtseg.pipeline import model_identity, segment_series
from rtseg.structures import BY_NAME, STRUCTURES, dataset_labels

TINY = CpuConfig(
    target_spacing_zyx=(4.0, 3.0, 3.0),
    patch_size_zyx=(32, 48, 48),
    batch_size=2,
    base_features=4,
    n_stages=3,
    max_features=32,
    epochs=2,
    iterations_per_epoch=3,
    val_iterations_per_epoch=1,
    da_workers=1,
    preprocess_workers=1,
    threads=1,
)
RTSEG = [sys.executable, "-m", "rtseg_app"]


@dataclass(frozen=True)
class Trained:
    model: Path
    cohort: Path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A real nnU-Net trained briefly on four phantom cases of both centers."""
    work = tmp_path_factory.mktemp("pipeline-work")
    cohort = work / "cohort"
    generate_cohort("A", 2, 77, cohort, matrix=64)
    generate_cohort("B", 2, 77, cohort, matrix=64)
    cases = canonical_cases(cohort, TINY.target_spacing_zyx)
    write_raw_dataset(nnunet_dirs(work).raw, 990, "PipelineTest", cases, dataset_labels())
    plan_and_preprocess(work, 990, TINY)
    results = train(work, 990, TINY)
    manifest = ModelManifest(
        name="tiny-phantom",
        version="0.0.1",
        structures=STRUCTURES,
        provenance=default_provenance(command="tests/rtseg/test_pipeline.py"),
    )
    model = export_model(results, work / "model", manifest)
    return Trained(model, cohort)


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_segment_cli_to_valid_rtstruct_read_back_by_plastimatch(
    tiny_model: Trained, tmp_path: Path, position: str
) -> None:
    write_case("A", 78, 0, tmp_path, matrix=64, position=position)
    ct_dir = tmp_path / f"A_s78_000_{position}" / "ct"
    out, labels_out = tmp_path / "rs.dcm", tmp_path / "labels.nii.gz"
    run = subprocess.run(
        [*RTSEG, "segment", str(ct_dir), "-o", str(out), "--model", str(tiny_model.model), "--threads", "1"]
        + ["--labels-out", str(labels_out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert f"RTSTRUCT: {out}" in run.stdout and f"label map: {labels_out}" in run.stdout
    assert "tiny-phantom 0.0.1+" in run.stdout  # model name, version and weight hash
    assert "External" in run.stdout and "volume (ml)" in run.stdout
    errors = [line for line in dciodvfy(out) if "Error" in line]
    assert errors == []

    # The RTSTRUCT holds exactly the labels it was made from (the model's, after the clean-up every
    # output gets: impossible structures dropped, one-piece organs settled), read back by an
    # independent reader; the CLI's own label map is placed on the CT grid by its geometry.
    volume = load_series(ct_dir)
    label_map = sitk.ReadImage(str(labels_out))
    ds = pydicom.dcmread(out)
    assert ds.FrameOfReferenceUID == pydicom.dcmread(next(ct_dir.iterdir())).FrameOfReferenceUID
    masks = _plastimatch(out, ct_dir, tmp_path / "pm", volume)
    names = [roi.ROIName for roi in ds.StructureSetROISequence]
    assert "External" in names
    checked = 0
    for name in names:
        reference = on_ct_grid(label_map if name == "External" else label_map == BY_NAME[name].label, volume)
        if reference.sum() * volume.voxel_volume_ml <= 5.0:
            continue
        got = masks[name]
        dice = 2 * (got & reference).sum() / (got.sum() + reference.sum())
        assert dice >= 0.97, f"{name} in {position}: Dice {dice:.3f}"
        checked += 1
    assert checked >= 1


def _plastimatch(rs: Path, ct_dir: Path, out: Path, volume: object) -> dict[str, np.ndarray]:
    cmd = ["plastimatch", "convert", "--input", str(rs), "--referenced-ct", str(ct_dir)]
    cmd += ["--output-prefix", str(out), "--prefix-format", "nrrd", "--xor-contours"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return {p.stem: on_ct_grid(sitk.ReadImage(str(p)), volume) for p in out.glob("*.nrrd")}  # type: ignore[arg-type]


def test_labels_out_is_the_label_map_on_the_ct_grid(tiny_model: Trained, tmp_path: Path) -> None:
    """Geometry as SimpleITK reads the CT series itself; only labels of the model; no temporary file left."""
    case = write_case("B", 78, 1, tmp_path, matrix=64, position="FFP")
    ct_dir, labels_out = tmp_path / case.case_id / "ct", tmp_path / "labels.nii.gz"
    segmenter = NnunetSegmenter(tiny_model.model, threads=1)
    steps: list[str] = []
    result = segment_series(
        ct_dir, segmenter, tmp_path / "rs.dcm", progress=steps.append, labels_out=labels_out
    )

    assert result.labels_path == labels_out and steps[-2:] == ["writing the label map", "writing RTSTRUCT"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([case.case_id, "labels.nii.gz", "rs.dcm"])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_dir)))
    ct, labels = reader.Execute(), sitk.ReadImage(str(labels_out))
    assert labels.GetSize() == ct.GetSize() and labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(labels.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), ct.GetDirection(), atol=1e-6)
    values = set(np.unique(sitk.GetArrayFromImage(labels)).tolist())
    assert {BY_NAME[s.name].label for s in result.structures} <= values <= {0} | {s.label for s in STRUCTURES}


def test_labels_out_must_be_a_nifti_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before the CT is read or a model loaded."""
    from rtseg_app.cli import main

    for bad, said in (
        (tmp_path / "labels.nrrd", "ending in .nii.gz or .nii"),
        (tmp_path / "missing" / "labels.nii.gz", "no such folder for the label map"),
    ):
        argv = ["segment", str(tmp_path / "no-ct"), "-o", str(tmp_path / "rs.dcm"), "--labels-out", str(bad)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_pipeline_reports_volumes_timings_and_flags(tiny_model: Trained, tmp_path: Path) -> None:
    case_dir = next(p for p in sorted(tiny_model.cohort.iterdir()) if p.is_dir())
    segmenter = NnunetSegmenter(tiny_model.model, threads=1)
    identity = model_identity(segmenter.manifest, tiny_model.model)
    steps: list[str] = []
    result = segment_series(
        case_dir / "ct", segmenter, tmp_path / "rs.dcm", identity=identity, progress=steps.append
    )
    assert result.rtstruct_path.is_file()
    assert steps[0] == "loading CT series" and steps[-1] == "writing RTSTRUCT"
    assert {"load_s", "segment_s", "rtstruct_s", "write_s", "total_s"} <= set(result.timings)
    assert result.n_slices == load_case(case_dir).volume.shape[0]
    written = {s.name for s in result.structures}
    assert written.isdisjoint(result.omitted)
    assert written | set(result.omitted) == {s.name for s in STRUCTURES}
    ds = pydicom.dcmread(result.rtstruct_path)
    assert identity.version in str(ds.SoftwareVersions) or identity.version in str(ds.StructureSetDescription)
    # the flags travel with the contours: the TPS shows them on the ROI
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    observations = ds.RTROIObservationsSequence
    notes = {names[o.ReferencedROINumber]: o.get("ROIObservationDescription") for o in observations}
    for structure in result.structures:
        expected = "; ".join(structure.flags).replace("\u2013", "-")
        assert notes[structure.name] == (f"rtseg review: {expected}" if structure.flags else None)


def test_cli_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    run = subprocess.run(
        [*RTSEG, "segment", str(tmp_path / "empty"), "-o", str(tmp_path / "x.dcm"), "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("rtseg segment: error:")
    assert "no DICOM files found" in run.stderr and str(tmp_path / "empty") in run.stderr
    assert not (tmp_path / "x.dcm").exists()


def test_cli_missing_model_names_the_folder(tmp_path: Path) -> None:
    write_case("B", 79, 0, tmp_path, matrix=48)
    missing = tmp_path / "no-such-model"
    run = subprocess.run(
        [
            *RTSEG,
            "segment",
            str(tmp_path / "B_s79_000" / "ct"),
            "-o",
            str(tmp_path / "x.dcm"),
            "--model",
            str(missing),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert str(missing) in run.stderr


def test_wrong_side_flag_follows_the_patient_axes_and_the_centroid_is_exact() -> None:
    from rtseg.pipeline import _centroid, plausibility
    from rtseg.rtstruct.builder import StructureReport
    from rtseg.volume import CTVolume, SeriesInfo

    rng = np.random.default_rng(4)
    mask = rng.random((7, 9, 11)) > 0.6
    assert np.allclose(_centroid(mask), [float(v.mean()) for v in np.nonzero(mask)])
    labels = mask.astype(np.uint8) * 3
    assert np.allclose(_centroid(labels, slab=2), _centroid(mask))
    assert np.allclose(_centroid(labels, 3, slab=2), _centroid(mask))

    labels = np.zeros((4, 10, 10), dtype=np.uint8)
    labels[:, 2:8, 1:9] = 1  # body
    labels[:, 4:6, 6:8] = 3  # a "Kidney_L" at high column index i
    info = SeriesInfo("1.2", "1.2.3", "1.2.4", "1.2.840.10008.5.1.4.1.1.2", ("1",) * 4, "HFS")
    hfs = np.diag([1.0, 1.0, 1.0, 1.0])  # +i → +x: patient left (LPS)
    ffs = np.diag([-1.0, 1.0, 1.0, 1.0])  # +i → -x: patient right
    report = StructureReport("Kidney_L", 3, 1.0, 4)
    assert not any("centre lies" in f for f in plausibility(report, labels, CTVolume(labels, hfs, info)))
    flags = plausibility(report, labels, CTVolume(labels, ffs, info))
    assert any("centre lies on the patient's right" in f for f in flags)


def test_a_kidney_far_smaller_than_the_other_is_flagged_for_review() -> None:
    """The default model can draw a small false kidney after nephrectomy: the reviewer is told."""
    from rtseg.pipeline import plausibility
    from rtseg.rtstruct.builder import StructureReport
    from rtseg.volume import CTVolume, SeriesInfo

    labels = np.zeros((4, 10, 10), dtype=np.uint8)
    labels[:, 2:8, 1:9] = 1
    labels[:, 4:6, 6:8] = 4  # Kidney_L on the patient's left (+i → +x)
    labels[:, 4:6, 2:4] = 5  # Kidney_R
    info = SeriesInfo("1.2", "1.2.3", "1.2.4", "1.2.840.10008.5.1.4.1.1.2", ("1",) * 4, "HFS")
    volume = CTVolume(labels, np.eye(4), info)
    small = StructureReport("Kidney_L", 4, 21.3, 6)
    flags = plausibility(small, labels, volume, volumes_ml={"Kidney_L": 21.3, "Kidney_R": 118.3})
    assert any("under 40% of Kidney_R (118.3 ml)" in f for f in flags), flags
    # a normal asymmetry, a single kidney (the other removed) and the larger kidney are not flagged
    for report, volumes in (
        (StructureReport("Kidney_L", 4, 16.3, 6), {"Kidney_L": 16.3, "Kidney_R": 20.1}),
        (StructureReport("Kidney_L", 4, 65.3, 9), {"Kidney_L": 65.3}),
        (StructureReport("Kidney_R", 5, 118.3, 9), {"Kidney_L": 21.3, "Kidney_R": 118.3}),
    ):
        assert not any("under 40%" in f for f in plausibility(report, labels, volume, volumes_ml=volumes))


def test_cli_output_into_a_closed_pipe_is_not_a_traceback() -> None:
    """`rtseg model info | head -1`: the reader leaves early; rtseg stops without a traceback."""
    proc = subprocess.Popen([*RTSEG, "model", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert err.decode() == ""
    assert proc.returncode == 141
