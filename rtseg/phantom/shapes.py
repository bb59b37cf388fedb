"""Smooth implicit shapes evaluated on a (deformed) voxel grid.

All coordinates are patient LPS millimetres. Shapes are lumpy ellipsoids and
tubes along smooth centre lines; nothing is a box. Each function works inside a
bounding box of the grid only, so a 256×256×200 grid stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.interpolate import CubicSpline

F32 = npt.NDArray[np.float32]
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """A canonical [z, y, x] grid: shape, spacing (mm) and LPS origin of voxel [0, 0, 0]."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # (x, y, z) of voxel [0, 0, 0]

    def axis(self, a: int, offset: float = 0.0) -> npt.NDArray[np.float32]:
        """Coordinates (mm) along canonical axis ``a`` (0 = z, 1 = y, 2 = x)."""
        origin = self.origin[2 - a]
        return (origin + (np.arange(self.shape[a]) + offset) * self.spacing[a]).astype(np.float32)

    def box(self, lo: npt.ArrayLike, hi: npt.ArrayLike, margin: float = 0.0) -> Box | None:
        """Index box covering LPS ``lo``..``hi`` (x, y, z); None if outside the grid."""
        lo_a, hi_a = np.asarray(lo, float) - margin, np.asarray(hi, float) + margin
        slices = []
        for a in range(3):
            p = 2 - a
            i0 = int(np.floor((lo_a[p] - self.origin[p]) / self.spacing[a]))
            i1 = int(np.ceil((hi_a[p] - self.origin[p]) / self.spacing[a])) + 1
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i0 >= i1:
                return None
            slices.append(slice(i0, i1))
        return (slices[0], slices[1], slices[2])


@dataclass
class Coords:
    """Deformed coordinates X, Y, Z (full 3-D float32 arrays) of a grid."""

    grid: Grid
    x: F32
    y: F32
    z: F32
    max_shift: float

    def sub(self, box: Box) -> tuple[F32, F32, F32]:
        return self.x[box], self.y[box], self.z[box]


def smooth_displacement(
    grid: Grid, rng: np.random.Generator, amplitude: float, wavelength: float, z_offset: float = 0.0
) -> Coords:
    """Coordinates displaced by a random sum of low-frequency sinusoids (smooth, no folds)."""
    z1 = grid.axis(0, z_offset)[:, None, None]
    y1 = grid.axis(1)[None, :, None]
    x1 = grid.axis(2)[None, None, :]
    out = []
    for base in (x1, y1, z1):
        field = np.zeros(grid.shape, np.float32)
        for _ in range(3):
            k = rng.normal(size=3)
            k *= 2 * np.pi / (wavelength * rng.uniform(0.7, 1.5) * np.linalg.norm(k))
            phase = rng.uniform(0, 2 * np.pi)
            field += np.float32(amplitude / 3 * rng.uniform(0.5, 1.5)) * np.sin(
                k[0] * x1 + k[1] * y1 + k[2] * z1 + np.float32(phase)
            ).astype(np.float32)
        out.append((base + field).astype(np.float32))
    return Coords(grid, out[0], out[1], out[2], max_shift=2 * amplitude)


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> npt.NDArray[np.float64]:
    """Rotation matrix from angles (degrees) about x, y, z."""
    ax, ay, az = np.radians([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    my = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    mz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return np.asarray(mz @ my @ mx)


@dataclass(frozen=True)
class Blob:
    """A lumpy ellipsoid: centre (x, y, z) mm, radii mm, rotation, low-order surface bumps."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: npt.NDArray[np.float64]
    bumps: npt.NDArray[np.float64]  # 9 coefficients: linear and quadratic in the unit direction

    @classmethod
    def make(
        cls,
        rng: np.random.Generator,
        center: npt.ArrayLike,
        radii: npt.ArrayLike,
        angles: tuple[float, float, float] = (0, 0, 0),
        lumpiness: float = 0.08,
    ) -> Blob:
        c = tuple(float(v) for v in np.asarray(center, float))
        r = tuple(float(v) for v in np.asarray(radii, float))
        return cls((c[0], c[1], c[2]), (r[0], r[1], r[2]), rotation(*angles), rng.normal(0, lumpiness, 9))

    def extent(self) -> float:
        return float(max(self.radii)) * (1.0 + float(np.abs(self.bumps).sum()))

    def level(self, coords: Coords, box: Box) -> F32:
        """Normalised radius: < 1 inside, 1 on the surface."""
        x, y, z = coords.sub(box)
        d = np.stack([x - self.center[0], y - self.center[1], z - self.center[2]]).reshape(3, -1)
        local = (self.rot.T @ d) / np.asarray(self.radii)[:, None]
        rho = np.sqrt((local**2).sum(0)) + 1e-6
        n = local / rho
        b = self.bumps
        bump = (
            b[0] * n[0]
            + b[1] * n[1]
            + b[2] * n[2]
            + b[3] * n[0] * n[1]
            + b[4] * n[1] * n[2]
            + b[5] * n[0] * n[2]
            + b[6] * (n[0] ** 2 - n[1] ** 2)
            + b[7] * (n[2] ** 2 - 0.33)
            + b[8] * n[0] * n[1] * n[2]
        )
        return np.asarray((rho / (1.0 + bump)).reshape(x.shape), dtype=np.float32)

    def bbox(self, coords: Coords) -> Box | None:
        e = self.extent() + coords.max_shift
        return coords.grid.box(np.subtract(self.center, e), np.add(self.center, e))


@dataclass(frozen=True)
class Tube:
    """A tube along a smooth centre line through control points (mm) with per-point radii."""

    points: npt.NDArray[np.float64]  # (n, 3) samples along the centre line, x y z
    radii: npt.NDArray[np.float64]  # (n,)
    s: npt.NDArray[np.float64]  # (n,) arc length (mm)

    @classmethod
    def through(
        cls,
        control: npt.ArrayLike,
        radius: float | npt.ArrayLike,
        step: float | None = None,
        modulation: tuple[float, float] | None = None,
    ) -> Tube:
        """Spline through ``control`` (k, 3); ``radius`` scalar or per control point.

        ``modulation`` (relative depth, period mm) adds haustra-like bulges.
        """
        ctrl = np.asarray(control, float)
        seg = np.linalg.norm(np.diff(ctrl, axis=0), axis=1)
        t = np.concatenate([[0.0], np.cumsum(seg)])
        spline = CubicSpline(t, ctrl, bc_type="natural")
        r_ctrl = np.broadcast_to(np.asarray(radius, float), (len(ctrl),))
        step = step or max(0.5, float(r_ctrl.min()) / 3)
        tt = np.linspace(0, t[-1], max(2, int(t[-1] / step) + 1))
        pts = spline(tt)
        radii = np.interp(tt, t, r_ctrl)
        s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        if modulation:
            depth, period = modulation
            radii = radii * (1 + depth * np.cos(2 * np.pi * s / period))
        return cls(pts, radii, s)

    @classmethod
    def polyline(cls, pts: npt.ArrayLike, radius: float, step: float) -> Tube:
        """A tube along an already dense path (e.g. a random walk)."""
        p = np.asarray(pts, float)
        s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        # resample to ``step``
        n = max(2, int(s[-1] / step) + 1)
        ss = np.linspace(0, s[-1], n)
        res = np.stack([np.interp(ss, s, p[:, a]) for a in range(3)], axis=1)
        return cls(res, np.full(n, radius), ss)

    def level(
        self,
        coords: Coords,
        out: npt.NDArray[np.float32] | None = None,
        arc: npt.NDArray[np.float32] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Normalised distance d / r(s) to the centre line over the whole grid (inf far away).

        If ``arc`` is given it receives the arc length of the nearest centre-line sample.
        """
        grid = coords.grid
        level = out if out is not None else np.full(grid.shape, np.inf, np.float32)
        for p, r, s in zip(self.points, self.radii, self.s, strict=True):
            box = grid.box(p - r, p + r, margin=coords.max_shift + 1.0)
            if box is None:
                continue
            x, y, z = coords.sub(box)
            q = np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / np.float32(r)
            cur = level[box]
            better = q < cur
            cur[better] = q[better]
            if arc is not None:
                arc[box][better] = np.float32(s)
        return level


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma_vox: Any) -> F32:
    """Zero-mean unit-variance Gaussian noise smoothed by ``sigma_vox`` voxels."""
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    std = float(n.std()) or 1.0
    return np.asarray(n / std, dtype=np.float32)
