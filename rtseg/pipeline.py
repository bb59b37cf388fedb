"""CT series → segmentation → RTSTRUCT: the one path the CLI, the node and the HTTP service share."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from rtseg.ct import load_series
from rtseg.model.inference import small_pieces
from rtseg.model.manifest import ModelManifest, model_hash
from rtseg.model.segmenter import Segmentation, Segmenter, external_label
from rtseg.region import check_region, impossible_structures, order_flags, region_rule, settle_organs
from rtseg.rtstruct import (
    ModelIdentity,
    RTStructResult,
    StructureReport,
    add_description_note,
    add_review_notes,
    build_rtstruct,
    write_rtstruct,
)
from rtseg.structures import EXTERNAL
from rtseg.volume import CTVolume

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

# Plausible pediatric volumes (ml) for ages 1–16 y, generous: outside → flagged for review.
PLAUSIBLE_ML: dict[str, tuple[float, float]] = {
    "Liver": (150, 3000),
    "Spleen": (10, 900),
    "Kidney_L": (15, 450),
    "Kidney_R": (15, 450),
    "Heart": (30, 1200),
    "Gallbladder": (1, 150),
    "Pancreas": (5, 200),
}
# Paired organs: one far smaller than its partner is a partial contour, or a false one where the organ
# was removed (the default model can draw a small kidney in the fossa after nephrectomy).
# (Not the lungs: an abdominal scan cuts their bases at any height, and the heart makes the left one small.)
PAIRED: dict[str, str] = {"Kidney_L": "Kidney_R", "Kidney_R": "Kidney_L"}
PAIRED_MIN_RATIO = 0.4
# Structures whose centre must lie on the patient's left (+x) or right (−x) side.
LATERALITY: dict[str, int] = {
    "Liver": -1,
    "Spleen": 1,
    "Kidney_L": 1,
    "Kidney_R": -1,
    "Lung_L": 1,
    "Lung_R": -1,
}


@dataclass(frozen=True)
class StructureSummary:
    """What a reviewer sees per structure: volume, contours and any plausibility flags."""

    name: str
    volume_ml: float
    n_contours: int
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineResult:
    """Outcome of one series: where the RTSTRUCT is, what is in it, how long each step took."""

    rtstruct_path: Path
    model: ModelIdentity
    structures: tuple[StructureSummary, ...]
    omitted: tuple[str, ...]
    n_slices: int
    timings: dict[str, float] = field(default_factory=dict)
    input_notes: tuple[str, ...] = ()  # how the CT was read (CTVolume.info.notes)
    dropped: tuple[str, ...] = ()  # "name: reason" of structures drawn where they cannot be
    labels_path: Path | None = None  # the label map the RTSTRUCT was made from, when asked for

    @property
    def flags(self) -> tuple[str, ...]:
        structures = tuple(f"{s.name}: {flag}" for s in self.structures for flag in s.flags)
        return (*self.input_notes, *structures)


def model_identity(manifest: ModelManifest, model_dir: Path | None = None) -> ModelIdentity:
    """Name and version for headers; the version carries the weights' short hash."""
    digest = model_hash(model_dir) if model_dir is not None else ""
    version = f"{manifest.version}+{digest}" if digest else manifest.version
    round_ = manifest.provenance.get("federation_round")
    description = f"federation round {round_}" if round_ is not None else ""
    return ModelIdentity(manifest.name, version[:64], description)


def plausibility(
    report: StructureReport,
    labels: npt.NDArray[np.uint8],
    volume: CTVolume,
    body_centre: tuple[float, float, float] | None = None,
    volumes_ml: dict[str, float] | None = None,
    boxes: Sequence[tuple[slice, ...] | None] | None = None,
) -> tuple[str, ...]:
    """Flags a reviewer should see: implausible volume, far smaller than its partner, wrong side.

    ``body_centre`` is the ``(k, j, i)`` centroid of every labelled voxel
    (computed here when not given; :func:`summarize` computes it once).
    ``volumes_ml``: the volumes of the other structures drawn, for the
    paired-organ check (a partner that was not drawn, e.g. after nephrectomy,
    flags nothing). ``boxes``: ``scipy.ndimage.find_objects(labels)``, to look at
    the structure's box only.
    """
    flags: list[str] = []
    lo, hi = PLAUSIBLE_ML.get(report.name, (0.0, float("inf")))
    if not lo <= report.volume_ml <= hi:
        flags.append(f"volume {report.volume_ml:.1f} ml outside the expected {lo:g}–{hi:g} ml")
    partner = PAIRED.get(report.name)
    other = (volumes_ml or {}).get(partner or "")
    if partner and other and report.volume_ml < PAIRED_MIN_RATIO * other:
        flags.append(
            f"volume {report.volume_ml:.1f} ml is under {PAIRED_MIN_RATIO:.0%} of {partner} "
            f"({other:.1f} ml): a partial contour, or a false one where the organ was removed"
        )
    side = LATERALITY.get(report.name)
    if side is not None:
        found = boxes[report.label - 1] if boxes is not None and 0 < report.label <= len(boxes) else None
        box = found or tuple(slice(0, n) for n in labels.shape)
        k, j, i = (c + b.start for c, b in zip(_centroid(labels[box], report.label), box, strict=True))
        x = float((volume.affine @ np.array([i, j, k, 1.0]))[0])
        bk, bj, bi = body_centre or _centroid(labels)
        x_body = float((volume.affine @ np.array([bi, bj, bk, 1.0]))[0])
        if (x - x_body) * side < 0:
            where = "left" if x > x_body else "right"
            flags.append(f"centre lies on the patient's {where}: check orientation and laterality")
    return tuple(flags)


def _centroid(
    labels: npt.NDArray[Any], label: int | None = None, slab: int = 64
) -> tuple[float, float, float]:
    """Mean ``(k, j, i)`` index of the voxels of ``label`` (None: of every non-zero voxel) of a non-empty
    ``[k, j, i]`` map or mask, from its projections counted a slab of slices at a time (no index arrays
    of every voxel, no whole-series mask)."""
    profiles = [np.zeros(n, dtype=np.int64) for n in labels.shape]
    for z in range(0, labels.shape[0], slab):
        part = labels[z : z + slab]
        mask = part > 0 if label is None else part == label
        profiles[0][z : z + slab] = np.count_nonzero(mask, axis=(1, 2))
        profiles[1] += np.count_nonzero(mask, axis=(0, 2))
        profiles[2] += np.count_nonzero(mask, axis=(0, 1))
    total = float(profiles[0].sum())
    k, j, i = (float(np.dot(np.arange(p.size), p)) / total for p in profiles)
    return k, j, i


def summarize(
    result: RTStructResult,
    labels: npt.NDArray[np.uint8],
    volume: CTVolume,
    notes: dict[str, tuple[str, ...]] | None = None,
) -> tuple[StructureSummary, ...]:
    """Per structure: volume, contours and flags; ``notes`` (from :func:`clean_segmentation`) come first."""
    lateral = any(r.name in LATERALITY for r in result.included)
    body = _centroid(labels) if lateral else None
    boxes = ndimage.find_objects(labels) if lateral else None
    volumes = {r.name: r.volume_ml for r in result.included}
    order = order_flags(volume, labels, {r.name: r.label for r in result.included})
    notes = notes or {}
    return tuple(
        StructureSummary(
            r.name,
            round(r.volume_ml, 2),
            r.n_contours,
            notes.get(r.name, ())
            + plausibility(r, labels, volume, body, volumes, boxes)
            + ((order[r.name],) if r.name in order else ()),
        )
        for r in result.included
    )


def drop_impossible(volume: CTVolume, segmentation: Segmentation) -> tuple[Segmentation, dict[str, str]]:
    """Remove structures drawn where they cannot be (a lung without lung air); returns them with the reason.

    Their voxels stay body (``External``) where the model has one, so the outline is unchanged.
    """
    label_of = {s.name: s.label for s in segmentation.manifest.structures}
    dropped = impossible_structures(volume, segmentation.labels, label_of)
    if not dropped:
        return segmentation, {}
    labels = segmentation.labels.copy()
    body = label_of.get(EXTERNAL, 0)
    for name in dropped:
        labels[labels == label_of[name]] = body
    for name, reason in dropped.items():
        log.warning("%s dropped: %s", name, reason)
    return replace(segmentation, labels=labels), dropped


def drop_specks(volume: CTVolume, segmentation: Segmentation) -> tuple[Segmentation, dict[str, str]]:
    """Remove every piece of a structure under ``segmentation.min_piece_ml`` on the CT's own grid.

    The segmenter drops such pieces on its own grid, but bringing the labels to
    the CT's grid can leave a sliver of a doubtful blob (a 0.01 ml "kidney"
    after a nephrectomy, 3 pieces, 6 contours). The voxels become body
    (``External``). Returns the segmentation and the structures that were
    nothing but specks (dropped, with the reason); a structure that keeps a
    part loses its specks silently, as on the segmenter's grid.
    """
    min_ml = segmentation.min_piece_ml
    if min_ml <= 0:
        return segmentation, {}
    outline = external_label(segmentation.manifest)  # External, or BODY as a foreign model may call it
    body, keep = (0, frozenset[int]()) if outline is None else (outline, frozenset({outline}))
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    small = small_pieces(segmentation.labels, voxel_ml, min_ml, keep)
    if not small:
        return segmentation, {}
    voxels = np.bincount(segmentation.labels.ravel())  # per label, before any speck goes
    name_of = {s.label: s.name for s in segmentation.manifest.structures}
    labels = segmentation.labels.copy()
    dropped: dict[str, str] = {}
    for label, where in small:
        labels[where] = body
        if len(where[0]) == voxels[label]:
            gone = f"{len(where[0]) * voxel_ml:.2f} ml in {len(where[0])} voxels"
            dropped[name_of.get(label, str(label))] = f"nothing but specks under {min_ml:g} ml ({gone})"
    log.info("specks under %g ml removed from %d structure(s) on the CT's grid", min_ml, len(small))
    for name, reason in dropped.items():
        log.warning("%s dropped: %s", name, reason)
    return replace(segmentation, labels=labels), dropped


def clean_segmentation(
    volume: CTVolume, segmentation: Segmentation
) -> tuple[Segmentation, dict[str, str], dict[str, tuple[str, ...]]]:
    """What every output shows: specks and impossible structures dropped, one-piece organs settled
    at their level.

    Returns the segmentation, the dropped structures with the reason, and per structure the notes
    of :func:`~rtseg.region.settle_organs` (pieces removed, an organ off its level).
    """
    segmentation, specks = drop_specks(volume, segmentation)
    segmentation, dropped = drop_impossible(volume, segmentation)
    dropped = {**specks, **dropped}
    label_of = {s.name: s.label for s in segmentation.manifest.structures}
    labels, notes = settle_organs(volume, segmentation.labels, label_of)
    for name, said in notes.items():
        for note in said:
            log.warning("%s: %s", name, note)
    return replace(segmentation, labels=labels), dropped, notes


def segment_volume(
    volume: CTVolume,
    segmenter: Segmenter,
    identity: ModelIdentity,
    *,
    rtstruct_uids: tuple[str, str] | None = None,
) -> tuple[Segmentation, RTStructResult, dict[str, str], dict[str, tuple[str, ...]]]:
    """Segment a loaded volume and build (not write) its RTSTRUCT.

    Also returns the dropped structures and the notes of :func:`clean_segmentation`.
    """
    segmentation, dropped, notes = clean_segmentation(volume, segmenter.segment(volume))
    series_uid, sop_uid = rtstruct_uids or (None, None)
    result = build_rtstruct(
        volume,
        segmentation.labels,
        segmentation.manifest.structures,
        identity,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    return segmentation, result, dropped, notes


def segment_series(
    source: Path | Sequence[Path] | CTVolume,
    segmenter: Segmenter,
    out_path: Path,
    *,
    identity: ModelIdentity | None = None,
    series_uid: str | None = None,
    rtstruct_uids: tuple[str, str] | None = None,
    progress: Progress | None = None,
    note: str | None = None,
    region_check: bool = True,
    labels_out: Path | None = None,
) -> PipelineResult:
    """Load a CT series (or take a loaded one), segment it, write the RTSTRUCT atomically to ``out_path``.

    ``note`` ends the structure set description (e.g. which earlier RTSTRUCT this one supersedes).
    ``labels_out``: also write the label map the RTSTRUCT is made from (after
    :func:`clean_segmentation`) there, as NIfTI on the CT's grid, atomically.
    With ``region_check``, a series that does not show the model's declared body region is
    refused (:class:`~rtseg.errors.RegionError`) before anything is segmented.
    """
    say = progress or (lambda _msg: None)
    identity = identity or model_identity(segmenter.manifest)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say("loading CT series")
    volume = source if isinstance(source, CTVolume) else load_series(source, series_uid=series_uid)
    timings["load_s"] = time.perf_counter() - t0
    rule = region_rule(segmenter.manifest.region) if region_check else None
    if rule is not None:
        say(f"checking that the series shows {rule.description}")
        check_region(volume, rule)
    say(f"segmenting {volume.shape[0]} slices with {identity.name} {identity.version}")
    t1 = time.perf_counter()
    segmentation, result, dropped, notes = segment_volume(
        volume, segmenter, identity, rtstruct_uids=rtstruct_uids
    )
    timings["segment_s"] = segmentation.seconds
    timings["rtstruct_s"] = time.perf_counter() - t1 - segmentation.seconds
    structures = summarize(result, segmentation.labels, volume, notes)
    add_review_notes(result.dataset, {s.name: s.flags for s in structures})
    if note:
        add_description_note(result.dataset, note)
    if labels_out is not None:
        say("writing the label map")
        write_labels_atomically(segmentation.labels, volume, labels_out)
    say("writing RTSTRUCT")
    t2 = time.perf_counter()
    write_rtstruct(result.dataset, out_path)
    timings["write_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    log.info(
        "segmented series: %d slices, %d structures, %.1f s",
        volume.shape[0],
        len(structures),
        timings["total_s"],
    )
    return PipelineResult(
        out_path,
        identity,
        structures,
        result.omitted,
        volume.shape[0],
        timings,
        volume.info.notes,
        tuple(f"{name}: {reason}" for name, reason in dropped.items()),
        labels_out,
    )


def write_labels_atomically(labels: npt.NDArray[np.uint8], volume: CTVolume, path: Path) -> None:
    """Write ``labels`` as NIfTI on ``volume``'s grid: a temporary file beside ``path``, then a rename."""
    from rtseg.phantom.cohort import write_label_image  # the phantom package only when a map is asked for

    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix  # SimpleITK writes by the name
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=".labels-", suffix=suffix)
    os.close(handle)
    tmp = Path(name)
    try:
        write_label_image(labels, volume.affine, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
