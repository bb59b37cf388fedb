"""Phantom realism options (issue 16, point 4): each changes what it should, labels only where it must."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from rtseg.cases import load_case
from rtseg.errors import InputError
from rtseg.phantom.anatomy import build_body
from rtseg.phantom.cohort import make_case
from rtseg.phantom.extended import extend_body, extent
from rtseg.phantom.realism import Effects, Realism, correlated_noise, radial_nps
from rtseg.structures import BY_NAME

MATRIX = 96
CASE = ("A", 3, 0)


@pytest.fixture(scope="module")
def cases() -> dict[str, Any]:
    """``cases[option]`` is the case built with only that option on (lazily, once per module)."""

    class Cache(dict[str, Any]):
        def __missing__(self, option: str) -> Any:
            self[option] = make_case(*CASE, matrix=MATRIX, realism=Realism.parse(option))
            return self[option]

    return Cache()


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# Golden values: sha256 of the HU and label arrays of make_case(center, 3, 0, matrix=64), computed
# with the code before the realism options existed (commit fc613e4). They guard that the plain
# phantom, on which the default model is trained, is byte for byte what it was.
GOLDEN = {
    ("A", False): (
        "76ce07e3e156db9bd32548946917eab268e007c12c2dfcbce4efc2ad82ab94cd",
        "8b4152f0280ecda5df79ee17b6b3695dc996ebf7c840d89f73c2d959050f0d24",
    ),
    ("B", False): (
        "448a91336de27c8904b6e6b3cfc9b94f8ada2a7fc43b606e56c53b3dfd2d1a8f",
        "a9d1815862c66f280d56491cee164cd1d55eb515e6a2b585e1e5d799d7957ea4",
    ),
    ("A", True): (
        "6ba01148ff4ed63b9b80ac932a99b3e97b5785fdd07f784f4d3d19de2b90e77d",
        "8b4152f0280ecda5df79ee17b6b3695dc996ebf7c840d89f73c2d959050f0d24",
    ),
}


@pytest.mark.parametrize(("center", "couch"), list(GOLDEN))
def test_plain_phantom_is_byte_identical_to_before(center: str, couch: bool) -> None:
    for realism in (None, Realism()):
        _, _, body, _ = make_case(center, 3, 0, matrix=64, couch=couch, realism=realism)
        assert (_sha(body.hu), _sha(body.labels)) == GOLDEN[(center, couch)]
        assert "realism" not in body.notes


def test_arms_down_widen_the_body_and_leave_the_organs(cases: dict[str, Any]) -> None:
    _, grid0, plain, _ = cases["none"]
    _, grid, arms, _ = cases["arms_down"]
    k = plain.labels.shape[0] // 2

    def width_mm(labels: np.ndarray, pixel: float) -> float:
        cols = np.flatnonzero((labels[k] > 0).any(axis=0))
        return float(cols[-1] - cols[0] + 1) * pixel

    assert width_mm(arms.labels, grid.spacing[2]) > 1.35 * width_mm(plain.labels, grid0.spacing[2])
    assert arms.notes["realism"] == ["arms_down"]
    for name in ("Liver", "Kidney_L", "Spleen"):  # the trunk is the same anatomy on a coarser grid
        ml0 = (plain.labels == BY_NAME[name].label).sum() * np.prod(grid0.spacing)
        ml1 = (arms.labels == BY_NAME[name].label).sum() * np.prod(grid.spacing)
        assert ml1 == pytest.approx(ml0, rel=0.06), name


def test_truncation_cuts_the_body_at_the_image_edge(cases: dict[str, Any]) -> None:
    _, _, plain, _ = cases["none"]
    _, _, cut, _ = cases["truncation"]
    k = plain.labels.shape[0] // 2
    assert not (plain.labels[k][:, [0, -1]] > 0).any()
    assert (cut.labels[k][:, 0] > 0).any() and (cut.labels[k][:, -1] > 0).any()
    assert (cut.hu[k][cut.labels[k] > 0] > -500).mean() > 0.9  # labelled body is imaged body


def test_metal_raises_hu_and_streaks_outside_it_labels_unchanged(cases: dict[str, Any]) -> None:
    _, _, plain, _ = cases["none"]
    _, _, metal, _ = cases["metal"]
    assert np.array_equal(metal.labels, plain.labels)
    assert metal.metal is not None
    assert metal.hu.max() == 3071 and plain.hu.max() < 1500
    with_metal = np.flatnonzero((metal.metal > 0).any(axis=(1, 2)))
    near = binary_dilation(metal.metal > 0, iterations=3)
    diff = np.abs(metal.hu - plain.hu)
    streaks = (diff > 50) & ~near
    assert streaks[with_metal].sum() > 100, "streaks outside the metal"
    far = np.ones(len(metal.hu), bool)
    far[max(with_metal.min() - 3, 0) : with_metal.max() + 4] = False
    assert np.array_equal(metal.hu[far], plain.hu[far])  # only the slices with metal


def test_noise_texture_peaks_at_a_nonzero_frequency_white_noise_is_flat() -> None:
    rng = np.random.default_rng(0)
    pixel = 0.8
    peaks = {}
    for kernel in ("soft", "standard", "sharp"):
        noise = correlated_noise((16, 128, 128), pixel, kernel, 12.0, rng)
        assert float(noise.std()) == pytest.approx(12.0, rel=1e-3)
        f, nps = radial_nps(noise[:, 32:96, 32:96], pixel)
        peaks[kernel] = f[int(np.argmax(nps))]
        assert nps[1] < 0.3 * nps.max(), kernel  # the ramp: little power at low frequencies
    assert 0.05 < peaks["soft"] < peaks["standard"] < peaks["sharp"]
    f, white = radial_nps(rng.standard_normal((16, 64, 64)) * 12.0, pixel)
    # flat (the lowest bin is partly taken away by the detrending, as in any NPS measurement)
    assert white[2:].max() / white[2:].min() < 1.4


def test_noise_texture_in_a_case_changes_hu_not_labels(cases: dict[str, Any]) -> None:
    _, _, plain, _ = cases["none"]
    _, _, textured, _ = cases["noise_texture"]
    assert np.array_equal(textured.labels, plain.labels)
    assert np.abs(textured.hu - plain.hu).mean() > 3.0


def test_breathing_changes_hu_at_the_diaphragm_only(cases: dict[str, Any]) -> None:
    patient, grid, plain, _ = cases["none"]
    _, _, moved, _ = cases["motion"]
    assert np.array_equal(moved.labels, plain.labels)
    z = grid.axis(0)
    changed = np.abs(moved.hu - plain.hu).mean(axis=(1, 2)) > 1.0
    assert changed.any()
    dome = 0.4 * patient.half_length
    assert np.all(np.abs(z[changed] - dome) < 110), "only around the diaphragm"
    assert not changed[z < dome - 120].any()


def test_partial_volume_softens_boundaries_along_z(cases: dict[str, Any]) -> None:
    _, _, plain, _ = cases["none"]
    _, _, pv, _ = cases["partial_volume"]
    assert np.array_equal(pv.labels, plain.labels)
    assert pv.notes["partial_volume_subslices"] == 3

    # Where the labels change from one slice to the next, the step in HU is smaller once the
    # slice is an average over its thickness (the noise is the same draw in both).
    boundary = plain.labels[1:] != plain.labels[:-1]

    def step(hu: np.ndarray) -> float:
        return float(np.abs(np.diff(hu, axis=0))[boundary].mean())

    assert step(pv.hu) < 0.92 * step(plain.hu)


def test_bowel_contents_mottled_faeces_and_gas_in_the_colon(cases: dict[str, Any]) -> None:
    patient, grid, plain, _ = cases["none"]
    _, _, bowel, _ = cases["bowel"]
    assert np.array_equal(bowel.labels, plain.labels)
    assert not np.array_equal(bowel.hu, plain.hu)
    # The anatomy before the scanner's blur and noise: the contents themselves.
    anatomy = {fx: build_body(patient, grid, effects=Effects(bowel=fx)) for fx in (False, True)}
    colon = plain.labels == BY_NAME["Colon"].label

    def faeces_share(hu: np.ndarray) -> float:  # neither gas (−950), nor water (5), nor wall (42)
        return float(((hu[colon] > -400) & (hu[colon] < -40)).mean())

    assert faeces_share(anatomy[False].hu) < 0.02
    assert faeces_share(anatomy[True].hu) > 0.3
    assert (anatomy[True].hu[colon] < -700).mean() > 0.05  # gas: bubbles and the anterior gas
    small = plain.labels == BY_NAME["Bowel_Small"].label
    assert -10 < np.median(anatomy[True].hu[small]) < 50  # fluid (no oral contrast in this case)


def test_contrast_phase_aorta_arterial_above_portal_above_native(cases: dict[str, Any]) -> None:
    aorta = {}
    for phase in ("nc", "art", "pv"):
        patient, _, body, _ = cases[f"phase={phase}"]
        assert patient.phase == phase
        assert np.array_equal(body.labels, cases["none"][2].labels)
        aorta[phase] = float(np.median(body.hu[body.labels == BY_NAME["A_Aorta"].label]))
    assert aorta["art"] > aorta["pv"] > aorta["nc"] + 50


def test_short_scan_is_a_contiguous_slab_of_the_same_case(cases: dict[str, Any]) -> None:
    _, grid0, plain, _ = cases["none"]
    _, grid, short, _ = cases["short_scan"]
    n = short.labels.shape[0]
    assert 0.45 * len(plain.labels) < n < 0.85 * len(plain.labels)
    first = int(round((grid.origin[2] - grid0.origin[2]) / grid.spacing[0]))
    assert np.array_equal(short.labels, plain.labels[first : first + n])
    assert np.array_equal(short.hu, plain.hu[first : first + n])


def test_clinical_preset_mixes_the_options_per_case() -> None:
    preset = Realism.clinical()
    assert Realism().off and not preset.off and preset.tag == "clinical"
    drawn = [preset.draw(np.random.default_rng([65, 0, i, 1000])) for i in range(400)]
    assert np.mean([d.arms_down for d in drawn]) == pytest.approx(0.4, abs=0.07)
    assert np.mean([d.metal for d in drawn]) == pytest.approx(0.15, abs=0.05)
    assert all(d.noise_texture and d.partial_volume and d.bowel for d in drawn)
    fast = Realism.clinical(partial_volume=False)  # the default model's training cases (issue 16)
    assert fast.tag == "clinical-nopv" and not fast.partial_volume and fast.metal == preset.metal


def test_unknown_realism_option_is_refused_by_name() -> None:
    with pytest.raises(InputError, match="unknown realism option 'armsdown'"):
        Realism.parse("metal,armsdown")
    with pytest.raises(InputError, match="unknown realism option 'phase=venous'"):
        Realism.parse("phase=venous")


def test_phantom_command_writes_realistic_cases(tmp_path: Path) -> None:
    rtseg = [sys.executable, "-m", "rtseg_app", "phantom", "--center", "B", "--seed", "5", "--matrix", "64"]
    ok = subprocess.run(
        [*rtseg, "--realism", "metal,short_scan,phase=art", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "realism metal-short_scan-art" in ok.stdout
    case_dir = tmp_path / "B_s5_000_metal-short_scan-art"
    info = json.loads((case_dir / "case.json").read_text())
    assert info["phase"] == "art" and info["notes"]["realism"] == ["metal", "short_scan", "phase=art"]
    case = load_case(case_dir)  # labels checked against the (shorter) CT grid
    assert case.volume.shape[0] == info["n_slices"] and case.volume.hu.max() == 3071
    bad = subprocess.run(
        [*rtseg, "--realism", "chrome", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "unknown realism option 'chrome'" in bad.stderr and "Traceback" not in bad.stderr


def _is_small_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 300_000


def test_realism_report_measures_phantoms_against_real_ct(
    realct: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rtseg.phantom import realism_report

    assert (
        realism_report.main(
            ["--realct", str(realct), "--out", str(tmp_path), "--matrix", "64", "--no-effects"]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    plain, clinical = metrics["phantom (plain)"], metrics["phantom (clinical)"]
    real, head = metrics["real abdomen (Siemens)"], metrics["real head (noise only)"]
    assert real["nps_shape_distance"] == 0.0 and real["tissue_shares"]["soft"] > 0.5
    assert 5 < real["nps"]["sd_hu"] < 20 and 0.05 < real["nps"]["mean_f"] < 0.4
    assert head["nps"]["sd_hu"] > 0 and "w1_soft_hu" not in head  # the head serves for noise only
    for phantom in (plain, clinical):
        assert phantom["w1_soft_hu"] > 0 and 0 < phantom["nps_shape_distance"] <= 1
        assert set(phantom["w1_tissue_hu"]) == {"gas", "fat", "soft", "bone"}
    assert clinical["effects"] and "effects" not in plain
    assert "| real abdomen (Siemens) |" in capsys.readouterr().out
    assert (tmp_path / "metrics.md").read_text().startswith("| scan |")
    for name in ("montage.png", "histograms.png", "nps.png"):
        assert _is_small_png(tmp_path / name), name


def test_realism_report_without_real_ct_draws_the_phantoms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rtseg.phantom import realism_report

    code = realism_report.main(
        ["--realct", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--matrix", "64"]
    )
    assert code == 0
    assert f"no siemens_petct_j2k under {tmp_path / 'absent'}: phantoms only" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) == {"phantom (plain)", "phantom (clinical)"}
    for name in ("montage.png", "histograms.png", "nps.png", "effects.png"):
        assert _is_small_png(tmp_path / "out" / name), name


@pytest.fixture(scope="module")
def long_body(cases: dict[str, Any]) -> dict[str, Any]:
    """Case A/3/0 noise-free, plain and with the pelvis and upper thorax (``coverage=long``)."""
    patient, grid, _, _ = cases["none"]
    fx = Effects(coverage="long")
    plain = build_body(patient, grid)
    long = extend_body(build_body(patient, grid, effects=fx), patient, grid, 0.0, False, fx)
    return {"patient": patient, "grid": grid, "plain": plain, "long": long, "extent": extent(patient, grid)}


def test_long_scan_keeps_every_abdominal_label_and_adds_only_lungs_beyond(long_body: dict[str, Any]) -> None:
    plain, long, e = long_body["plain"], long_body["long"], long_body["extent"]
    n = plain.labels.shape[0]
    assert long.labels.shape[0] == e.below + n + e.above and e.below > 0 and e.above > 0
    assert np.array_equal(long.labels[e.below : e.below + n], plain.labels)  # the abdomen is the same case
    assert np.array_equal(long.hu[e.below : e.below + n], plain.hu)
    pelvis, thorax = long.labels[: e.below], long.labels[e.below + n :]
    assert set(np.unique(pelvis)) == {0, 1}  # pelvic organs and bones are body
    lungs = {BY_NAME["Lung_L"].label, BY_NAME["Lung_R"].label}
    assert lungs <= set(np.unique(thorax)) <= {0, 1, BY_NAME["Heart"].label} | lungs
    per_slice = np.isin(thorax, list(lungs)).sum(axis=(1, 2))
    top = int(np.flatnonzero(per_slice)[-1])
    assert per_slice[0] > per_slice[top // 2] > per_slice[top] > 0  # the lungs narrow to their apices
    assert per_slice[top] < 0.2 * per_slice[0] and top < len(per_slice) - 1  # which the scan shows


def test_long_scan_pelvis_has_bone_bladder_and_rectum_in_plausible_hu(long_body: dict[str, Any]) -> None:
    patient, grid, long, e = long_body["patient"], long_body["grid"], long_body["long"], long_body["extent"]
    hu, body = long.hu[: e.below], long.labels[: e.below] > 0
    bone = body & (hu > 300)
    assert 0.02 < bone.sum() / body.sum() < 0.15
    assert hu[bone].max() == patient.tissue("cortical")  # cortical shells, cancellous inside
    assert (hu[body] == patient.tissue("cancellous")).any()
    urine_ml = (hu[body] == patient.tissue("water")).sum() * float(np.prod(grid.spacing)) / 1000.0
    assert 0.4 * long.notes["coverage"]["bladder_ml"] < urine_ml <= long.notes["coverage"]["bladder_ml"]
    # femoral heads: bone on both sides at their level, none in the midline there
    k = int(round((long.notes["coverage"]["femoral_head_z_mm"] + patient.half_length) / grid.spacing[0]))
    row = (hu[e.below + k] > 300).any(axis=0)
    x = grid.axis(2)
    assert row[x < -0.4 * patient.width].any() and row[x > 0.4 * patient.width].any()


def test_coverage_cuts_the_long_scan_to_the_pelvis_or_the_thorax(cases: dict[str, Any]) -> None:
    patient, grid0, plain, _ = cases["none"]
    _, pgrid, pelvis, _ = cases["coverage=pelvis"]
    _, tgrid, thorax, _ = cases["coverage=thorax"]
    top_of_pelvis = pgrid.origin[2] + (pgrid.shape[0] - 1) * pgrid.spacing[0]
    assert top_of_pelvis < grid0.origin[2] and set(np.unique(pelvis.labels)) == {0, 1}
    assert tgrid.origin[2] > 0.45 * patient.half_length  # above the diaphragm domes
    assert not np.isin(thorax.labels, [BY_NAME[n].label for n in ("Liver", "Spleen", "Stomach")]).any()
    assert pelvis.notes["realism"] == ["coverage=pelvis"]


def test_coverage_is_an_option_of_its_own_not_in_the_clinical_preset() -> None:
    assert Realism.parse("metal,coverage=long") == Realism(metal=1.0, coverage="long")
    assert Realism.parse("coverage=pelvis").tag == "pelvisscan"
    assert Realism.clinical().coverage is None
    assert Realism.clinical(partial_volume=False).tag == "clinical-nopv"  # the default model's cases
    with pytest.raises(InputError, match="unknown realism option 'coverage=legs'.*coverage=long"):
        Realism.parse("coverage=legs")


def test_spleen_descent_moves_only_the_spleen_and_only_after_a_left_nephrectomy() -> None:
    """Issue 21's false kidney: the fossa cases differ from their plain twins in the spleen alone."""
    from rtseg.phantom.cohort import case_variant

    variants = {i: case_variant("A", 1000, i) for i in range(100, 112)}
    left = next(i for i, v in variants.items() if v == "nephrectomy_L")
    other = next(i for i, v in variants.items() if v != "nephrectomy_L")
    descent, bowel = Realism.parse("spleen_descent,bowel"), Realism.parse("bowel")
    assert descent.tag == "bowel-fossa" and bowel.draw(np.random.default_rng(1)).spleen_descent == 0
    assert replace(Realism.clinical(partial_volume=False), spleen_descent=True).tag == "clinical-nopv-fossa"

    spleen = BY_NAME["Spleen"].label
    _, _, twin, _ = make_case("A", 1000, other, matrix=64, realism=bowel)
    _, _, same, _ = make_case("A", 1000, other, matrix=64, realism=descent)
    assert np.array_equal(same.labels, twin.labels) and "spleen_descent_mm" not in same.notes

    _, grid, before, _ = make_case("A", 1000, left, matrix=64, realism=bowel)
    _, _, after, _ = make_case("A", 1000, left, matrix=64, realism=descent)
    changed = before.labels != after.labels
    assert changed.any() and ((before.labels == spleen) | (after.labels == spleen))[changed].all()

    def centre_mm(labels: np.ndarray) -> np.ndarray:  # spleen centroid (z, x) in mm on the shared grid
        where = np.argwhere(labels == spleen).mean(axis=0)
        return np.array([where[0] * grid.spacing[0], where[2] * grid.spacing[2]])

    dz, dx = centre_mm(after.labels) - centre_mm(before.labels)
    assert after.notes["spleen_descent_mm"] > 15
    assert dz < -0.4 * after.notes["spleen_descent_mm"]  # lower: slice 0 is the caudal end
    assert abs(dx) > 2  # and toward the midline
    assert after.notes["realism"] == ["bowel", "spleen_descent"]
