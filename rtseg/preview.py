"""Contour previews: one PNG per result that shows the RTSTRUCT's contours on its CT.

The contours are read back from the written RTSTRUCT (pydicom) and mapped from
patient millimetres to CT voxel indices through the CT's own geometry
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, via the volume's
affine), never taken from the label map that produced the file: a contour that
lands off its organ in the file lands off it in the preview, so the preview
also proves the file.

The montage: axial panels through each structure's centre (structures whose
centres share a slice share a panel; at most :data:`MAX_AXIAL`), one coronal
and one sagittal panel through the body centre, a legend with each ROI Display
Color, flagged structures marked with ``(!)``. The CT is shown in a soft-tissue
window (W400/L40); axial panels show the pixel grid as stored, coronal and
sagittal ones with the head up, and every panel carries the patient-direction
letters (A/P/L/R/S/I) of its edges, computed from the geometry.
"""

from __future__ import annotations

import math
import os
import textwrap
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError

from rtseg.errors import RTStructError
from rtseg.rtstruct.contours import trace_mask
from rtseg.rtstruct.rasterize import fill_even_odd, roi_planes
from rtseg.structures import EXTERNAL, color_for
from rtseg.volume import CTVolume

PREVIEW_FILE = "preview.png"  # beside a job's RTSTRUCT: jobs/<id>/preview.png
WINDOW_LEVEL_HU = 40.0
WINDOW_WIDTH_HU = 400.0
MAX_AXIAL = 12
COLUMNS = 4
PANEL_IN = 2.5  # each panel's box, inches
HEADER_IN = 0.35
FOOTER_IN = 0.55
DPI = 100
LINE_PX = 1.5
FLAG_MARK = "(!)"
MAX_FOOTER_LINES = 4
# Patient direction of +x, +y, +z in DICOM LPS, and of the opposite directions.
_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))

Polygons = list[npt.NDArray[np.float64]]
Source = CTVolume | Path | Sequence[Path]


@dataclass(frozen=True)
class Roi:
    """One ROI as read back from the file: contours per slice ``k`` in ``(i, j)`` voxel indices."""

    name: str
    color: tuple[int, int, int]
    planes: Mapping[int, Polygons]
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Panel:
    """Where one panel of the PNG lies and how its pixels map to CT voxels.

    ``kind`` is ``"axial"``, ``"coronal"`` or ``"sagittal"``; ``index`` the
    fixed voxel index (``k`` for axial, else the in-plane index that is held);
    ``labels`` the direction letter at each edge (``left``, ``right``, ``top``,
    ``bottom``); ``bbox`` the image area ``(x0, y0, x1, y1)`` in PNG pixels
    (origin top left); ``to_data`` maps a PNG pixel centre to panel data
    coordinates ``(u, v)``: column and row of the displayed array.
    """

    kind: str
    index: int
    fixed_axis: int  # 0: k, 1: j, 2: i (voxel array axis held fixed)
    u_axis: int  # voxel array axis shown horizontally
    structures: tuple[str, ...]
    labels: Mapping[str, str]
    bbox: tuple[int, int, int, int]
    to_data: npt.NDArray[np.float64]

    def voxel(self, x: float, y: float) -> tuple[float, float, float]:
        """The ``(k, j, i)`` voxel position under PNG pixel column ``x``, row ``y``."""
        u, v, _ = self.to_data @ np.array([x, y, 1.0])
        position = [0.0, 0.0, 0.0]
        v_axis = 3 - self.fixed_axis - self.u_axis
        position[self.fixed_axis] = float(self.index)
        position[self.u_axis] = float(u)
        position[v_axis] = float(v)
        return position[0], position[1], position[2]


@dataclass(frozen=True)
class Preview:
    """A rendered preview: the PNG, its size in pixels, its panels and the colour of each ROI."""

    path: Path
    size: tuple[int, int]
    panels: tuple[Panel, ...]
    colors: Mapping[str, tuple[int, int, int]]


def render_preview(
    source: Source,
    rtstruct_path: Path,
    flags: Mapping[str, Sequence[str]] | None,
    out_png: Path,
) -> Path:
    """Write the contour preview of ``rtstruct_path`` on its CT to ``out_png`` (atomically).

    Parameters
    ----------
    source
        The CT: a loaded :class:`CTVolume`, its series folder or its files.
    rtstruct_path
        The RTSTRUCT to show; its contours are read from the file.
    flags
        Review flags per structure name (``PipelineResult`` / job record); flagged
        structures are marked. ``None``: those the file's ROI observations carry.
    out_png
        Where the PNG goes.

    Raises
    ------
    RTStructError
        The file is not an RTSTRUCT of this CT (another frame of reference, a
        contour off the slice planes).
    InputError
        The CT cannot be read.
    """
    return draw_preview(source, rtstruct_path, flags, out_png).path


def draw_preview(
    source: Source,
    rtstruct_path: Path,
    flags: Mapping[str, Sequence[str]] | None,
    out_png: Path,
) -> Preview:
    """As :func:`render_preview`, and return the panel layout (for checks on the pixels)."""
    volume = _volume(source)
    rois = read_rois(rtstruct_path, volume, flags)
    stats = {roi.name: _plane_stats(roi, volume.shape) for roi in rois}
    axial = axial_panels(stats)
    centre = _body_centre(stats, volume.shape)
    return _draw(volume, rois, axial, centre, _header(rtstruct_path, volume), out_png)


def flags_by_structure(structures: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, ...]]:
    """``{name: flags}`` from a job record's ``result["structures"]`` (the worker's JSON)."""
    return {str(s["name"]): tuple(str(f) for f in s.get("flags", ())) for s in structures if "name" in s}


# -- reading ----------------------------------------------------------------------------------


def _volume(source: Source) -> CTVolume:
    if isinstance(source, CTVolume):
        return source
    from rtseg.ct import load_series

    return load_series(source)


def read_rois(
    rtstruct_path: Path, volume: CTVolume, flags: Mapping[str, Sequence[str]] | None = None
) -> list[Roi]:
    """Every ROI with contours in the file, in the file's order, with its display colour and flags."""
    dataset = _read_rtstruct(rtstruct_path)
    try:
        planes = roi_planes(dataset, volume)
    except RTStructError as exc:
        raise RTStructError(exc.message, source=str(rtstruct_path)) from exc
    colors = _display_colors(dataset)
    if flags is None:
        flags = _observation_flags(dataset)
    return [
        Roi(name, colors.get(name) or color_for(name), contours, tuple(flags.get(name, ())))
        for name, contours in planes.items()
        if contours
    ]


def _read_rtstruct(path: Path) -> pydicom.Dataset:
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise RTStructError(f"cannot read the RTSTRUCT ({exc})", source=str(path)) from exc
    if dataset.get("Modality") != "RTSTRUCT":
        raise RTStructError(f"not an RTSTRUCT (modality {dataset.get('Modality')!r})", source=str(path))
    return dataset


def _display_colors(dataset: pydicom.Dataset) -> dict[str, tuple[int, int, int]]:
    names = {int(r.ROINumber): str(r.ROIName) for r in dataset.get("StructureSetROISequence", [])}
    colors = {}
    for item in dataset.get("ROIContourSequence", []):
        value = item.get("ROIDisplayColor")
        name = names.get(int(item.ReferencedROINumber))
        if name is not None and value is not None and len(value) == 3:
            rgb = tuple(min(max(int(c), 0), 255) for c in value)
            colors[name] = (rgb[0], rgb[1], rgb[2])
    return colors


def _observation_flags(dataset: pydicom.Dataset) -> dict[str, tuple[str, ...]]:
    """The review notes rtseg writes into ``ROIObservationDescription`` ("rtseg review: a; b")."""
    names = {int(r.ROINumber): str(r.ROIName) for r in dataset.get("StructureSetROISequence", [])}
    flags = {}
    for item in dataset.get("RTROIObservationsSequence", []):
        text = str(item.get("ROIObservationDescription", ""))
        name = names.get(int(item.get("ReferencedROINumber", -1)))
        if name is not None and text.startswith("rtseg review: "):
            flags[name] = tuple(text.removeprefix("rtseg review: ").split("; "))
    return flags


# -- choosing the panels ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Stats:
    """Voxel counts per slice and the in-plane centroid of one ROI (filled by the even-odd rule)."""

    counts: Mapping[int, int]
    j_sum: float
    i_sum: float

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def centre_k(self) -> int:
        """The contoured slice nearest the centroid (a slice through the structure)."""
        mean = sum(k * n for k, n in self.counts.items()) / max(self.total, 1)
        return min((k for k, n in self.counts.items() if n), key=lambda k: (abs(k - mean), k))


def _plane_stats(roi: Roi, shape: tuple[int, int, int]) -> _Stats:
    counts: dict[int, int] = {}
    j_sum = i_sum = 0.0
    for k, polygons in roi.planes.items():
        mask = fill_even_odd(polygons, shape[1:])
        counts[k] = int(np.count_nonzero(mask))
        rows, cols = np.count_nonzero(mask, axis=1), np.count_nonzero(mask, axis=0)
        j_sum += float(np.dot(np.arange(rows.size), rows))
        i_sum += float(np.dot(np.arange(cols.size), cols))
    return _Stats(counts, j_sum, i_sum)


def axial_panels(stats: Mapping[str, _Stats], limit: int = MAX_AXIAL) -> list[tuple[int, tuple[str, ...]]]:
    """``(k, structures)`` of the axial panels: one per centre slice, nearest ones merged down to ``limit``.

    The External is shown on every panel; it gets its own only when it is the only structure.
    """
    organs = {n: s for n, s in stats.items() if s.total and n != EXTERNAL} or {
        n: s for n, s in stats.items() if s.total
    }
    groups: dict[int, list[str]] = {}
    for name, s in organs.items():
        groups.setdefault(s.centre_k(), []).append(name)
    panels = sorted((k, names) for k, names in groups.items())
    while len(panels) > limit:
        gap = min(range(len(panels) - 1), key=lambda n: panels[n + 1][0] - panels[n][0])
        (k0, a), (k1, b) = panels[gap], panels[gap + 1]
        # keep the slice of the group with the larger structures: it passes through more of them
        k = k0 if sum(organs[n].total for n in a) >= sum(organs[n].total for n in b) else k1
        panels[gap : gap + 2] = [(k, a + b)]
    return [(k, tuple(names)) for k, names in panels]


def _body_centre(stats: Mapping[str, _Stats], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(k, j, i)`` centroid of the External (else of every ROI); the volume centre if nothing is drawn."""
    chosen = [stats[EXTERNAL]] if EXTERNAL in stats and stats[EXTERNAL].total else list(stats.values())
    total = sum(s.total for s in chosen)
    if not total:
        return shape[0] // 2, shape[1] // 2, shape[2] // 2
    k = sum(k * n for s in chosen for k, n in s.counts.items()) / total
    j = sum(s.j_sum for s in chosen) / total
    i = sum(s.i_sum for s in chosen) / total
    return round(k), round(j), round(i)


# -- geometry of the panels -------------------------------------------------------------------


def direction_letter(vector: npt.ArrayLike) -> str:
    """The patient direction (L/R, P/A, S/I in DICOM LPS) a vector points to most."""
    v = np.asarray(vector, dtype=np.float64)
    axis = int(np.argmax(np.abs(v)))
    return _LETTERS[axis][0 if v[axis] > 0 else 1]


def edge_labels(affine: npt.NDArray[np.float64], u_axis: int, v_axis: int, v_down: bool) -> dict[str, str]:
    """Letters at the edges of a panel showing array axis ``u_axis`` across, ``v_axis`` downwards (or up).

    Array axes are ``0: k, 1: j, 2: i``; the affine's columns are the patient
    directions of ``i, j, k``.
    """
    right = affine[:3, 2 - u_axis]
    down = affine[:3, 2 - v_axis] * (1.0 if v_down else -1.0)
    return {
        "right": direction_letter(right),
        "left": direction_letter(-right),
        "bottom": direction_letter(down),
        "top": direction_letter(-down),
    }


def in_plane_axes(affine: npt.NDArray[np.float64], patient_axis: int) -> tuple[int, int]:
    """(held, across): the in-plane array axis (1: j, 2: i) along ``patient_axis`` (0: x, 1: y), the other.

    A coronal panel holds the axis along y, a sagittal one the axis along x, whatever the position.
    """
    along_i = abs(affine[patient_axis, 0]) / np.linalg.norm(affine[:3, 0])
    along_j = abs(affine[patient_axis, 1]) / np.linalg.norm(affine[:3, 1])
    return (2, 1) if along_i >= along_j else (1, 2)


# -- drawing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """One panel before drawing: the 2-D image, its contours per ROI and how it is oriented."""

    kind: str
    index: int
    fixed_axis: int
    u_axis: int
    image: npt.NDArray[Any]
    contours: Mapping[str, Polygons]  # ROI name → polygons in (u, v)
    aspect: float  # mm per v step / mm per u step
    v_down: bool
    structures: tuple[str, ...]
    title: str


def _axial_view(volume: CTVolume, rois: Sequence[Roi], k: int, names: tuple[str, ...]) -> _View:
    _, sj, si = volume.spacing
    z = float(volume.slice_z(k)[2])
    marked = [f"{n} {FLAG_MARK}" if _flagged(rois, n) else n for n in names]
    title = f"axial {k + 1}/{volume.shape[0]} (z {z:.1f} mm): " + ", ".join(marked)
    contours = {roi.name: list(roi.planes.get(k, [])) for roi in rois}
    return _View("axial", k, 0, 2, volume.hu[k], contours, sj / si, True, names, title)


def _side_view(volume: CTVolume, rois: Sequence[Roi], kind: str, centre: tuple[int, int, int]) -> _View:
    held, across = in_plane_axes(volume.affine, 1 if kind == "coronal" else 0)
    index = centre[held]
    image = np.take(volume.hu, index, axis=held)  # [k, across]
    contours = {roi.name: _cut(roi, volume.shape, held, index) for roi in rois}
    spacing = volume.spacing
    head_up = volume.affine[2, 2] > 0  # +k towards S: k grows upwards
    title = f"{kind} through the body centre ({'row' if held == 1 else 'column'} {index + 1})"
    return _View(
        kind, index, held, across, image, contours, spacing[0] / spacing[across], not head_up, (), title
    )


def _cut(roi: Roi, shape: tuple[int, int, int], held: int, index: int) -> Polygons:
    """Outline, in (across, k), of the ROI's filled contours on the plane ``held = index``."""
    n_across = shape[3 - held]
    section = np.zeros((shape[0], n_across), dtype=bool)
    for k, polygons in roi.planes.items():
        section[k] = np.take(fill_even_odd(polygons, shape[1:]), index, axis=held - 1)
    return [c.points for c in trace_mask(section[None])]


def _flagged(rois: Sequence[Roi], name: str) -> bool:
    return any(r.name == name and r.flags for r in rois)


def _header(rtstruct_path: Path, volume: CTVolume) -> str:
    ds = pydicom.dcmread(rtstruct_path, stop_before_pixels=True, specific_tags=["StructureSetLabel"])
    label = str(ds.get("StructureSetLabel", ""))
    return (
        f"{label or 'RTSTRUCT'}: contours read back from the file on the CT "
        f"({volume.shape[0]} slices, {volume.info.patient_position or 'position unknown'}), "
        f"W{WINDOW_WIDTH_HU:g}/L{WINDOW_LEVEL_HU:g}"
    )


def _draw(
    volume: CTVolume,
    rois: Sequence[Roi],
    axial: Sequence[tuple[int, tuple[str, ...]]],
    centre: tuple[int, int, int],
    header: str,
    out_png: Path,
) -> Preview:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    views = [_axial_view(volume, rois, k, names) for k, names in axial]
    views += [_side_view(volume, rois, kind, centre) for kind in ("coronal", "sagittal")]
    rows = math.ceil(len(axial) / COLUMNS) + 1
    width_in, height_in = COLUMNS * PANEL_IN, rows * PANEL_IN + HEADER_IN + FOOTER_IN
    figure = Figure(figsize=(width_in, height_in), dpi=DPI, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    figure.text(0.01, 1 - 0.6 * HEADER_IN / height_in, header, color="white", fontsize=8, va="center")
    axes = []
    for n, view in enumerate(views):
        slot = n if n < len(axial) else (rows - 1) * COLUMNS + (n - len(axial))
        ax = figure.add_axes(_slot_rect(slot, width_in, height_in))
        _draw_view(ax, view, volume, rois)
        axes.append(ax)
    legend_ax = figure.add_axes(_slot_rect((rows - 1) * COLUMNS + 2, width_in, height_in, span=2))
    _draw_legend(legend_ax, rois)
    _draw_footer(figure, rois, height_in)
    canvas.draw()  # type: ignore[no-untyped-call]  # (matplotlib leaves it unannotated)
    size = (round(width_in * DPI), round(height_in * DPI))
    panels = tuple(_panel(ax, view, volume, size[1]) for ax, view in zip(axes, views, strict=True))
    _save(canvas, out_png)
    return Preview(out_png, size, panels, {roi.name: roi.color for roi in rois})


def _slot_rect(
    slot: int, width_in: float, height_in: float, span: int = 1
) -> tuple[float, float, float, float]:
    """Figure-fraction rectangle of grid slot ``slot`` (row-major, :data:`COLUMNS` per row)."""
    row, col = divmod(slot, COLUMNS)
    pad = 0.06 * PANEL_IN
    left = col * PANEL_IN + pad
    top = HEADER_IN + row * PANEL_IN + 2 * pad  # room for the title
    size_w, size_h = span * PANEL_IN - 2 * pad, PANEL_IN - 3 * pad
    return (left / width_in, 1 - (top + size_h) / height_in, size_w / width_in, size_h / height_in)


def _draw_view(ax: Any, view: _View, volume: CTVolume, rois: Sequence[Roi]) -> None:
    from matplotlib.collections import LineCollection

    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    nv, nu = view.image.shape
    ax.imshow(
        view.image,
        cmap="gray",
        vmin=low,
        vmax=low + WINDOW_WIDTH_HU,
        interpolation="nearest",
        extent=(-0.5, nu - 0.5, nv - 0.5, -0.5),
    )
    ax.set_ylim((nv - 0.5, -0.5) if view.v_down else (-0.5, nv - 0.5))
    ax.set_aspect(view.aspect)
    ax.set_axis_off()
    for roi in rois:
        polygons = view.contours.get(roi.name) or []
        if polygons:
            # not antialiased: every contour pixel is exactly the ROI Display Color
            lines = LineCollection(
                [np.vstack([p, p[:1]]) for p in polygons],
                colors=[_rgb(roi.color)],
                linewidths=LINE_PX * 72 / DPI,
                antialiaseds=False,
            )
            ax.add_collection(lines)
    ax.set_title(textwrap.shorten(view.title, 80), color="white", fontsize=6, pad=2)
    _draw_letters(ax, view, volume)


_EDGE_TEXT = {  # axes-fraction position and alignment of each edge's letter
    "left": (0.01, 0.5, "left", "center"),
    "right": (0.99, 0.5, "right", "center"),
    "top": (0.5, 0.99, "center", "top"),
    "bottom": (0.5, 0.01, "center", "bottom"),
}


def _draw_letters(ax: Any, view: _View, volume: CTVolume) -> None:
    v_axis = 3 - view.fixed_axis - view.u_axis
    for edge, letter in edge_labels(volume.affine, view.u_axis, v_axis, view.v_down).items():
        x, y, ha, va = _EDGE_TEXT[edge]
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=8, weight="bold")


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255)


def _draw_legend(ax: Any, rois: Sequence[Roi]) -> None:
    from matplotlib.lines import Line2D

    ax.set_axis_off()
    if not rois:
        ax.text(0.0, 0.5, "no contours in the file", color="white", fontsize=8)
        return
    handles = [Line2D([], [], color=_rgb(r.color), linewidth=3) for r in rois]
    names = [f"{r.name} {FLAG_MARK} flagged" if r.flags else r.name for r in rois]
    legend = ax.legend(
        handles, names, loc="upper left", ncol=2, fontsize=7, frameon=False, labelcolor="white"
    )
    for text, roi in zip(legend.get_texts(), rois, strict=True):
        if roi.flags:
            text.set_color("#ff66ff")


def _draw_footer(figure: Any, rois: Sequence[Roi], height_in: float) -> None:
    lines = [f"{FLAG_MARK} {r.name}: {'; '.join(r.flags)}" for r in rois if r.flags]
    if len(lines) > MAX_FOOTER_LINES:
        lines = [
            *lines[: MAX_FOOTER_LINES - 1],
            f"… and {len(lines) - MAX_FOOTER_LINES + 1} more (see the job's flags)",
        ]
    text = "\n".join(textwrap.shorten(line, 170) for line in lines) or "no structure flagged for review"
    figure.text(0.01, 0.9 * FOOTER_IN / height_in, text, color="#ff66ff", fontsize=6, va="top")


def _panel(ax: Any, view: _View, volume: CTVolume, height_px: int) -> Panel:
    """The panel's place in the PNG (origin top left) and its pixel → data mapping."""
    extent = ax.get_window_extent()
    x0, x1 = extent.x0, extent.x1
    y0, y1 = height_px - extent.y1, height_px - extent.y0
    # display (origin bottom left) → data; a PNG pixel centre (x, y) is display (x + ½, H − y − ½)
    to_display = np.array([[1.0, 0.0, 0.5], [0.0, -1.0, height_px - 0.5], [0.0, 0.0, 1.0]])
    to_data = np.linalg.inv(ax.transData.get_affine().get_matrix()) @ to_display
    v_axis = 3 - view.fixed_axis - view.u_axis
    labels = edge_labels(volume.affine, view.u_axis, v_axis, view.v_down)
    bbox = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
    return Panel(view.kind, view.index, view.fixed_axis, view.u_axis, view.structures, labels, bbox, to_data)


def _save(canvas: Any, out_png: Path) -> None:
    """The drawn canvas as an RGB PNG, written atomically (drawn once: ``print_png`` would draw again)."""
    from PIL import Image

    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.{uuid.uuid4().hex}.tmp")
    width, height = canvas.get_width_height()
    image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    try:
        image.convert("RGB").save(tmp, format="PNG")
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)
