"""Synthetic two-center pediatric cohort: cases written as DICOM CT + aligned label map.

Each case is ``DIR/<case>/ct/*.dcm`` (one CT series), ``DIR/<case>/labels.nii.gz``
(label ids of :mod:`rtseg.structures`, on exactly the CT's voxel grid and
geometry) and ``DIR/<case>/case.json`` (what was drawn: age, variant, phase,
position, scanner settings). Everything is deterministic per (center, seed,
case index).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from rtseg.errors import InputError
from rtseg.phantom.anatomy import Body, Patient, build_body, draw_patient
from rtseg.phantom.dicom_io import POSITION_AXES, SeriesSpec, write_ct_series
from rtseg.phantom.extended import THORAX_CUT_T, extend_body, extended_grid, extent
from rtseg.phantom.realism import Effects, Realism, breathing, correlated_noise, metal_streaks
from rtseg.phantom.shapes import Grid, smooth_noise
from rtseg.structures import STRUCTURES
from rtseg.volume import CTVolume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CenterSpec:
    """Scanner and protocol of one center: the domain shift between centers lives here."""

    name: str
    slice_thickness: tuple[float, ...]
    fov_margin: float
    min_fov: float
    noise: tuple[float, float]
    sharp_kernel: bool
    kernel_name: str
    phases: dict[str, float]
    oral_contrast: float
    positions: dict[str, float]
    variants: tuple[float, float, float, float, float]  # normal, nephrectomy L/R, renal tumour, neuroblastoma
    rescale_intercept: float
    signed_pixels: bool
    manufacturer: str
    kvp: float
    ages: tuple[float, float] = (1.0, 16.0)  # the population: age drawn uniformly in years
    draws_as: str = ""  # the center whose random draws this one makes (a shifted center's base)


CENTERS: dict[str, CenterSpec] = {
    # Thin slices, tight field of view, soft kernel, mostly portal-venous, mostly HFS.
    "A": CenterSpec(
        "A",
        (1.5, 2.0, 2.5, 3.0),
        1.12,
        140.0,
        (9.0, 15.0),
        False,
        "B30f",
        {"pv": 0.8, "art": 0.15, "nc": 0.05},
        0.1,
        {"HFS": 0.8, "FFS": 0.12, "HFP": 0.08},
        (0.4, 0.15, 0.15, 0.15, 0.15),
        -1024.0,
        False,
        "rtseg phantom scanner A",
        100.0,
    ),
    # Thick slices, wide field of view, sharp noisy kernel, more non-contrast and oral contrast.
    "B": CenterSpec(
        "B",
        (3.0, 4.0, 5.0),
        1.38,
        250.0,
        (18.0, 30.0),
        True,
        "FC52",
        {"pv": 0.45, "nc": 0.35, "art": 0.2},
        0.45,
        {"HFS": 0.65, "FFS": 0.2, "HFP": 0.1, "FFP": 0.05},
        (0.4, 0.15, 0.15, 0.15, 0.15),
        0.0,
        True,
        "rtseg phantom scanner B",
        120.0,
    ),
    # Centers C and D: the study's two centers (rtseg evaluate). Neither is A or B, on which the
    # default model trained, so a study that starts every arm from that model tests two centers it
    # never saw. They differ in every factor a real pair of centers can differ in:
    # C, a children's hospital: infants and toddlers, thin slices, low-kV soft kernel, low noise,
    # tight field of view, contrast-enhanced, head first supine.
    "C": CenterSpec(
        "C",
        (1.0, 1.25, 1.5),
        1.08,
        120.0,
        (8.0, 12.0),
        False,
        "Br36",
        {"pv": 0.85, "art": 0.15},
        0.0,
        {"HFS": 0.95, "FFS": 0.05},
        (0.4, 0.15, 0.15, 0.15, 0.15),
        -1024.0,
        False,
        "rtseg phantom scanner C",
        80.0,
        ages=(1.0, 5.0),
    ),
    # D, an adult radiotherapy department that treats adolescents with its adult protocol: thick
    # slices, sharp noisy kernel, wide adult field of view, mostly without IV contrast and with oral
    # contrast, feet first and prone positions common.
    "D": CenterSpec(
        "D",
        (5.0,),
        1.35,
        350.0,
        (25.0, 40.0),
        True,
        "FC68",
        {"nc": 0.6, "pv": 0.4},
        0.7,
        {"HFS": 0.4, "FFS": 0.35, "HFP": 0.15, "FFP": 0.1},
        (0.4, 0.15, 0.15, 0.15, 0.15),
        0.0,
        True,
        "rtseg phantom scanner D",
        120.0,
        ages=(11.0, 16.0),
    ),
}

# The domain-shift experiment: the factors in which C and D differ, as fields of CenterSpec.
SHIFT_FACTORS: dict[str, tuple[str, ...]] = {
    "population": ("ages",),
    "scanner": (
        "noise",
        "sharp_kernel",
        "kernel_name",
        "rescale_intercept",
        "signed_pixels",
        "manufacturer",
        "kvp",
    ),
    "slices": ("slice_thickness",),
    "fov": ("fov_margin", "min_fov"),
    "contrast": ("phases", "oral_contrast"),
    "positions": ("positions",),
}


def shifted_center(base: str, factor: str) -> str:
    """Name of center ``base`` with the other study center's ``factor`` (``"C+scanner"``)."""
    return f"{base}+{factor}"


# Each study center with one factor of the other: the same random draws as the base center, so case
# i of "C+scanner" is case i of C (same child, same phase, same slices) scanned on D's scanner.
for _base, _other in (("C", "D"), ("D", "C")):
    for _factor, _fields in SHIFT_FACTORS.items():
        CENTERS[shifted_center(_base, _factor)] = replace(
            CENTERS[_base],
            name=shifted_center(_base, _factor),
            draws_as=_base,
            **{f: getattr(CENTERS[_other], f) for f in _fields},
        )


@dataclass(frozen=True)
class CaseInfo:
    """What a generated case is; written as case.json."""

    case_id: str
    center: str
    seed: int
    index: int
    age_years: float
    sex: str
    variant: str
    phase: str
    oral_contrast: bool
    patient_position: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    matrix: int
    n_slices: int
    noise_hu: float
    kernel: str
    structures_ml: dict[str, float]
    notes: dict[str, Any]


def case_id(center: str, seed: int, index: int, couch: bool = False, realism: Realism | None = None) -> str:
    tag = realism.tag if realism is not None else ""
    return f"{center}_s{seed}_{index:03d}" + ("_couch" if couch else "") + (f"_{tag}" if tag else "")


def _effects(center: str, seed: int, index: int, realism: Realism) -> tuple[Effects, np.random.Generator]:
    """The realism effects of a case and the generator for their details.

    A generator of its own, so the case's anatomy, scan and noise draws are those
    of the same case without realism.
    """
    rng = np.random.default_rng([_stream(center), seed, index, 1000])
    return realism.draw(rng), rng


def _rng(center: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([_stream(center), seed, index])


def _stream(center: str) -> int:
    """The seed part that names the center's random stream."""
    return ord(CENTERS[center].draws_as or center)


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], float)
    return str(rng.choice(keys, p=p / p.sum()))


def _draw(
    center: str, seed: int, index: int, position: str | None
) -> tuple[np.random.Generator, Patient, str]:
    """The first draws of a case: (generator after them, patient, patient position)."""
    spec = CENTERS[center]
    rng = _rng(center, seed, index)
    drawn = _choice(rng, spec.positions)
    position = position or drawn
    patient = draw_patient(
        rng, spec.variants, spec.phases, spec.oral_contrast, prone=position.endswith("P"), ages=spec.ages
    )
    return rng, patient, position


def case_variant(center: str, seed: int, index: int) -> str:
    """The variant (normal, nephrectomy_L, ...) case ``index`` will have, without building it."""
    if center not in CENTERS:
        raise InputError(f"unknown center {center!r}: choose one of {', '.join(CENTERS)}")
    return _draw(center, seed, index, None)[1].variant


def make_case(
    center: str,
    seed: int,
    index: int,
    matrix: int = 256,
    position: str | None = None,
    couch: bool = False,
    realism: Realism | None = None,
) -> tuple[Patient, Grid, Body, dict[str, Any]]:
    """Draw and build one case in memory (canonical orientation, scanner effects applied).

    ``position`` overrides the drawn patient position (same anatomy otherwise);
    ``couch`` lays the patient on a treatment couch (see :func:`build_body`);
    ``realism`` adds the options of :class:`~rtseg.phantom.realism.Realism`
    (None or all off: exactly the plain phantom).
    """
    if realism is not None and not realism.off:
        return _make_realistic(center, seed, index, matrix, position, couch, realism)
    spec = CENTERS[center]
    rng, patient, position = _draw(center, seed, index, position)
    thickness = float(rng.choice(spec.slice_thickness))
    fov = max(spec.min_fov, 2.0 * patient.width * spec.fov_margin * rng.uniform(0.97, 1.05))
    pixel = round(fov / matrix, 4)
    n_slices = int(round(2.0 * patient.half_length / thickness)) + 1
    fov_centre_y = float(rng.uniform(-0.08, 0.08) * patient.depth)
    origin = (-(matrix - 1) / 2 * pixel, fov_centre_y - (matrix - 1) / 2 * pixel, -patient.half_length)
    grid = Grid((n_slices, matrix, matrix), (thickness, pixel, pixel), origin)
    body = build_body(patient, grid, couch=couch)
    noise_sd = float(rng.uniform(*spec.noise) * (0.8 + 0.4 * patient.width / 150.0))
    body.hu = _scanner(body.hu, grid, spec, noise_sd, rng)
    return patient, grid, body, _scan_record(position, thickness, pixel, noise_sd, rng)


def _scan_record(
    position: str, thickness: float, pixel: float, noise_sd: float, rng: np.random.Generator
) -> dict[str, Any]:
    """What the scanner did, for the DICOM writer; draws sex, then table position, from ``rng``."""
    return {
        "position": position,
        "thickness": thickness,
        "pixel": pixel,
        "noise": noise_sd,
        "sex": str(rng.choice(["M", "F"])),
        "table": rng.uniform([-5, -30, -700], [5, 30, -150]),
    }


def _make_realistic(
    center: str, seed: int, index: int, matrix: int, position: str | None, couch: bool, realism: Realism
) -> tuple[Patient, Grid, Body, dict[str, Any]]:
    """:func:`make_case` with realism: the same draws in the same order, then the effects.

    Order of acquisition: anatomy (averaged over the slice when partial volume is
    on), breathing, metal and its streaks (a reconstruction effect), then the
    scanner's slice profile, kernel and noise; last the field of view (labels
    cleared outside the reconstruction circle) and a shorter scan range.
    """
    spec = CENTERS[center]
    fx, fx_rng = _effects(center, seed, index, realism)
    rng, patient, position = _draw(center, seed, index, position)
    if fx.phase:
        patient = replace(patient, phase=fx.phase)
    thickness = float(rng.choice(spec.slice_thickness))
    fov = max(spec.min_fov, 2.0 * patient.width * spec.fov_margin * rng.uniform(0.97, 1.05))
    if fx.arms_down:  # framed on the arms (about 1.65 half-widths out): now and then cut off
        fov = max(fov, 2.0 * (1.65 * patient.width + 10.0) * float(fx_rng.uniform(0.85, 1.1)))
    if fx.truncation:  # a field of view narrower than the body: the sides are cut off
        fov = 2.0 * patient.width * float(fx_rng.uniform(0.72, 0.92))
    pixel = round(fov / matrix, 4)
    n_slices = int(round(2.0 * patient.half_length / thickness)) + 1
    fov_centre_y = float(rng.uniform(-0.08, 0.08) * patient.depth)
    origin = (-(matrix - 1) / 2 * pixel, fov_centre_y - (matrix - 1) / 2 * pixel, -patient.half_length)
    grid = Grid((n_slices, matrix, matrix), (thickness, pixel, pixel), origin)
    body = _build(patient, grid, 0.0, couch, fx)
    if fx.partial_volume:
        body.hu = _partial_volume(body, patient, grid, couch, fx)
    plain_grid = grid
    if fx.coverage:  # the pelvis and upper thorax slabs were added below and above
        grid = extended_grid(patient, grid)
    if fx.motion:  # the dome of the diaphragm sits about 0.4 half-lengths above the hila
        body.hu = breathing(body.hu, grid.axis(0), 0.4 * patient.half_length, fx_rng)
    if body.metal is not None:
        body.hu = metal_streaks(body.hu, body.metal, pixel, fx_rng)
    noise_sd = float(rng.uniform(*spec.noise) * (0.8 + 0.4 * patient.width / 150.0))
    texture = ("sharp" if spec.sharp_kernel else "standard") if fx.noise_texture else None
    body.hu = _scanner(body.hu, grid, spec, noise_sd, rng, texture)
    if fx.arms_down or fx.truncation:  # the body reaches past the reconstruction circle: not imaged there
        body.labels[:, _outside_circle(matrix)] = 0
    if fx.coverage in ("pelvis", "thorax"):
        grid, body = _region_only(fx.coverage, patient, plain_grid, grid, body)
    if fx.short_scan:
        grid, body = _shorter(grid, body, fx_rng)
    body.notes["realism"] = fx.active
    return patient, grid, body, _scan_record(position, thickness, pixel, noise_sd, rng)


def _partial_volume(
    body: Body, patient: Patient, grid: Grid, couch: bool, fx: Effects
) -> npt.NDArray[np.float32]:
    """HU averaged over three sub-slices (centre and ± a third of the thickness).

    The sub-slices are the same anatomy sampled at shifted z (same draws); a
    sub-slice whose labels differ from the centre's in more than 5 % of the body
    (an organ drawn differently) is left out rather than blended in as a ghost.
    """
    sub = replace(fx, metal=False)
    total, count = body.hu.astype(np.float64), 1
    inside = max(int((body.labels > 0).sum()), 1)
    for offset in (-1.0 / 3.0, 1.0 / 3.0):
        shifted = _build(patient, grid, offset, couch, sub)
        if (shifted.labels != body.labels).sum() / inside < 0.05:
            total += shifted.hu
            count += 1
    body.notes["partial_volume_subslices"] = count
    return (total / count).astype(np.float32)


def _build(patient: Patient, grid: Grid, z_offset: float, couch: bool, fx: Effects) -> Body:
    """The anatomy on ``grid``, with the pelvis and upper thorax beyond it when a coverage is asked."""
    body = build_body(patient, grid, z_offset=z_offset, couch=couch, effects=fx)
    return extend_body(body, patient, grid, z_offset, couch, fx) if fx.coverage else body


def _region_only(which: str, patient: Patient, plain: Grid, grid: Grid, body: Body) -> tuple[Grid, Body]:
    """The long scan cut to the pelvis (below the plain phantom) or the thorax (above the domes)."""
    below = extent(patient, plain).below
    if which == "pelvis":
        return _cut(grid, body, 0, below)
    first = below + int(np.ceil((THORAX_CUT_T + 1.0) * patient.half_length / plain.spacing[0]))
    return _cut(grid, body, first, grid.shape[0] - first)


def _outside_circle(n: int) -> npt.NDArray[np.bool_]:
    """Pixels outside the reconstruction circle (the scanner writes air there)."""
    yy, xx = np.mgrid[:n, :n]
    return np.asarray((yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 > (n / 2) ** 2)


def _shorter(grid: Grid, body: Body, rng: np.random.Generator) -> tuple[Grid, Body]:
    """Keep a contiguous 50–80 % of the slices: a scan that covers less than the upper abdomen."""
    n = grid.shape[0]
    keep = max(int(round(n * float(rng.uniform(0.5, 0.8)))), 2)
    first = int(rng.integers(0, n - keep + 1))
    return _cut(grid, body, first, keep)


def _cut(grid: Grid, body: Body, first: int, keep: int) -> tuple[Grid, Body]:
    """Slices ``first`` to ``first + keep`` of a case, with their grid."""
    cut = slice(first, first + keep)
    origin = (grid.origin[0], grid.origin[1], grid.origin[2] + first * grid.spacing[0])
    short = Grid((keep, grid.shape[1], grid.shape[2]), grid.spacing, origin)
    metal = body.metal[cut] if body.metal is not None else None
    return short, Body(body.labels[cut].copy(), body.hu[cut].copy(), body.notes, metal)


def _scanner(
    hu: npt.NDArray[np.float32],
    grid: Grid,
    spec: CenterSpec,
    noise_sd: float,
    rng: np.random.Generator,
    texture: str | None = None,
) -> npt.NDArray[np.float32]:
    """Slice profile, reconstruction kernel, correlated noise and the reconstruction circle.

    ``texture`` names a kernel whose noise power spectrum the noise gets
    (:func:`~rtseg.phantom.realism.correlated_noise`); None: blurred white noise.
    """
    out = gaussian_filter1d(hu, sigma=0.35, axis=0)  # slice sensitivity profile
    if spec.sharp_kernel:
        out = out + 0.7 * (out - gaussian_filter(out, (0, 1.2, 1.2)))
        grain = 0.45
    else:
        out = gaussian_filter(out, (0, 0.6, 0.6))
        grain = 0.8
    if texture is None:
        out = out + noise_sd * smooth_noise(grid.shape, rng, (0.3, grain, grain))
    else:
        out = out + correlated_noise(grid.shape, grid.spacing[1], texture, noise_sd, rng)
    ny, nx = grid.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    circle = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > (min(nx, ny) / 2) ** 2
    out[:, circle] = -1024
    return np.asarray(np.clip(np.rint(out), -1024, 3071), dtype=np.float32)


def write_case(
    center: str,
    seed: int,
    index: int,
    out_root: Path,
    matrix: int = 256,
    position: str | None = None,
    couch: bool = False,
    realism: Realism | None = None,
) -> CaseInfo:
    """Generate one case under ``out_root/<case_id>/`` (id suffixed: couch, realism, forced position)."""
    if center not in CENTERS:
        raise InputError(f"unknown center {center!r}: choose one of {', '.join(CENTERS)}")
    if position is not None and position not in POSITION_AXES:
        raise InputError(f"unknown patient position {position!r}: choose one of {', '.join(POSITION_AXES)}")
    cid = case_id(center, seed, index, couch, realism) + (f"_{position}" if position else "")
    patient, grid, body, scan = make_case(center, seed, index, matrix, position, couch, realism)
    spec = CENTERS[center]
    case_dir = out_root / cid
    origin_lps = np.asarray(grid.origin) + scan["table"]
    age_days = int(patient.age * 365.25)
    birth = np.datetime64("2026-03-02") - np.timedelta64(age_days, "D")
    series = SeriesSpec(
        uid_seed=f"rtseg-phantom/{cid}",
        patient_position=scan["position"],
        patient_name=f"PHANTOM^{cid}",
        patient_id=f"RTSEG-{cid}",
        patient_birth_date=str(birth).replace("-", ""),
        patient_sex=scan["sex"],
        patient_age=f"{int(patient.age):03d}Y",
        study_date="20260302",
        series_description=f"Abdomen {scan['thickness']:.1f} {spec.kernel_name} ({patient.phase})",
        manufacturer=spec.manufacturer,
        convolution_kernel=spec.kernel_name,
        kvp=spec.kvp,
        rescale_intercept=spec.rescale_intercept,
        signed_pixels=spec.signed_pixels,
        descending_acquisition=bool(index % 2 == 0),
    )
    volume = write_ct_series(body.hu, grid.spacing, origin_lps, case_dir / "ct", series)
    write_labels(body.labels, volume, case_dir / "labels.nii.gz")
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    counts = np.bincount(body.labels.ravel(), minlength=len(STRUCTURES) + 1)
    info = CaseInfo(
        case_id=cid,
        center=center,
        seed=seed,
        index=index,
        age_years=round(patient.age, 2),
        sex=scan["sex"],
        variant=patient.variant,
        phase=patient.phase,
        oral_contrast=patient.oral_contrast,
        patient_position=scan["position"],
        slice_thickness_mm=scan["thickness"],
        pixel_spacing_mm=scan["pixel"],
        matrix=matrix,
        n_slices=grid.shape[0],
        noise_hu=round(scan["noise"], 1),
        kernel=spec.kernel_name,
        structures_ml={s.name: round(float(counts[s.label]) * voxel_ml, 2) for s in STRUCTURES},
        notes=body.notes,
    )
    (case_dir / "case.json").write_text(json.dumps(asdict(info), indent=1))
    return info


def write_labels(labels_zyx: npt.NDArray[np.uint8], volume: CTVolume, path: Path) -> None:
    """Write a canonical label map on the CT's own voxel grid and geometry (NIfTI)."""
    from rtseg.volume import Orientation

    stored = Orientation.from_affine(volume.affine).from_canonical(labels_zyx)
    write_label_image(stored, volume.affine, path)


def write_label_image(labels_kji: npt.NDArray[Any], affine: npt.NDArray[np.float64], path: Path) -> None:
    """Write a [k, j, i] array with a CT affine as NIfTI (SimpleITK converts LPS → RAS)."""
    image: Any = sitk.GetImageFromArray(np.ascontiguousarray(labels_kji.astype(np.uint8)))  # untyped API
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def read_label_image(path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """Read a label NIfTI as ([k, j, i] array, affine in LPS); unreadable: :class:`InputError`."""
    try:
        image: Any = sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK's only exception type
        raise InputError("not a readable label image (NIfTI)", source=str(path)) from exc
    arr = sitk.GetArrayFromImage(image).astype(np.uint8)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return arr, affine


def _write_one(args: tuple[str, int, int, Path, int, bool, Realism | None]) -> CaseInfo:
    center, seed, index, out, matrix, couch, realism = args
    existing = out / case_id(center, seed, index, couch, realism) / "case.json"
    if existing.is_file() and (existing.parent / "labels.nii.gz").is_file():
        # deterministic per (center, seed, index, couch, realism): a finished case is not written again
        return CaseInfo(**json.loads(existing.read_text()))
    return write_case(center, seed, index, out, matrix, couch=couch, realism=realism)


def generate_cohort(
    center: str,
    n_cases: int,
    seed: int,
    out: Path,
    matrix: int = 256,
    workers: int = 1,
    start: int = 0,
    progress: Callable[[CaseInfo], None] | None = None,
    couch: bool = False,
    realism: Realism | None = None,
    indices: Sequence[int] | None = None,
) -> list[CaseInfo]:
    """Write ``n_cases`` cases of ``center`` (indices ``start`` … ) under ``out``.

    On a couch if asked; ``realism`` adds the realism options (None: the plain phantom).
    ``indices``: these case indices instead (``n_cases`` and ``start`` are then not used).
    """
    if center not in CENTERS:
        raise InputError(f"unknown center {center!r}: choose one of {', '.join(CENTERS)}")
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(indices) if indices is not None else [start + i for i in range(n_cases)]
    jobs = [(center, seed, i, out, matrix, couch, realism) for i in chosen]
    results: list[CaseInfo] = []
    if workers <= 1:
        for job in jobs:
            results.append(_write_one(job))
            if progress:
                progress(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for info in pool.map(_write_one, jobs):
            results.append(info)
            if progress:
                progress(info)
    return results
