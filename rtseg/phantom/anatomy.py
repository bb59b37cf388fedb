"""Pediatric upper-abdominal anatomy: label map and noise-free HU on a canonical grid.

The body frame is LPS millimetres with the body axis at x = y = 0 and z = 0 at
the level of the renal hila. Sizes scale with age (1–16 y); every case also
gets its own habitus, organ jitter and a smooth random deformation, and one of
the post-operative variants of the seed study (nephrectomy, renal tumour,
neuroblastoma) where drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from rtseg.phantom.realism import Effects, bowel_contents
from rtseg.phantom.shapes import F32, Blob, Coords, Grid, Tube, smooth_displacement, smooth_noise
from rtseg.structures import BY_NAME

VARIANTS = ("normal", "nephrectomy_L", "nephrectomy_R", "renal_tumour", "neuroblastoma")

# HU per tissue and contrast phase: non-contrast, arterial, portal venous.
HU: dict[str, tuple[float, float, float]] = {
    "fat": (-95, -95, -95),
    "visceral": (-75, -72, -70),
    "muscle": (50, 55, 62),
    "liver": (58, 72, 112),
    "spleen": (48, 100, 118),
    "cortex": (35, 175, 155),
    "medulla": (33, 70, 140),
    "pelvis": (8, 8, 10),
    "pancreas": (42, 112, 96),
    "artery": (45, 320, 170),
    "vein": (42, 85, 150),
    "blood": (45, 240, 155),
    "myocardium": (50, 110, 100),
    "wall": (42, 90, 100),
    "water": (5, 5, 5),
    "bile": (8, 8, 8),
    "lung": (-840, -840, -840),
    "cancellous": (210, 210, 210),
    "cortical": (650, 650, 650),
    "cord": (40, 40, 40),
    "csf": (6, 6, 6),
    "tumour": (36, 58, 74),
    "air": (-1000, -1000, -1000),
}
PHASES = ("nc", "art", "pv")


@dataclass(frozen=True)
class Patient:
    """Everything drawn for one case that shapes its anatomy."""

    age: float
    variant: str
    phase: str
    oral_contrast: bool
    prone: bool
    width: float  # half-width of the abdomen (mm)
    depth: float  # half AP diameter (mm)
    half_length: float  # half the cranio-caudal scan range (mm)
    fat: float  # subcutaneous fat thickness (mm)
    seed: int

    def tissue(self, name: str) -> float:
        return HU[name][PHASES.index(self.phase)]


def draw_patient(
    rng: np.random.Generator,
    variant_weights: tuple[float, ...],
    phase_weights: dict[str, float],
    oral_share: float,
    prone: bool,
    ages: tuple[float, float] = (1.0, 16.0),
) -> Patient:
    age = float(rng.uniform(*ages))
    habitus = rng.normal(1.0, 0.06)
    return Patient(
        age=age,
        variant=str(rng.choice(VARIANTS, p=np.asarray(variant_weights) / sum(variant_weights))),
        phase=str(rng.choice(list(phase_weights), p=np.asarray(list(phase_weights.values())))),
        oral_contrast=bool(rng.random() < oral_share),
        prone=prone,
        width=(62 + 6.0 * (age - 1)) * habitus * rng.normal(1.0, 0.04),
        depth=(52 + 3.6 * (age - 1)) * habitus * rng.normal(1.0, 0.04),
        half_length=(72 + 6.3 * (age - 1)) * rng.normal(1.0, 0.03),
        fat=float(np.clip(3 + 0.7 * (age - 1) * rng.uniform(0.3, 1.6), 2, 22)),
        seed=int(rng.integers(2**31)),
    )


@dataclass
class Body:
    """The generated case: labels, noise-free HU and where things are (for tests and notes)."""

    labels: npt.NDArray[np.uint8]
    hu: F32
    notes: dict[str, object] = field(default_factory=dict)
    metal: F32 | None = None  # true HU of metal (0 elsewhere), painted with its streaks later


class _Builder:
    """Paints one case. Methods are called in anatomical priority order."""

    def __init__(
        self,
        patient: Patient,
        grid: Grid,
        z_offset: float = 0.0,
        couch: bool = False,
        effects: Effects | None = None,
    ) -> None:
        self.patient = patient
        self.couch = couch
        self.effects = effects or Effects()
        self.metal: F32 | None = None
        self.grid = grid
        self.rng = np.random.default_rng(patient.seed)
        amp = 2.0 + 0.25 * patient.age
        self.coords = smooth_displacement(
            grid, self.rng, amplitude=amp, wavelength=3.0 * patient.width, z_offset=z_offset
        )
        self.labels = np.zeros(grid.shape, np.uint8)
        self.hu = np.full(grid.shape, HU["air"][0], np.float32)
        self.width, self.depth, self.half_length = patient.width, patient.depth, patient.half_length
        self.push: Callable[[Coords], Coords] | None = None
        self.notes: dict[str, object] = {}
        self.age = patient.age

    # ---- helpers -------------------------------------------------------------
    def jitter(self, scale: float) -> float:
        """Jitter in mm."""
        return float(self.rng.normal(0, scale))

    def position(self, u: float, v: float, t: float, jitter: float = 0.04) -> npt.NDArray[np.float64]:
        """Normalised body position → mm, with jitter relative to body size."""
        return np.array(
            [
                (u + self.jitter(jitter)) * self.width,
                (v + self.jitter(jitter)) * self.depth,
                (t + self.jitter(jitter)) * self.half_length,
            ]
        )

    def organ_coords(self) -> Coords:
        return self.push(self.coords) if self.push else self.coords

    def paint(
        self,
        mask: npt.NDArray[np.bool_],
        label: int | None,
        hu: F32 | float,
        box: tuple[slice, slice, slice] | None = None,
    ) -> None:
        lab = self.labels if box is None else self.labels[box]
        img = self.hu if box is None else self.hu[box]
        if label is not None:
            lab[mask] = label
        img[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu

    def blob_mask(
        self, blob: Blob, coords: Coords
    ) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.bool_], F32] | None:
        box = blob.bbox(coords)
        if box is None:
            return None
        level = blob.level(coords, box)
        return box, level < 1.0, level

    # ---- body wall -------------------------------------------------------------
    def body(self) -> None:
        c = self.coords
        u = c.x / self.width
        v = c.y / self.depth
        t = c.z / self.half_length
        table_side = v > 0 if not self.patient.prone else v < 0  # flattened where the patient lies
        v_eff = np.where(table_side, v * 1.12, v)
        widen = 1.0 + 0.05 * np.clip(t, -1, 1)
        r = (np.abs(u / widen) ** 2.3 + np.abs(v_eff) ** 2.3) ** (1 / 2.3)
        self.r_body = r.astype(np.float32)
        body = r < 1.0
        inner_fat = 1.0 - self.patient.fat / self.depth
        muscle_t = (4 + 0.35 * self.age) / self.depth
        self.cavity = r < inner_fat - muscle_t
        self.paint(body, 1, self.patient.tissue("fat"))
        self.paint((r < inner_fat) & body, 1, self.patient.tissue("muscle"))
        self.paint(self.cavity, 1, self.patient.tissue("visceral"))
        self.body_mask = body
        self.wall_r = inner_fat - muscle_t
        if self.effects.arms_down:
            self._arms()
        if self.couch:
            self._couch()
        else:
            self._table()

    def _arms(self) -> None:
        """Arms beside the trunk: body (label 1) of fat, muscle and humerus, never an organ.

        Drawn from its own generator, so the trunk's anatomy is that of the same case
        with the arms up (out of the field).
        """
        rng = np.random.default_rng([self.patient.seed, 13])
        c = self.coords
        t = c.z / self.half_length
        down = c.y if not self.patient.prone else -c.y
        radius = self.width * float(rng.uniform(0.24, 0.32))
        for side in (-1.0, 1.0):
            cx = side * (1.06 * self.width + float(rng.uniform(2.0, 10.0)) + radius)
            cy = (
                float(rng.normal(0.05, 0.06)) - 0.12 * np.clip(t, -1, 1)
            ) * self.depth  # forearms lie anterior
            if self.patient.prone:
                cy = -cy
            d = np.sqrt((c.x - cx) ** 2 + ((c.y - cy) / 1.15) ** 2) / radius
            arm = (d < 1.0) & ~self.body_mask & (down < self.depth / 1.12)  # resting on the table
            bone = float(rng.uniform(0.17, 0.22))
            self.paint(arm, 1, self.patient.tissue("fat"))
            self.paint(arm & (d < 0.82), 1, self.patient.tissue("muscle"))
            self.paint(arm & (d < bone), 1, self.patient.tissue("cortical"))
            self.paint(arm & (d < 0.6 * bone), 1, self.patient.tissue("cancellous") - 120.0)  # fatty marrow
            self.body_mask = self.body_mask | arm
        self.notes["arms_down"] = {"radius_mm": round(radius, 1)}

    def _metal(self) -> None:
        """Surgical clips near a hilum and a pair of pedicle screws: metal HU only, no label.

        The metal is kept apart (:attr:`Body.metal`) so that its streaks are added after
        the slice profile and breathing, as a reconstruction would.
        """
        rng = np.random.default_rng([self.patient.seed, 19])
        metal = np.zeros(self.grid.shape, np.float32)
        c = self.coords
        hilum = np.array(
            [
                float(rng.choice([-1.0, 1.0])) * 0.25 * self.width,
                0.2 * self.depth,
                rng.uniform(-0.3, 0.2) * self.half_length,
            ]
        )
        for _ in range(int(rng.integers(3, 7))):
            p = hilum + rng.normal(0, 6.0, 3)
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            rel = np.stack([c.x - p[0], c.y - p[1], c.z - p[2]])
            along = np.tensordot(axis, rel, axes=1)
            across = np.sqrt(np.maximum((rel**2).sum(axis=0) - along**2, 0.0))
            metal[(np.abs(along) < 3.0) & (across < 0.9) & self.cavity] = 5000.0  # titanium clip
        z_screw = float(rng.uniform(-0.4, 0.3)) * self.half_length
        for side in (-1.0, 1.0):  # screws through the pedicles into the vertebral body
            x0 = side * 0.45 * self.spine_r
            along_y = (c.y > self.spine_y - 0.6 * self.spine_r) & (c.y < self.spine_y + 2.2 * self.spine_r)
            shaft = np.hypot(c.x - x0 - side * 0.15 * (c.y - self.spine_y), c.z - z_screw) < 2.5
            metal[shaft & along_y & self.body_mask] = 9000.0  # titanium alloy screw
        self.metal = metal
        self.notes["metal"] = {"clips": True, "screws_z_mm": round(z_screw, 1)}

    def _table(self) -> None:
        """Couch under the patient: posterior when supine, anterior when prone."""
        sign = 1.0 if not self.patient.prone else -1.0
        d = sign * self.coords.y - self.depth / 1.12 - 3.0  # distance below the body on the table side
        thick = 12.0 + 0.5 * self.age
        slab = (d > 0) & (d < thick) & (np.abs(self.coords.x) < self.width * 1.6) & (self.labels == 0)
        shell = slab & ((d < 2) | (d > thick - 2))
        self.hu[slab] = -880
        self.hu[shell] = 120

    def _couch(self) -> None:
        """Treatment couch: curved carbon-fibre top, mattress and vacuum bag, none of them body.

        Drawn from its own generator (seeded by the patient), so a case with the couch
        has the anatomy, noise and labels of the same case without it.
        """
        rng = np.random.default_rng([self.patient.seed, 7])
        shape = self.grid.shape
        y = np.broadcast_to(self.grid.axis(1)[None, :, None], shape)  # undeformed: a couch is rigid
        down = y if not self.patient.prone else -y  # towards the table
        x = np.broadcast_to(self.grid.axis(2)[None, None, :], shape)
        back = self.depth / 1.12  # the flattened back of :meth:`body`
        outside = ~self.body_mask
        mattress_mm = float(rng.uniform(15.0, 30.0))
        top = back + mattress_mm - 0.0004 * x * x  # concave top: the sides rise towards the patient
        self._couch_top(down, x, top, outside, rng)
        sink = back - 0.25 * self.patient.fat  # the patient sinks a little into the mattress
        mattress = outside & (down > sink) & (down < top) & (np.abs(x) < 1.5 * self.width)
        compressed = np.clip(1.0 - np.abs(x) / (1.1 * self.width), 0.0, 1.0)  # denser under the patient
        texture = 40.0 * smooth_noise(self.grid.shape, rng, 1.5)
        self.hu[mattress] = np.clip(-800.0 + 380.0 * compressed + texture, -800.0, -420.0)[mattress]
        bag = (
            outside & ~mattress & (down > 0.15 * self.depth) & (down < top) & (np.abs(x) < 1.35 * self.width)
        )
        self.hu[bag] = np.clip(-780.0 + 1.5 * texture, -850.0, -700.0)[bag]  # polystyrene beads
        self.notes["couch"] = {"mattress_mm": round(mattress_mm, 1)}

    def _couch_top(
        self, down: F32, x: F32, top: F32, outside: npt.NDArray[np.bool_], rng: np.random.Generator
    ) -> None:
        """A curved table top: 2 mm carbon-fibre skins around a foam core."""
        thick = float(rng.uniform(40.0, 55.0))
        depth = down - top
        slab = (depth > 0) & (depth < thick) & (np.abs(x) < 2.5 * self.width) & outside
        skin = slab & ((depth < 2.0) | (depth > thick - 2.0))
        self.hu[slab] = -800.0 + 60.0 * smooth_noise(self.grid.shape, rng, 2.0)[slab]
        self.hu[skin] = float(rng.uniform(-100.0, 200.0))

    # ---- thorax ---------------------------------------------------------------
    def diaphragm_t(self, coords: Coords | None = None) -> F32:
        c = coords or self.coords
        u, v = c.x / self.width, c.y / self.depth
        dome_r = 0.08 + 0.34 * (1 - ((u + 0.42) / 0.62) ** 2 - ((v + 0.05) / 1.05) ** 2)
        dome_l = 0.05 + 0.30 * (1 - ((u - 0.45) / 0.62) ** 2 - ((v + 0.05) / 1.05) ** 2)
        return np.maximum(dome_r, dome_l).astype(np.float32)

    def thorax(self) -> None:
        c = self.coords
        t = c.z / self.half_length
        self.above = (t > self.diaphragm_t()) & self.cavity
        heart = Blob.make(
            self.rng,
            self.position(0.14, -0.22, 0.62, 0.03),
            (0.40 * self.width, 0.42 * self.depth, 0.36 * self.half_length),
            (0, 0, 28 + self.jitter(6)),
            0.05,
        )
        box, mask, _ = self.blob_mask(heart, c) or (None, None, None)
        if box is not None:
            mask &= self.above[box]
            self.paint(mask, BY_NAME["Heart"].label, self.patient.tissue("myocardium"), box)
            inner = mask & (heart.level(c, box) < 0.78)
            self.hu[box][inner] = self.patient.tissue("blood")
        u = c.x / self.width
        v = c.y / self.depth
        medi = (np.abs(u - 0.03) < 0.17) & (v > -0.55) & (v < 0.45)
        lung = self.above & ~medi & (self.labels == 1)
        lung &= self.r_body < self.wall_r - 0.02
        tex = self.patient.tissue("lung") + 25 * smooth_noise(self.grid.shape, self.rng, 1.2)
        self.paint(lung & (c.x > 0), BY_NAME["Lung_L"].label, tex)
        self.paint(lung & (c.x <= 0), BY_NAME["Lung_R"].label, tex)
        # diaphragm muscle between lungs and abdomen
        t_d = self.diaphragm_t()
        dia = self.cavity & (np.abs(t - t_d) * self.half_length < 2.0 + 0.12 * self.age) & (self.labels == 1)
        self.hu[dia] = self.patient.tissue("muscle")

    # ---- solid organs -----------------------------------------------------------
    def liver(self) -> None:
        c = self.organ_coords()
        right = Blob.make(
            self.rng,
            self.position(-0.36, -0.05, 0.14),
            (0.56 * self.width, 0.78 * self.depth, 0.44 * self.half_length),
            (self.jitter(5), self.jitter(5), 10 + self.jitter(5)),
            0.06,
        )
        left = Blob.make(
            self.rng,
            self.position(0.14, -0.48, 0.24),
            (0.36 * self.width, 0.33 * self.depth, 0.22 * self.half_length),
            (0, 0, -15 + self.jitter(6)),
            0.08,
        )
        below = (c.z / self.half_length) < self.diaphragm_t(c) - (2.5 + 0.12 * self.age) / self.half_length
        for blob in (right, left):
            found = self.blob_mask(blob, c)
            if found is None:
                continue
            box, mask, _ = found
            mask &= below[box] & self.cavity[box]
            self.paint(mask, BY_NAME["Liver"].label, self.patient.tissue("liver"), box)
        self.liver_blob = right

    def spleen(self) -> None:
        c = self.organ_coords()
        half = (22 + 2.2 * (self.age - 1)) * self.rng.normal(1, 0.1)
        centre = self.position(0.62, 0.30, 0.14)
        share = self.effects.spleen_descent
        if share and self.patient.variant == "nephrectomy_L":
            # After a left nephrectomy the spleen may sink into the empty renal fossa (with the
            # splenic flexure, _nephrectomy_bed): its lower pole reaches the missing kidney's level.
            centre[2] -= share * self.half_length
            centre[0] -= 0.4 * share * self.width  # and medially, toward the fossa
            self.notes["spleen_descent_mm"] = round(share * self.half_length, 1)
        blob = Blob.make(
            self.rng,
            centre,
            (0.45 * half, 0.75 * half, half),
            (self.jitter(8), 15 + self.jitter(6), -35 + self.jitter(8)),
            0.07,
        )
        found = self.blob_mask(blob, c)
        if found is None:
            return
        box, mask, _ = found
        hilum = Blob.make(
            self.rng,
            np.add(blob.center, (-0.55 * half, -0.25 * half, 0)),
            (0.35 * half, 0.4 * half, 0.6 * half),
            (0, 0, 0),
            0.0,
        )
        hb = hilum.level(c, box)
        below = (c.z[box] / self.half_length) < self.diaphragm_t(c)[box] - 2.0 / self.half_length
        mask &= (hb > 1.0) & self.cavity[box] & below
        self.paint(mask, BY_NAME["Spleen"].label, self.patient.tissue("spleen"), box)

    def kidneys(self) -> None:
        c = self.organ_coords()
        length = (25 + 2.3 * (self.age - 1)) * self.rng.normal(1, 0.06)
        for name, side, t in (("Kidney_L", 1, -0.06), ("Kidney_R", -1, -0.17)):
            if self.patient.variant == f"nephrectomy_{name[-1]}":
                self._nephrectomy_bed(side, t)
                continue
            centre = self.position(0.40 * side, 0.40, t, 0.03)
            centre[0] = side * max(abs(centre[0]), self.spine_r + 0.45 * length + 6)
            blob = Blob.make(
                self.rng,
                centre,
                (0.46 * length, 0.40 * length, length),
                (-12 + self.jitter(4), side * (12 + self.jitter(4)), side * (-25 + self.jitter(6))),
                0.04,
            )
            found = self.blob_mask(blob, c)
            if found is None:
                continue
            box, mask, level = found
            hilum = Blob.make(
                self.rng,
                np.add(blob.center, (-side * 0.42 * length, -0.12 * length, 0)),
                (0.22 * length, 0.16 * length, 0.28 * length),
                (0, 0, 0),
                0.0,
            )
            mask &= (hilum.level(c, box) > 1.0) & self.cavity[box]
            img = np.where(
                level > 0.72, self.patient.tissue("cortex"), self.patient.tissue("medulla")
            ).astype(np.float32)
            pelvis = hilum.level(c, box) < 1.6
            img[pelvis & (level < 0.7)] = self.patient.tissue("pelvis")
            self.paint(mask, BY_NAME[name].label, img, box)
            self.notes[f"{name}_center_mm"] = [round(float(v), 1) for v in blob.center]

    def _nephrectomy_bed(self, side: int, t: float) -> None:
        """Empty renal fossa: fat, bowel falls in; surgical clips near the hilum."""
        self.notes["nephrectomy_side"] = "L" if side > 0 else "R"
        self.colon_shift = (side, 0.18)
        for _ in range(int(self.rng.integers(2, 5))):
            p = self.position(0.2 * side, 0.25, t, 0.04)
            clip = Blob.make(self.rng, p, (1.2, 1.2, 2.0), (0, 0, 0), 0.0)
            found = self.blob_mask(clip, self.coords)
            if found is not None:
                box, mask, _ = found
                self.hu[box][mask] = 2800

    def pancreas(self) -> None:
        c = self.organ_coords()
        r_head = (7 + 0.5 * (self.age - 1)) * self.rng.normal(1, 0.08)
        ctrl = [
            self.position(-0.13, -0.08, -0.19, 0.02),
            self.position(-0.02, -0.16, -0.09, 0.02),
            self.position(0.2, -0.06, -0.02, 0.02),
            self.position(0.47, 0.12, 0.05, 0.03),
        ]
        tube = Tube.through(ctrl, [r_head, 0.75 * r_head, 0.65 * r_head, 0.55 * r_head])
        level = tube.level(c)
        mask = (level < 1.0) & self.cavity
        lob = self.patient.tissue("pancreas") + 12 * smooth_noise(self.grid.shape, self.rng, 0.8)
        self.paint(mask, BY_NAME["Pancreas"].label, lob)

    def gallbladder(self) -> None:
        c = self.organ_coords()
        half = (12 + 1.6 * (self.age - 1)) * self.rng.uniform(0.7, 1.15)
        blob = Blob.make(
            self.rng,
            self.position(-0.24, -0.58, -0.10, 0.03),
            (0.4 * half, 0.4 * half, half),
            (35 + self.jitter(8), -15 + self.jitter(8), 0),
            0.06,
        )
        found = self.blob_mask(blob, c)
        if found is None:
            return
        box, mask, level = found
        mask &= self.cavity[box]
        img = np.where(level > 0.86, self.patient.tissue("wall"), self.patient.tissue("bile")).astype(
            np.float32
        )
        self.paint(mask, BY_NAME["Gallbladder"].label, img, box)

    # ---- hollow organs -----------------------------------------------------------
    def _content(self, shape: tuple[int, ...], air_share: float) -> F32:
        fluid = 250.0 if self.patient.oral_contrast else self.patient.tissue("water")
        n = smooth_noise(shape, self.rng, 1.5)
        pockets = n > np.quantile(n, 1 - air_share) if air_share > 0 else np.zeros(shape, bool)
        mix = np.where(pockets, -950.0, fluid)
        return (mix + 8 * self.rng.standard_normal(shape)).astype(np.float32)

    def _hollow(self, level: F32, label: int, air_share: float, wall_mm: float, radius: float) -> None:
        mask = (level < 1.0) & self.cavity & (self.labels == 1)  # bowel fills free space only
        if not mask.any():
            return
        img = np.full(self.grid.shape, self.patient.tissue("wall"), np.float32)
        lumen = level < 1.0 - wall_mm / radius
        content = self._content(self.grid.shape, air_share)
        # gas rises: anterior (−y) in supine, posterior in prone
        up = -self.coords.y if not self.patient.prone else self.coords.y
        img[lumen] = content[lumen]
        if self.effects.bowel:
            self._realistic_contents(img, lumen, label)
        if air_share > 0:
            idx = np.nonzero(lumen)
            if idx[0].size:
                cutoff = np.quantile(up[idx], 1 - 0.5 * air_share)
                gas = lumen & (up > cutoff)
                img[gas] = -950
        self.paint(mask, label, img)

    def _realistic_contents(self, img: F32, lumen: npt.NDArray[np.bool_], label: int) -> None:
        """Replace the lumen's uniform content by faeces, fluid or food (own generator)."""
        kind = {BY_NAME["Colon"].label: "colon", BY_NAME["Stomach"].label: "stomach"}.get(label, "small")
        fluid = 250.0 if self.patient.oral_contrast else self.patient.tissue("water")
        rng = np.random.default_rng([self.patient.seed, 17, label])
        img[lumen] = bowel_contents(kind, self.grid.shape, fluid, rng)[lumen]

    def stomach(self) -> None:
        c = self.organ_coords()
        k = self.rng.uniform(0.75, 1.25)
        fundus = Blob.make(
            self.rng,
            self.position(0.40, 0.02, 0.26),
            (0.22 * k * self.width, 0.30 * k * self.depth, 0.17 * k * self.half_length),
            (0, 0, 0),
            0.05,
        )
        body = Blob.make(
            self.rng,
            self.position(0.30, -0.38, 0.08),
            (0.20 * k * self.width, 0.22 * k * self.depth, 0.20 * k * self.half_length),
            (0, 0, 30),
            0.05,
        )
        level = np.full(self.grid.shape, np.inf, np.float32)
        for blob in (fundus, body):
            box = blob.bbox(c)
            if box is not None:
                level[box] = np.minimum(level[box], blob.level(c, box))
        antrum = Tube.through(
            [
                np.asarray(body.center),
                self.position(0.12, -0.48, -0.01, 0.02),
                self.position(0.02, -0.42, -0.03, 0.01),
            ],
            0.11 * self.depth * k,
        )
        level = np.minimum(level, antrum.level(c))
        below = (c.z / self.half_length) < self.diaphragm_t(c) - 2.0 / self.half_length
        level[~below] = np.inf
        self.pylorus = antrum.points[-1]
        self._hollow(level, BY_NAME["Stomach"].label, 0.25, 2.5 + 0.1 * self.age, 0.15 * self.depth)

    def duodenum(self) -> None:
        c = self.organ_coords()
        r = (5 + 0.45 * (self.age - 1)) * self.rng.normal(1, 0.08)
        ctrl = [
            self.pylorus,
            self.position(-0.16, -0.26, -0.01, 0.01),
            self.position(-0.26, -0.08, -0.12, 0.02),
            self.position(-0.23, 0.0, -0.29, 0.02),
            self.position(0.0, 0.04, -0.36, 0.02),
            self.position(0.16, 0.0, -0.28, 0.02),
            self.position(0.2, -0.06, -0.2, 0.02),
        ]
        tube = Tube.through(ctrl, r)
        self.duodenojejunal_flexure = tube.points[-1]
        self._hollow(tube.level(c), BY_NAME["Duodenum"].label, 0.15, 1.5 + 0.07 * self.age, r)

    def colon(self) -> None:
        c = self.organ_coords()
        r = (8 + 0.8 * (self.age - 1)) * self.rng.normal(1, 0.08)
        side, shift = getattr(self, "colon_shift", (0, 0.0))
        dv_l, dv_r = (shift if side > 0 else 0.0), (shift if side < 0 else 0.0)
        ctrl = [
            self.position(-0.55, -0.12, -1.08),
            self.position(-0.62, 0.02 + dv_r, -0.62),
            self.position(-0.60, 0.02 + dv_r, -0.26),
            self.position(-0.48, -0.38, -0.12),
            self.position(-0.2, -0.70, -0.36),
            self.position(0.2, -0.70, -0.3),
            self.position(0.58, -0.12, 0.0),
            self.position(0.64, 0.14 + dv_l, -0.3),
            self.position(0.62, 0.1 + dv_l, -1.08),
        ]
        tube = Tube.through(ctrl, r, modulation=(0.12, 2.2 * r))
        self._hollow(tube.level(c), BY_NAME["Colon"].label, 0.45, 1.5 + 0.05 * self.age, r)

    def small_bowel(self) -> None:
        c = self.organ_coords()
        r = (5.5 + 0.45 * (self.age - 1)) * self.rng.normal(1, 0.08)
        centre = self.position(0.0, -0.32, -0.62, 0.03)
        extent = np.array([0.42 * self.width, 0.40 * self.depth, 0.42 * self.half_length])
        path = [np.asarray(self.duodenojejunal_flexure, float)]
        heading = np.array([0.0, -0.3, -1.0])
        step = 0.7 * r
        fill_volume = 0.55 * 4.19 * float(np.prod(extent))
        n_steps = int(fill_volume / (np.pi * r * r) / step)
        for _ in range(n_steps):
            heading = heading / np.linalg.norm(heading) + self.rng.normal(0, 0.45, 3)
            rel = (path[-1] - centre) / extent
            if np.linalg.norm(rel) > 0.85:
                heading -= 1.2 * rel / np.linalg.norm(rel)
            heading /= np.linalg.norm(heading)
            path.append(path[-1] + step * heading)
        tube = Tube.polyline(np.array(path), r, step=r / 3)
        self._hollow(tube.level(c), BY_NAME["Bowel_Small"].label, 0.08, 1.2 + 0.05 * self.age, r)

    def esophagus(self) -> None:
        c = self.coords
        r = (4 + 0.27 * (self.age - 1)) * self.rng.normal(1, 0.08)
        y_e = self.aorta_y - self.aorta_r - r - 3.0  # anterior to the descending aorta
        ctrl: list[Any] = [
            (-0.02 * self.width, y_e + 2, 1.15 * self.half_length),
            (0.0, y_e, 0.65 * self.half_length),
            (0.1 * self.width, y_e - 0.08 * self.depth, 0.36 * self.half_length),
            self.position(0.3, 0.02, 0.22, 0.01),
        ]
        tube = Tube.through(ctrl, r)
        level = tube.level(c)
        mask = level < 1.0
        mask &= self.labels != BY_NAME["Stomach"].label
        img = np.where(level < 0.25, -900.0, self.patient.tissue("wall")).astype(np.float32)
        self.paint(mask, BY_NAME["Esophagus"].label, img)

    # ---- vessels, masses -----------------------------------------------------------
    def vessels(self) -> None:
        c = self.organ_coords()
        rc = self.coords
        ra = self.aorta_r
        y_front = self.spine_y - self.spine_r * 0.85
        aorta = Tube.through(
            [
                (0.09 * self.width, self.aorta_y + 2, 1.15 * self.half_length),
                (0.07 * self.width, self.aorta_y, 0.3 * self.half_length),
                (0.04 * self.width, self.aorta_y, -0.3 * self.half_length),
                (0.03 * self.width, self.aorta_y, -0.86 * self.half_length),
            ],
            ra,
        )
        rv = (6 + 0.5 * (self.age - 1)) * self.rng.normal(1, 0.06)
        ivc_ctrl = [
            (-0.16 * self.width, y_front - rv, -1.1 * self.half_length),
            (-0.16 * self.width, y_front - rv - 2, -0.2 * self.half_length),
            (-0.2 * self.width, y_front - rv - 0.12 * self.depth, 0.15 * self.half_length),
        ]
        t_d = 0.08 + 0.34 * (1 - ((-0.1 + 0.42) / 0.62) ** 2 - ((0.0 + 0.05) / 1.05) ** 2)
        ivc_ctrl.append((-0.1 * self.width, 0.0, (t_d + 0.06) * self.half_length))
        ivc = Tube.through(ivc_ctrl, [rv, rv, 1.1 * rv, 1.2 * rv])
        # portal, splenic and renal veins: enhancing but not labelled
        for ctrl, radius in (
            ([self.position(-0.02, -0.06, -0.1, 0.01), self.position(-0.22, -0.12, 0.12, 0.02)], 0.6 * rv),
            ([self.position(-0.02, -0.06, -0.1, 0.01), self.position(0.45, 0.16, 0.08, 0.02)], 0.4 * rv),
            ([self.position(-0.02, -0.1, -0.1, 0.01), self.position(0.0, -0.15, -0.75, 0.02)], 0.45 * rv),
        ):
            level = Tube.through(ctrl, radius).level(c)
            self.hu[(level < 1.0) & self.cavity] = self.patient.tissue("vein")
        mass = getattr(self, "mass_mask", None)
        a_level = aorta.level(rc)
        a_mask = (a_level < 1.0) & self.cavity & (rc.z / self.half_length < 1.2)
        above = (rc.z / self.half_length) > self.diaphragm_t(rc)
        self.paint(a_mask, BY_NAME["A_Aorta"].label, self.patient.tissue("artery"))
        v_level = ivc.level(rc)
        v_mask = (v_level < 1.0) & self.cavity & ~(above & (self.labels == BY_NAME["Heart"].label))
        v_mask &= ~a_mask
        self.paint(v_mask, BY_NAME["V_Venacava_I"].label, self.patient.tissue("vein"))
        if mass is not None:
            self.notes["encased_vessels"] = bool((mass & (a_mask | v_mask)).any())

    def mass(self) -> None:
        if self.patient.variant not in ("renal_tumour", "neuroblastoma"):
            return
        side = 1 if self.rng.random() < 0.5 else -1
        if self.patient.variant == "renal_tumour":
            centre = self.position(0.42 * side, 0.1, -0.12, 0.05)
            radius = self.width * self.rng.uniform(0.18, 0.32)
            parts = [(centre, radius)]
        else:
            centre = self.position(0.2 * side, 0.15, 0.02, 0.04)
            radius = self.width * self.rng.uniform(0.14, 0.26)
            parts = [
                (centre + self.rng.normal(0, 0.35 * radius, 3), radius * self.rng.uniform(0.6, 0.9))
                for _ in range(int(self.rng.integers(2, 4)))
            ]
        self.notes["mass"] = {
            "type": self.patient.variant,
            "side": "L" if side > 0 else "R",
            "radius_mm": round(float(radius), 1),
        }
        centre_all = np.mean([p for p, _ in parts], axis=0)
        r_eff = float(np.cbrt(sum(r**3 for _, r in parts)))

        def push(coords: Coords) -> Coords:
            dx, dy, dz = coords.x - centre_all[0], coords.y - centre_all[1], coords.z - centre_all[2]
            d = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
            d0 = np.cbrt(np.maximum(d**3 - r_eff**3, 0.0))
            f = (d0 / d).astype(np.float32)
            return Coords(
                coords.grid,
                (centre_all[0] + dx * f).astype(np.float32),
                (centre_all[1] + dy * f).astype(np.float32),
                (centre_all[2] + dz * f).astype(np.float32),
                coords.max_shift + r_eff,
            )

        self.push = push
        self._mass_parts = parts

    def paint_mass(self) -> None:
        parts = getattr(self, "_mass_parts", None)
        if not parts:
            return
        level = np.full(self.grid.shape, np.inf, np.float32)
        for centre, radius in parts:
            blob = Blob.make(
                self.rng, centre, (radius, 0.9 * radius, 1.1 * radius), (0, 0, self.jitter(20)), 0.1
            )
            box = blob.bbox(self.coords)
            if box is not None:
                level[box] = np.minimum(level[box], blob.level(self.coords, box))
        mask = (level < 1.0) & self.cavity
        tex = self.patient.tissue("tumour") + 18 * smooth_noise(self.grid.shape, self.rng, 2.0)
        tex[level < 0.35] = 12.0  # necrosis
        if self.patient.variant == "neuroblastoma":
            calc = smooth_noise(self.grid.shape, self.rng, 0.8) > 2.3
            tex[calc] = 450.0
        self.paint(mask, 1, tex)
        self.mass_mask = mask

    # ---- skeleton -------------------------------------------------------------------
    def spine(self) -> None:
        """Vertebral bodies, discs, canal, cord, posterior elements (geometry; painted last)."""
        c = self.coords
        self.spine_r = 8 + 0.6 * (self.age - 1)
        self.spine_y = 0.56 * self.depth
        self.aorta_r = (4.5 + 0.33 * (self.age - 1)) * float(self.rng.normal(1, 0.06))
        self.aorta_y = self.spine_y - 0.85 * self.spine_r - self.aorta_r - 1.0
        rx, ry = self.spine_r, 0.82 * self.spine_r
        period = 12 + 1.4 * (self.age - 1)
        phase = self.rng.uniform(0, period)
        t = c.z / self.half_length
        yc = self.spine_y + 0.04 * self.depth * t * t
        body = ((c.x / rx) ** 2 + ((c.y - yc) / ry) ** 2) < 1.0
        bone_part = ((c.z + phase) % period) < 0.76 * period
        vb = body & bone_part
        rim = body & (((c.x / (rx - 1.6)) ** 2 + ((c.y - yc) / (ry - 1.6)) ** 2) > 1.0)
        img = np.where(rim, self.patient.tissue("cortical"), self.patient.tissue("cancellous")).astype(
            np.float32
        )
        # spinal canal, cord and posterior arch
        canal_r = 5 + 0.2 * (self.age - 1)
        yk = yc + ry + canal_r + 0.5
        rr = np.sqrt(c.x**2 + (c.y - yk) ** 2)
        arch = (rr > canal_r) & (rr < canal_r + 2.5 + 0.15 * self.age) & (c.y > yk - 0.3 * canal_r)
        spinous = (np.abs(c.x) < 1.5 + 0.1 * self.age) & (c.y > yk) & (c.y < yk + canal_r + 1.1 * rx)
        transverse = (np.abs(c.y - (yk - 0.2 * canal_r)) < 2 + 0.12 * self.age) & (
            np.abs(c.x) < canal_r + 1.4 * rx
        )
        post = (arch | spinous | transverse) & ((c.z + phase + 0.15 * period) % period < 0.55 * period)
        muscle = ((c.x / (1.9 * rx + canal_r)) ** 2 + ((c.y - yk - 0.6 * rx) / (1.3 * rx)) ** 2 < 1) & ~post
        canal = rr < canal_r
        conus = (-0.25 - 0.1 * (16 - self.age) / 15) * self.half_length
        cord = (np.sqrt(c.x**2 + (c.y - yk) ** 2) < 0.55 * canal_r) & (c.z > conus)
        self._spine_parts = (body, bone_part, vb, img, post, muscle & ~canal, canal, cord)

    def paint_spine(self) -> None:
        body, bone_part, vb, img, post, muscle, canal, cord = self._spine_parts
        inside = self.body_mask
        self.hu[muscle & inside & (self.labels <= 1)] = self.patient.tissue("muscle")
        self.paint(post & inside, 1, self.patient.tissue("cortical") * 0.8)
        self.paint(body & ~bone_part & inside, 1, 80.0)  # discs
        self.paint(vb & inside, BY_NAME["VBs"].label, img)
        self.paint(canal & inside, 1, self.patient.tissue("csf"))
        self.paint(cord & inside, BY_NAME["SpinalCord"].label, self.patient.tissue("cord"))

    def ribs(self) -> None:
        c = self.coords
        u, v = c.x / self.width, c.y / self.depth
        ring = (self.r_body > self.wall_r - 0.01) & (self.r_body < self.wall_r + 0.06) & self.body_mask
        margin_t = -0.05 - 0.3 * np.clip(v, -1, 1) + 0.2 * np.abs(u)
        slope = 0.45 * self.half_length * (0.6 - v)  # ribs descend anteriorly
        period = 14 + 1.2 * (self.age - 1)
        bands = ((c.z + slope) % period) < (3 + 0.25 * self.age)
        rib = ring & bands & ((c.z / self.half_length) > margin_t) & ~(np.abs(u) < 0.15) & (self.labels <= 1)
        self.hu[rib] = self.patient.tissue("cortical") * 0.75

    def build(self) -> Body:
        self.body()
        self.spine()
        self.thorax()
        self.mass()
        self.liver()
        self.spleen()
        self.gallbladder()
        self.pancreas()
        self.kidneys()
        self.stomach()
        self.duodenum()
        self.colon()
        self.small_bowel()
        self.paint_mass()
        self.esophagus()
        self.vessels()
        self.paint_spine()
        self.ribs()
        self.labels[~self.body_mask] = 0
        if self.effects.metal:
            self._metal()
        return Body(self.labels, self.hu, self.notes, self.metal)


def build_body(
    patient: Patient,
    grid: Grid,
    z_offset: float = 0.0,
    couch: bool = False,
    effects: Effects | None = None,
) -> Body:
    """Label map (structure label ids) and noise-free HU of one patient on ``grid``.

    ``couch`` puts the patient on a treatment couch (curved top, mattress, vacuum
    bag) instead of the plain table slab; the couch is never labelled.
    ``effects`` adds the anatomical realism options (arms down, metal, bowel
    contents; see :mod:`rtseg.phantom.realism`); None builds the plain phantom.
    """
    return _Builder(patient, grid, z_offset, couch, effects).build()
