"""Realism options of the phantom: what real CT has and the plain phantom lacks.

Every option is off by default, so a cohort made without :class:`Realism` is
exactly the cohort the default model was trained on. The geometry options
(arms down, truncated field of view, shorter scan) change what is imaged and
so the labels with it; the image options (metal and its streaks, breathing,
noise texture, partial volume, bowel contents, contrast phase) change HU only.

The HU effects live here as plain functions on arrays; where they are placed
in the anatomy is decided in :mod:`rtseg.phantom.anatomy` and the order of
acquisition in :mod:`rtseg.phantom.cohort`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from rtseg.errors import InputError

F32 = npt.NDArray[np.float32]

# Linear attenuation of water near the effective energy of a 120 kV beam (1/mm): HU ↔ µ.
MU_WATER = 0.019
# Reconstruction kernels as ramp × Hann apodisation cut off at this frequency (cycles/mm); the
# noise power then peaks near 0.3 × cutoff: 0.12, 0.18, 0.42 /mm (a body kernel such as Siemens
# Br38f peaks near 0.15–0.2 /mm, see docs/phantom.md).
KERNEL_CUTOFF = {"soft": 0.4, "standard": 0.6, "sharp": 1.4}
PHASES = ("nc", "art", "pv")

_SHARES = ("arms_down", "truncation", "metal", "motion", "short_scan")
_ALWAYS = ("noise_texture", "partial_volume", "bowel", "spleen_descent")
# Scan ranges beyond the upper abdomen (not a share: the clinical preset, and the default model's
# training cases with it, stay as they were): thorax apex to below the femoral heads, or cut
# from that long scan, the pelvis or the thorax alone.
COVERAGES = ("long", "pelvis", "thorax")


@dataclass(frozen=True)
class Effects:
    """The realism effects one case actually gets (drawn from :class:`Realism`)."""

    arms_down: bool = False
    truncation: bool = False
    metal: bool = False
    motion: bool = False
    short_scan: bool = False
    noise_texture: bool = False
    partial_volume: bool = False
    bowel: bool = False
    spleen_descent: float = 0.0  # share of the body's half length the spleen sinks (left nephrectomy)
    phase: str | None = None
    coverage: str | None = None

    @property
    def active(self) -> list[str]:
        """Names of the effects switched on (for case.json)."""
        named = ("phase", "coverage")
        names = [f.name for f in fields(self) if f.name not in named and getattr(self, f.name)]
        names += [f"phase={self.phase}"] if self.phase else []
        return names + ([f"coverage={self.coverage}"] if self.coverage else [])


@dataclass(frozen=True)
class Realism:
    """Which realism options a cohort gets.

    Parameters
    ----------
    arms_down, truncation, metal, motion, short_scan
        Share of cases (0–1) with arms beside the trunk, a field of view
        narrower than the body, surgical clips and a spinal implant with
        streak artefacts, breathing motion at the diaphragm, a scan shorter
        than the upper abdomen.
    noise_texture
        Correlated noise with the kernel's noise power spectrum instead of
        blurred white noise.
    partial_volume
        HU averaged over the slice thickness (three sub-slices) rather than
        sampled at the slice centre.
    bowel
        Mottled faeces and gas in the colon, fluid and a little gas in the
        small bowel, food in the stomach.
    spleen_descent
        After a left nephrectomy the spleen has sunk into the empty renal fossa
        (anatomy only; cases of other variants are unchanged).
    phase
        Contrast phase forced on every case (``nc``, ``art``, ``pv``); None
        keeps each center's mix.
    coverage
        Scan range forced on every case beyond the upper abdomen: ``long``
        (thorax apex to below the femoral heads), ``pelvis`` or ``thorax``
        (that long scan cut to the pelvis below the iliac crest, or to the
        thorax above the diaphragm); None: the upper abdomen.
    """

    arms_down: float = 0.0
    truncation: float = 0.0
    metal: float = 0.0
    motion: float = 0.0
    short_scan: float = 0.0
    noise_texture: bool = False
    partial_volume: bool = False
    bowel: bool = False
    phase: str | None = None
    coverage: str | None = None
    spleen_descent: bool = False

    @classmethod
    def clinical(cls, partial_volume: bool = True) -> Realism:
        """A realistic mix: every image effect on, the geometric ones in a share of cases.

        ``partial_volume=False`` (tag ``clinical-nopv``) leaves out the one effect that builds the
        anatomy three times: a case takes about 20 s instead of 55 s at 256 × 256.
        """
        return cls(0.4, 0.15, 0.15, 0.3, 0.15, True, partial_volume, True, None)

    @classmethod
    def parse(cls, text: str) -> Realism:
        """``none``, ``clinical`` or a comma list of option names (each on in every case), ``phase=art``,
        ``coverage=long``."""
        if text in ("none", ""):
            return cls()
        if text == "clinical":
            return cls.clinical()
        values: dict[str, object] = {}
        for item in (part.strip() for part in text.split(",")):
            name, _, value = item.partition("=")
            if name == "phase" and value in PHASES:
                values["phase"] = value
            elif name == "coverage" and value in COVERAGES:
                values["coverage"] = value
            elif name in _SHARES or name in _ALWAYS:
                values[name] = 1.0 if name in _SHARES else True
            else:
                known = ", ".join((*_SHARES, *_ALWAYS, "phase=nc|art|pv", "coverage=long|pelvis|thorax"))
                raise InputError(
                    f"unknown realism option {item!r}: use none, clinical or a comma list of {known}"
                )
        return cls(**values)  # type: ignore[arg-type]

    @property
    def off(self) -> bool:
        """True when no option is on: the cohort is the legacy one, byte for byte."""
        return self == Realism()

    @property
    def tag(self) -> str:
        """Short name for case ids: ``""`` when off, ``clinical`` for the preset, else the options."""
        if self.off:
            return ""
        if self == Realism.clinical():
            return "clinical"
        if self == Realism.clinical(partial_volume=False):
            return "clinical-nopv"
        without = replace(self, spleen_descent=False)
        if self.spleen_descent and not without.off:
            return f"{without.tag}-fossa"
        on = [n for n in (*_SHARES, *_ALWAYS) if getattr(self, n)]
        on += [self.phase] if self.phase else []
        return "-".join(on + ([f"{self.coverage}scan"] if self.coverage else []))

    def draw(self, rng: np.random.Generator) -> Effects:
        """The effects of one case: each share drawn once, always in the same order.

        The spleen's descent is drawn last and only when asked, so every other option's cases
        (and their details, drawn from ``rng`` after this) stay what they were.
        """
        drawn = {name: bool(rng.random() < getattr(self, name)) for name in _SHARES}
        always = {n: getattr(self, n) for n in _ALWAYS if n != "spleen_descent"}
        descent = float(rng.uniform(0.15, 0.3)) if self.spleen_descent else 0.0
        return Effects(**drawn, **always, spleen_descent=descent, phase=self.phase, coverage=self.coverage)


# ---- noise texture ---------------------------------------------------------------------------
def kernel_nps(freq: npt.NDArray[np.float64], kernel: str) -> npt.NDArray[np.float64]:
    """Noise power shape of filtered back-projection: ramp × Hann apodisation squared.

    ``freq`` in cycles/mm; zero at the origin (the ramp) and above the cutoff.
    """
    if kernel not in KERNEL_CUTOFF:
        raise InputError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNEL_CUTOFF)}")
    fc = KERNEL_CUTOFF[kernel]
    apod = np.where(freq < fc, 0.5 * (1.0 + np.cos(np.pi * np.minimum(freq, fc) / fc)), 0.0)
    return np.asarray(freq * apod**2)


def correlated_noise(
    shape: tuple[int, int, int], pixel_mm: float, kernel: str, sd: float, rng: np.random.Generator
) -> F32:
    """Noise with the kernel's in-plane texture, scaled to standard deviation ``sd`` (HU).

    White noise is filtered slice by slice with the square root of
    :func:`kernel_nps`; slices stay independent (contiguous reconstruction).
    """
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[1], d=pixel_mm)[:, None]
    fx = np.fft.rfftfreq(shape[2], d=pixel_mm)[None, :]
    gain = np.sqrt(kernel_nps(np.hypot(fy, fx), kernel))
    noise = np.fft.irfft2(np.fft.rfft2(white, axes=(1, 2)) * gain, s=shape[1:], axes=(1, 2))
    return (noise * (sd / max(float(noise.std()), 1e-9))).astype(np.float32)


def radial_nps(
    patches: npt.NDArray[np.floating], pixel_mm: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Radially averaged noise power spectrum of square patches ``[n, m, m]`` (HU² mm²).

    Each patch is detrended (its least-squares quadratic surface removed)
    before the FFT, so slow anatomy does not show up as low-frequency noise.

    Returns
    -------
    (frequencies in cycles/mm, NPS at those frequencies)
    """
    n, m = patches.shape[0], patches.shape[1]
    yy, xx = np.mgrid[:m, :m].astype(np.float64)
    y, x = yy.ravel() / m, xx.ravel() / m
    design = np.stack([np.ones(m * m), y, x, y * y, x * x, x * y], axis=1)
    power = np.zeros((m, m))
    for patch in patches.astype(np.float64):
        coef, *_ = np.linalg.lstsq(design, patch.ravel(), rcond=None)
        residual = patch - (design @ coef).reshape(m, m)
        power += np.abs(np.fft.fft2(residual)) ** 2
    nps = power / n * pixel_mm**2 / (m * m)
    f = np.fft.fftfreq(m, d=pixel_mm)
    radius = np.hypot(f[:, None], f[None, :])
    step = 1.0 / (m * pixel_mm)
    bins = np.rint(radius / step).astype(int)
    keep = bins <= m // 2
    sums = np.bincount(bins[keep], weights=nps[keep])
    counts = np.bincount(bins[keep])
    return np.arange(len(sums)) * step, sums / np.maximum(counts, 1)


# ---- metal ------------------------------------------------------------------------------------
def metal_streaks(hu: F32, metal_hu: F32, pixel_mm: float, rng: np.random.Generator) -> F32:
    """Paint the metal and add the streaks a filtered back-projection makes of it.

    A simple, stated model per slice: the metal alone is forward-projected
    (``skimage.transform.radon``); along each ray its line integral ``p`` gives
    a beam-hardening deficit ``-0.08 p²`` and photon-starvation noise whose SD
    grows as ``exp(p / 2)``. That projection error is filtered and
    back-projected (``iradon``, ramp filter) and added in HU: dark bands
    between metal parts, bright and dark streaks radiating from them.
    """
    from skimage.transform import iradon, radon

    out = hu.copy()
    metal = metal_hu > 0
    out[metal] = metal_hu[metal]
    n = hu.shape[1]
    theta = np.linspace(0.0, 180.0, max(90, n // 2), endpoint=False)
    yy, xx = np.mgrid[:n, :n]
    inside = (yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 < (n / 2 - 1) ** 2
    for k in np.flatnonzero(metal.any(axis=(1, 2))):
        mu = np.where(metal[k] & inside, MU_WATER * (1.0 + metal_hu[k] / 1000.0), 0.0) * pixel_mm
        p = radon(mu, theta=theta, circle=True)
        starving = np.exp(0.5 * np.minimum(p, 14.0)) - 1.0
        error = -0.08 * p**2 + 0.005 * starving * rng.standard_normal(p.shape)
        image_error = iradon(error, theta=theta, filter_name="ramp", circle=True) / pixel_mm
        out[k] += (1000.0 / MU_WATER * image_error * inside).astype(np.float32)
    return out


# ---- breathing ----------------------------------------------------------------------------------
def breathing(hu: F32, z_mm: npt.NDArray[np.floating], dome_mm: float, rng: np.random.Generator) -> F32:
    """Free breathing during a helical scan: slice-dependent cranio-caudal shift and blur.

    Around the diaphragm dome (``dome_mm``, Gaussian window of 30 mm) each
    slice shows the anatomy displaced by ``A sin(2π z / P + φ)`` (A 2–6 mm,
    P 15–40 mm of table travel per breath) and blurred where the motion is
    fastest. Far from the dome nothing changes.
    """
    amplitude = float(rng.uniform(2.0, 6.0))
    period = float(rng.uniform(15.0, 40.0))
    phi = float(rng.uniform(0.0, 2.0 * np.pi))
    dz = float(z_mm[1] - z_mm[0]) if len(z_mm) > 1 else 1.0
    window = np.exp(-0.5 * ((z_mm - dome_mm) / 30.0) ** 2)
    arg = 2.0 * np.pi * z_mm / period + phi
    shift = amplitude * window * np.sin(arg) / dz  # in slices
    speed = window * np.abs(np.cos(arg))
    pos = np.clip(np.arange(len(z_mm)) + shift, 0, len(z_mm) - 1)
    k0 = np.floor(pos).astype(int)
    k1 = np.minimum(k0 + 1, len(z_mm) - 1)
    frac = (pos - k0).astype(np.float32)[:, None, None]
    moved = hu[k0] * (1 - frac) + hu[k1] * frac
    blurred = gaussian_filter1d(moved, sigma=max(amplitude / abs(dz), 0.5), axis=0)
    w = speed.astype(np.float32)[:, None, None]
    out: F32 = moved * (1 - w) + blurred * w
    far = window < 1e-3  # exactly unchanged away from the diaphragm
    out[far] = hu[far]
    return out.astype(np.float32)


# ---- bowel contents -----------------------------------------------------------------------------
def bowel_contents(kind: str, shape: tuple[int, int, int], fluid_hu: float, rng: np.random.Generator) -> F32:
    """HU of a lumen's contents: ``colon`` faeces with gas, ``small`` fluid, ``stomach`` food.

    Faeces are a mottled mixture of fat-like and soft-tissue material with
    bubbles of gas (the typical speckled look of stool on CT); small bowel is
    fluid (or oral contrast) with rare bubbles; the stomach holds food.
    """
    coarse = gaussian_filter(rng.standard_normal(shape), (0.6, 1.2, 1.2))
    coarse /= max(float(coarse.std()), 1e-9)
    bubbles = gaussian_filter(rng.standard_normal(shape), (0.5, 0.8, 0.8))
    bubbles /= max(float(bubbles.std()), 1e-9)
    if kind == "colon":
        img = np.clip(-110.0 + 90.0 * coarse, -400.0, 80.0)
        return np.where(bubbles > 1.3, -900.0, img).astype(np.float32)
    if kind == "stomach":
        img = 25.0 + 35.0 * coarse
        return np.where(bubbles > 2.2, -900.0, img).astype(np.float32)
    img = fluid_hu + 8.0 * coarse
    return np.where(bubbles > 2.6, -900.0, img).astype(np.float32)
