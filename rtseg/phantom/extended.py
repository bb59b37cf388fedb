"""Anatomy beyond the upper abdomen: a pelvis below the phantom and an upper thorax above it.

Opt-in (``Realism(coverage=...)``): the plain phantom is built as always on its
own grid, then a slab below (iliac crest to below the femoral heads) and a slab
above (lung bases' level to the lung apices and the shoulder girdle) are built
on grids that continue it slice for slice. Each slab is drawn by a builder with
the patient's own seed, so the smooth deformation, the arms, the table, the
spine (radius, level, vertebral period) and the heart are those of the plain
phantom and continue across the joins; everything new is drawn from generators
of its own.

Labels: the 19 structures are upper-abdominal. In the slabs only the lungs
(Lung_L, Lung_R, up to their apices) and the heart (its upper part) carry their
labels, because those whole organs continue there. Everything else is body
(label 1): the pelvic bones, bladder, rectum and sigmoid, the thoracic and
sacral vertebrae, the cord above the phantom and the great vessels. VBs,
SpinalCord, A_Aorta and Esophagus keep their label over the plain phantom's
range only, as the model's training labels define them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rtseg.phantom.anatomy import Body, Patient, _Builder
from rtseg.phantom.realism import Effects, bowel_contents
from rtseg.phantom.shapes import F32, Grid, Tube
from rtseg.structures import BY_NAME

PELVIS_HALF_LENGTHS = 1.1  # the pelvis slab: iliac crest (t = -1) to below the femoral heads
THORAX_HALF_LENGTHS = 0.7  # the thorax slab: t = 1 to just above the lung apices (t = 1.6)
APEX_T = 1.6  # lung apex, in half-lengths above the renal hila
FEMORAL_HEAD_T = -1.72
THORAX_CUT_T = 0.45  # a thorax-only scan starts above the diaphragm domes (at most 0.42)
KEEP_LABELS = ("Lung_L", "Lung_R", "Heart")

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Extent:
    """How many slices the slabs add below and above the plain grid."""

    below: int
    above: int


def extent(patient: Patient, grid: Grid) -> Extent:
    """Slices of the pelvis slab (below) and the thorax slab (above) for ``grid``'s thickness."""
    step = grid.spacing[0]
    return Extent(
        math.ceil(PELVIS_HALF_LENGTHS * patient.half_length / step),
        math.ceil(THORAX_HALF_LENGTHS * patient.half_length / step),
    )


def extended_grid(patient: Patient, grid: Grid) -> Grid:
    """The plain grid with the slabs' slices added below and above."""
    e = extent(patient, grid)
    step = grid.spacing[0]
    origin = (grid.origin[0], grid.origin[1], grid.origin[2] - e.below * step)
    return Grid((grid.shape[0] + e.below + e.above, grid.shape[1], grid.shape[2]), grid.spacing, origin)


def _slab(grid: Grid, first: int, n: int) -> Grid:
    """The grid of ``n`` slices starting ``first`` slices above ``grid``'s first (negative: below)."""
    origin = (grid.origin[0], grid.origin[1], grid.origin[2] + first * grid.spacing[0])
    return Grid((n, grid.shape[1], grid.shape[2]), grid.spacing, origin)


def extend_body(
    core: Body, patient: Patient, grid: Grid, z_offset: float, couch: bool, effects: Effects
) -> Body:
    """``core`` (built on ``grid``) with the pelvis below and the upper thorax above it."""
    e = extent(patient, grid)
    pelvis = _Pelvis(patient, _slab(grid, -e.below, e.below), z_offset, couch, effects).build()
    thorax = _Thorax(patient, _slab(grid, grid.shape[0], e.above), z_offset, couch, effects).build()
    metal = None
    if core.metal is not None:
        pad = np.zeros_like(core.metal[:1])
        metal = np.concatenate([np.repeat(pad, e.below, 0), core.metal, np.repeat(pad, e.above, 0)])
    notes = dict(core.notes)
    notes["coverage"] = {"pelvis_slices": e.below, "thorax_slices": e.above, **pelvis.notes, **thorax.notes}
    return Body(
        np.concatenate([pelvis.labels, core.labels, thorax.labels]),
        np.concatenate([pelvis.hu, core.hu, thorax.hu]),
        notes,
        metal,
    )


class _Slab(_Builder):
    """A builder of a slab beyond the plain phantom: shared body wall, spine and bone painting."""

    def paint_bone(self, depth: F32, marrow: float = 0.0) -> None:
        """Bone where ``depth`` (mm inside its surface) > 0: a cortical shell, cancellous inside."""
        cortex = 1.0 + 0.08 * self.age  # mm
        inside = (depth > 0) & self.body_mask
        img = np.where(depth < cortex, self.patient.tissue("cortical"), self.patient.tissue("cancellous"))
        self.paint(inside, 1, (img - np.where(depth >= cortex, marrow, 0.0)).astype(np.float32))

    def spine_to(self, lowest_t: float) -> None:
        """The plain phantom's spine, labelled body, above ``lowest_t`` only (the sacrum below)."""
        t = self.coords.z / self.half_length
        above: Mask = t > lowest_t
        parts = list(self._spine_parts)
        for i in (0, 2, 4, 6):  # vertebral bodies, discs, arches and canal end at the sacrum
            parts[i] = np.logical_and(parts[i], above)
        self._spine_parts = tuple(parts)  # type: ignore[assignment]
        self.paint_spine()

    def finish(self) -> Body:
        keep = np.isin(self.labels, [0] + [BY_NAME[n].label for n in KEEP_LABELS])
        self.labels[~keep] = 1
        self.labels[~self.body_mask] = 0
        return Body(self.labels, self.hu, self.notes)


class _Pelvis(_Slab):
    """Iliac wings, sacrum, acetabula, femoral heads and necks, pubis and ischia; bladder, rectum."""

    def build(self) -> Body:
        self.body()
        self.spine()
        self.rng = np.random.default_rng([self.patient.seed, 23])  # the rest: a generator of its own
        c = self.coords
        self.u, self.v, self.t = c.x / self.width, c.y / self.depth, c.z / self.half_length
        self.muscles()
        self.bladder()
        self.rectum()
        self.spine_to(-1.12)
        self.ilium()
        self.sacrum()
        self.hips()
        return self.finish()

    def muscles(self) -> None:
        """Gluteal, iliopsoas and hip muscles fill the cavity outside a pelvic fat core."""
        u, v, t = self.u, self.v, self.t
        core = (u / 0.52) ** 2 + ((v + 0.05) / 0.55) ** 2 < 1.0 - 0.25 * np.clip(-1.0 - t, 0.0, 1.0)
        self.hu[self.cavity & ~core & (t < -1.08)] = self.patient.tissue("muscle")  # below the crest

    def bladder(self) -> None:
        fill = float(self.rng.uniform(0.6, 1.1))
        centre = (0.0, -0.3 * self.depth, -1.62 * self.half_length)
        radii = np.array([0.32 * self.width, 0.26 * self.depth, 0.24 * self.half_length]) * fill
        c = self.coords
        level = np.sqrt(
            ((c.x - centre[0]) / radii[0]) ** 2
            + ((c.y - centre[1]) / radii[1]) ** 2
            + ((c.z - centre[2]) / radii[2]) ** 2
        )
        wall = 1.0 - (1.5 + 0.06 * self.age) / float(radii.min())
        self.paint((level < 1.0) & self.cavity, 1, self.patient.tissue("wall"))
        self.paint((level < wall) & self.cavity, 1, self.patient.tissue("water"))  # urine
        self.notes["bladder_ml"] = round(4.19 * float(np.prod(radii)) / 1000.0, 1)

    def rectum(self) -> None:
        """Sigmoid from the descending colon's end into the rectum in front of the sacrum."""
        w, d, h = self.width, self.depth, self.half_length
        r = (8 + 0.8 * (self.age - 1)) * 0.85
        ctrl = [
            (0.62 * w, 0.1 * d, -0.95 * h),
            (0.45 * w, -0.15 * d, -1.25 * h),
            (0.05 * w, -0.2 * d, -1.32 * h),
            (-0.05 * w, 0.35 * d, -1.38 * h),
            (0.0, 0.42 * d, -1.6 * h),
            (0.0, 0.36 * d, -2.05 * h),
        ]
        tube = Tube.through(ctrl, r, modulation=(0.12, 2.2 * r))
        level = tube.level(self.coords)
        mask = (level < 1.0) & self.cavity
        lumen = level < 1.0 - (1.5 + 0.05 * self.age) / r
        img = np.full(self.grid.shape, self.patient.tissue("wall"), np.float32)
        fluid = 250.0 if self.patient.oral_contrast else self.patient.tissue("water")
        contents = bowel_contents("colon", self.grid.shape, fluid, self.rng)
        img[lumen] = contents[lumen]
        self.paint(mask, 1, img)

    def ilium(self) -> None:
        """Iliac wings: curved plates from the sacroiliac joints, lateral and forward to the crest."""
        u, v, t = self.u, self.v, self.t
        wing = (t < -0.98) & (t > FEMORAL_HEAD_T) & (v > -0.3) & (np.abs(u) > 0.2)
        a = 0.8 - 0.25 * np.clip((-1.0 - t) / 0.7, 0.0, 1.0)  # the wings narrow down to the acetabula
        ell = np.sqrt((u / a) ** 2 + ((v - 0.1) / 0.6) ** 2)
        half = (2.0 + 0.25 * self.age) * (1.0 + 2.0 * np.clip((-1.3 - t) / 0.4, 0.0, 1.0))  # mm
        depth = np.where(wing, half - np.abs(ell - 1.0) * 0.7 * self.width, -1.0).astype(np.float32)
        self.paint_bone(depth)

    def sacrum(self) -> None:
        """A wedge between the wings, tilted back, narrowing to the coccyx."""
        v, t = self.v, self.t
        s = np.clip((-1.1 - t) / 0.75, 0.0, 1.0)  # 0 at the top (S1), 1 at the tip
        half_x = (0.3 - 0.22 * s) * self.width
        yc = (0.6 + 0.12 * s) * self.depth
        half_y = (0.12 - 0.05 * s) * self.depth
        depth = np.minimum(half_x - np.abs(self.coords.x), half_y - np.abs(self.coords.y - yc))
        self.paint_bone(np.where((t < -1.1) & (t > -1.85) & (v > 0.2), depth, -1.0).astype(np.float32))

    def hips(self) -> None:
        """Femoral heads in the acetabula, necks to the trochanters, shafts; pubis and ischia."""
        w, d, h = self.width, self.depth, self.half_length
        head_r = (0.095 + 0.01 * self.age / 16) * h
        c = self.coords
        for side in (-1.0, 1.0):
            centre = np.array([side * 0.55 * w, -0.02 * d, FEMORAL_HEAD_T * h])
            dist = np.sqrt((c.x - centre[0]) ** 2 + (c.y - centre[1]) ** 2 + (c.z - centre[2]) ** 2)
            socket = np.where(c.x * side < centre[0] * side + 0.2 * head_r, 1.45 * head_r - dist, -1.0)
            self.paint_bone(np.minimum(socket, dist - 1.1 * head_r).astype(np.float32))  # acetabulum
            neck = Tube.through(
                [tuple(centre), (side * 0.74 * w, 0.02 * d, (FEMORAL_HEAD_T - 0.14) * h)], 0.55 * head_r
            )
            shaft = Tube.through(
                [(side * 0.74 * w, 0.02 * d, (FEMORAL_HEAD_T - 0.14) * h), (side * 0.6 * w, 0.0, -2.3 * h)],
                0.5 * head_r,
            )
            for tube in (neck, shaft):
                self.paint_bone(((1.0 - tube.level(c)) * 0.5 * head_r).astype(np.float32), marrow=120.0)
            self.paint_bone((head_r - dist).astype(np.float32))
        u, v, t = self.u, self.v, self.t
        ring = np.sqrt((u / 0.5) ** 2 + ((v - 0.05) / 0.72) ** 2)
        lower = (t < FEMORAL_HEAD_T + 0.05) & (t > FEMORAL_HEAD_T - 0.3) & (np.abs(u) > 0.06)
        pubis_ischium = lower & ((v < -0.45) | (v > 0.25)) & (np.abs(u) < 0.5)
        half = 2.5 + 0.3 * self.age
        self.paint_bone(np.where(pubis_ischium, half - np.abs(ring - 1.0) * 0.6 * w, -1.0).astype(np.float32))
        self.notes["femoral_head_z_mm"] = round(FEMORAL_HEAD_T * h, 1)


class _Thorax(_Slab):
    """Lungs up to their apices, heart top, trachea and great vessels, ribs, clavicles, scapulae."""

    def build(self) -> Body:
        self.body()
        self.spine()
        self.thorax()  # the heart (same blob as the plain phantom's) and the lungs
        self.rng = np.random.default_rng([self.patient.seed, 29])
        c = self.coords
        self.u, self.v, self.t = c.x / self.width, c.y / self.depth, c.z / self.half_length
        self.apices()
        self.mediastinum()
        self.spine_to(-np.inf)
        self.ribs()
        self.shoulders()
        return self.finish()

    def apices(self) -> None:
        """Lungs narrow to domes at the apices; above and beside them the fat of the neck base."""
        taper = np.sqrt(np.clip(1.0 - ((self.t - 1.0) / (APEX_T - 1.0)) ** 2, 0.0, 1.0))
        lungs = np.isin(self.labels, [BY_NAME["Lung_L"].label, BY_NAME["Lung_R"].label])
        gone = lungs & (self.r_body > self.wall_r * taper)
        self.paint(gone, 1, self.patient.tissue("visceral"))
        self.notes["lung_apex_z_mm"] = round(APEX_T * self.half_length, 1)

    def mediastinum(self) -> None:
        """Aorta and its arch's branches, superior vena cava, trachea and oesophagus (all body)."""
        w, d, h = self.width, self.depth, self.half_length
        ra = self.aorta_r
        heart = self.labels == BY_NAME["Heart"].label
        ends = (1.0 * h, 1.45 * h)
        tubes = (
            ((0.09 * w, self.aorta_y), ra, "artery"),  # descending aorta
            ((0.05 * w, -0.25 * d), 1.1 * ra, "artery"),  # ascending aorta
            ((-0.16 * w, -0.22 * d), 1.0 * ra, "vein"),  # superior vena cava
        )
        for (x, y), r, tissue in tubes:
            level = Tube.through([(x, y, ends[0]), (x, y, ends[1])], r).level(self.coords)
            self.paint((level < 1.0) & self.cavity & ~heart, 1, self.patient.tissue(tissue))
        y_t = self.aorta_y - ra - 0.12 * d
        r_t = 3.5 + 0.35 * self.age
        level = Tube.through([(0.0, y_t, ends[0]), (0.0, y_t, 2.0 * h)], r_t).level(self.coords)
        trachea = (level < 1.0) & self.body_mask & ~heart & (self.t > 1.12)
        self.paint(trachea, 1, self.patient.tissue("wall"))
        self.paint(trachea & (level < 1.0 - 1.5 / r_t), 1, self.patient.tissue("air"))

    def shoulders(self) -> None:
        """Clavicles (sternum to acromion, anterior) and scapulae (plates behind the ribs)."""
        u, v, t = self.u, self.v, self.t
        h = self.half_length
        t_clav = 1.5 + 0.25 * np.abs(u) ** 2
        half = (1.5 + 0.18 * self.age) / h  # in half-lengths
        front = np.abs(v + 0.6 + 0.35 * u**2) < 0.12  # the clavicles curve back laterally
        clavicle = (np.abs(t - t_clav) < half * 1.6) & (np.abs(u) > 0.06) & front
        depth = np.where(clavicle, half * h * 1.6 - np.abs(t - t_clav) * h, -1.0)
        self.paint_bone(depth.astype(np.float32))
        plate = (t > 1.05) & (t < 1.55) & (np.abs(u) > 0.3) & (np.abs(u) < 0.85)
        scap = np.abs(v - (0.78 - 0.1 * np.abs(u))) * self.depth
        self.paint_bone(np.where(plate, 1.2 + 0.12 * self.age - scap, -1.0).astype(np.float32))
