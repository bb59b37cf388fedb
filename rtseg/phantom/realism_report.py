"""How far the phantom is from real CT: HU histograms, noise power spectra, distances, figures.

Run ``python -m rtseg.phantom.realism_report --realct ../shared/realct --out docs/phantom``.
It builds phantom cases of center A without and with :meth:`Realism.clinical`,
reads the real series with :func:`rtseg.ct.load_series` (``siemens_petct_j2k``,
an upper abdomen, is the reference; ``head_ct_cerr`` serves for noise only)
and writes ``montage.png``, ``histograms.png``, ``nps.png``, ``effects.png``,
``metrics.json`` and ``metrics.md`` under ``--out``.

Measures, stated:

* tissue shares and histograms of HU inside the body, tissue by HU window
  (gas < −400, fat −200…−30, soft tissue −30…150, bone ≥ 150), the same
  windows for phantom and real, so like is compared with like;
* the 1-Wasserstein distance (HU) between the histograms of each tissue
  window and between the fat-to-soft-tissue histograms (−250…250) of
  phantom and real;
* the noise power spectrum of the most uniform soft-tissue patch (about
  30 mm square, 7 slices; each patch detrended, 2-D FFT, radial average):
  its peak and mean frequency (cycles/mm), the noise SD, and the shape
  distance: half the L1 distance of the area-normalised spectra on a
  common frequency axis (0 identical, 1 disjoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.ndimage import binary_erosion, binary_fill_holes, label, uniform_filter
from scipy.stats import wasserstein_distance

from rtseg.errors import InputError
from rtseg.phantom.cohort import make_case
from rtseg.phantom.realism import Realism, radial_nps

WINDOWS = {"gas": (-1100.0, -400.0), "fat": (-200.0, -30.0), "soft": (-30.0, 150.0), "bone": (150.0, 4000.0)}
HIST_RANGES = {
    "gas": (-1050.0, -400.0),
    "fat": (-200.0, -30.0),
    "soft": (-30.0, 150.0),
    "bone": (150.0, 1200.0),
}
SOFT_WINDOW = (-160.0, 240.0)  # display: W 400, L 40
PATCH_MM = 30.0
ABDOMEN_REF = "siemens_petct_j2k"
HEAD_REF = "head_ct_cerr"


@dataclass
class Scan:
    """One volume to compare: HU ``[z, y, x]``, body mask, in-plane pixel (mm), display slice."""

    name: str
    hu: npt.NDArray[np.float32]
    body: npt.NDArray[np.bool_]
    pixel: float
    show: int
    uniform: tuple[float, float] = (20.0, 160.0)  # mean HU of the patch searched for the NPS
    effects: tuple[str, ...] = ()  # the realism effects a phantom case got


def body_mask(hu: npt.NDArray[np.floating]) -> npt.NDArray[np.bool_]:
    """The patient in a real CT: per slice, the largest object above −400 HU, holes filled."""
    out = np.zeros(hu.shape, bool)
    for k, img in enumerate(hu):
        lab, n = label(img > -400)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[k] = binary_fill_holes(lab == int(np.argmax(sizes)))
    return out


def tissue_shares(scan: Scan) -> dict[str, float]:
    values = scan.hu[scan.body]
    return {
        name: round(float(((values >= lo) & (values < hi)).mean()), 4) for name, (lo, hi) in WINDOWS.items()
    }


def window(values: npt.NDArray[np.floating], lo: float, hi: float) -> npt.NDArray[np.floating]:
    return values[(values >= lo) & (values < hi)]


def uniform_patches(scan: Scan, n_slices: int = 7) -> npt.NDArray[np.float32]:
    """The most uniform soft-tissue patch (lowest local SD, mean in ``scan.uniform``) over ``n_slices``."""
    m = max(16, int(round(PATCH_MM / scan.pixel / 2)) * 2)
    half = n_slices // 2
    inner = binary_erosion(scan.body, iterations=2, border_value=0)
    best: tuple[float, int, int, int] | None = None
    for k in range(half, scan.hu.shape[0] - half):
        img = scan.hu[k].astype(np.float64)
        mean = uniform_filter(img, m)
        sd = np.sqrt(np.maximum(uniform_filter(img * img, m) - mean * mean, 0.0))
        fits = (uniform_filter(inner[k].astype(float), m) > 0.999) & (mean > scan.uniform[0])
        fits &= mean < scan.uniform[1]
        if not fits.any():
            continue
        yx = np.unravel_index(int(np.argmin(np.where(fits, sd, np.inf))), sd.shape)
        if best is None or sd[yx] < best[0]:
            best = (float(sd[yx]), k, int(yx[0]), int(yx[1]))
    if best is None:
        raise InputError(f"{scan.name}: no uniform soft-tissue patch of {PATCH_MM:.0f} mm inside the body")
    _, k, y0, x0 = best
    y0, x0 = y0 - m // 2, x0 - m // 2
    return scan.hu[k - half : k + half + 1, y0 : y0 + m, x0 : x0 + m].astype(np.float32)


def nps_summary(scan: Scan) -> dict[str, Any]:
    f, nps = radial_nps(uniform_patches(scan), scan.pixel)
    keep = f > 0
    return {
        "f": f.tolist(),
        "nps": nps.tolist(),
        "peak_f": round(float(f[keep][np.argmax(nps[keep])]), 3),
        "mean_f": round(float((f * nps).sum() / nps.sum()), 3),
        "sd_hu": round(float(np.sqrt(np.trapezoid(2 * np.pi * f * nps, f))), 1),
    }


def shape_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Half the L1 distance of two area-normalised NPS on a common frequency axis (0…1)."""
    top = min(max(a["f"]), max(b["f"]))
    grid = np.linspace(0.0, top, 64)
    pa = np.interp(grid, a["f"], a["nps"]) * grid
    pb = np.interp(grid, b["f"], b["nps"]) * grid
    pa, pb = pa / pa.sum(), pb / pb.sum()
    return round(float(0.5 * np.abs(pa - pb).sum()), 3)


def phantom_scan(name: str, matrix: int, index: int, realism: Realism | None) -> Scan:
    """A center-A phantom; shown at the slice with the most liver."""
    from rtseg.structures import BY_NAME

    _, grid, body, _ = make_case("A", 0, index, matrix=matrix, realism=realism)
    liver = (body.labels == BY_NAME["Liver"].label).sum(axis=(1, 2))
    fx: tuple[str, ...] = tuple(str(n) for n in body.notes.get("realism", []))  # type: ignore[attr-defined]
    return Scan(name, body.hu, body.labels > 0, grid.spacing[1], int(np.argmax(liver)), effects=fx)


def real_scan(folder: Path, name: str, uniform: tuple[float, float]) -> Scan:
    from rtseg.ct import load_series

    volume = load_series(folder)
    hu = volume.hu.astype(np.float32)
    return Scan(name, hu, body_mask(hu), volume.spacing[1], hu.shape[0] // 2, uniform)


def compare(scans: list[Scan], reference: Scan | None, head: Scan | None) -> dict[str, Any]:
    """Metrics of every scan, and its distances to the real abdomen."""
    out: dict[str, Any] = {}
    nps_ref = nps_summary(reference) if reference is not None else None
    for scan in [*scans, *(s for s in (reference, head) if s is not None)]:
        values = scan.hu[scan.body]
        entry: dict[str, Any] = {"tissue_shares": tissue_shares(scan), "nps": nps_summary(scan)}
        entry["pixel_mm"] = round(scan.pixel, 3)
        if scan.effects:
            entry["effects"] = list(scan.effects)
        if reference is not None and scan is not reference and scan is not head:
            ref = reference.hu[reference.body]
            entry["w1_soft_hu"] = round(
                float(wasserstein_distance(window(values, -30, 150), window(ref, -30, 150))), 1
            )
            entry["w1_tissue_hu"] = {
                t: round(float(wasserstein_distance(window(values, lo, hi), window(ref, lo, hi))), 1)
                for t, (lo, hi) in WINDOWS.items()
            }
            entry["w1_fat_soft_hu"] = round(
                float(wasserstein_distance(window(values, -250, 250), window(ref, -250, 250))), 1
            )
        if nps_ref is not None:
            entry["nps_shape_distance"] = shape_distance(entry["nps"], nps_ref)
        out[scan.name] = entry
    return out


def table(metrics: dict[str, Any]) -> str:
    """The metrics as a markdown table."""
    rows = [
        "| scan | gas / fat / soft / bone share | W1 gas / fat / soft / bone (HU) | W1 fat–soft (HU) "
        "| NPS peak (1/mm) | NPS mean f (1/mm) | noise SD (HU) | NPS shape distance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in metrics.items():
        shares = " / ".join(f"{100 * v:.0f} %" for v in e["tissue_shares"].values())
        n = e["nps"]
        w1 = " / ".join(str(v) for v in e["w1_tissue_hu"].values()) if "w1_tissue_hu" in e else "–"
        rows.append(
            f"| {name} | {shares} | {w1} | {e.get('w1_fat_soft_hu', '–')} "
            f"| {n['peak_f']} | {n['mean_f']} | {n['sd_hu']} | {e.get('nps_shape_distance', '–')} |"
        )
    return "\n".join(rows) + "\n"


def figures(scans: list[Scan], metrics: dict[str, Any], out: Path) -> None:
    """montage.png (mid slices, soft-tissue window, no header text), histograms.png, nps.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scans), figsize=(3.0 * len(scans), 3.2))
    for ax, scan in zip(np.atleast_1d(axes), scans, strict=True):
        ax.imshow(scan.hu[scan.show], cmap="gray", vmin=SOFT_WINDOW[0], vmax=SOFT_WINDOW[1])
        ax.set_title(scan.name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "montage.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(WINDOWS), figsize=(10.0, 3.0))
    for ax, (tissue, (lo, hi)) in zip(axes, HIST_RANGES.items(), strict=True):
        bins = [float(b) for b in np.linspace(lo, hi, 61)]
        for scan in scans:
            ax.hist(
                window(scan.hu[scan.body], lo, hi), bins=bins, density=True, histtype="step", label=scan.name
            )
        ax.set_title(f"{tissue} ({WINDOWS[tissue][0]:.0f}…{WINDOWS[tissue][1]:.0f} HU)", fontsize=9)
        ax.set_xlabel("HU inside the body", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "histograms.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for name, e in metrics.items():
        f, nps = np.asarray(e["nps"]["f"]), np.asarray(e["nps"]["nps"])
        area = float(np.trapezoid(2 * np.pi * f * nps, f)) or 1.0
        ax.plot(f, nps / area, label=f"{name} (SD {e['nps']['sd_hu']} HU)")
    ax.set_xlabel("spatial frequency (cycles/mm)")
    ax.set_ylabel("NPS / noise variance (mm²)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "nps.png", dpi=90)
    plt.close(fig)


EFFECTS = ("arms_down", "truncation", "metal", "motion", "bowel", "phase=art")


def effects_figure(matrix: int, out: Path) -> None:
    """effects.png: the same case with one option at a time, at the slice that shows it best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rtseg.structures import BY_NAME

    fig, axes = plt.subplots(1, len(EFFECTS), figsize=(2.4 * len(EFFECTS), 2.7))
    for ax, option in zip(axes, EFFECTS, strict=True):
        patient, grid, body, _ = make_case("A", 0, 1, matrix=matrix, realism=Realism.parse(option))
        k = int(np.argmax((body.labels == BY_NAME["Liver"].label).sum(axis=(1, 2))))
        if body.metal is not None:
            k = int(np.argmax((body.metal > 0).sum(axis=(1, 2))))
        elif option == "bowel":
            k = int(np.argmax((body.labels == BY_NAME["Colon"].label).sum(axis=(1, 2))))
        image, aspect = body.hu[k], 1.0
        if option == "motion":  # breathing shows along z: a coronal reformat through the liver dome
            j = int(np.argmax((body.labels == BY_NAME["Liver"].label).sum(axis=(0, 2))))
            image, aspect = body.hu[::-1, j, :], grid.spacing[0] / grid.spacing[1]
        ax.imshow(image, cmap="gray", vmin=SOFT_WINDOW[0], vmax=SOFT_WINDOW[1], aspect=aspect)
        ax.set_title(option + (" (coronal)" if option == "motion" else ""), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "effects.png", dpi=80)
    plt.close(fig)


def run(realct: Path | None, out: Path, matrix: int, index: int, effects: bool) -> dict[str, Any]:
    """Build, read, measure and draw; returns the metrics (also written as JSON and markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    scans = [
        phantom_scan("phantom (plain)", matrix, index, None),
        phantom_scan("phantom (clinical)", matrix, index, Realism.clinical()),
    ]
    reference = head = None
    if realct is not None and (realct / ABDOMEN_REF).is_dir():
        reference = real_scan(realct / ABDOMEN_REF, "real abdomen (Siemens)", (20.0, 160.0))
        head = real_scan(realct / HEAD_REF, "real head (noise only)", (15.0, 60.0))
    metrics = compare(scans, reference, head)
    figures([*scans, *([reference] if reference is not None else [])], metrics, out)
    if effects:
        effects_figure(matrix, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "metrics.md").write_text(table(metrics))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rtseg.phantom.realism_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--realct", type=Path, default=None, help="folder of the real series (../shared/realct)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the figures and metrics")
    parser.add_argument("--matrix", type=int, default=256, help="phantom image matrix (default 256)")
    parser.add_argument("--case", type=int, default=0, help="phantom case index (center A, seed 0)")
    parser.add_argument("--no-effects", action="store_true", help="skip effects.png (one build per option)")
    args = parser.parse_args(argv)
    if args.realct is not None and not (args.realct / ABDOMEN_REF).is_dir():
        print(f"no {ABDOMEN_REF} under {args.realct}: phantoms only", file=sys.stderr)
    try:
        metrics = run(args.realct, args.out, args.matrix, args.case, not args.no_effects)
    except InputError as exc:
        print(f"realism_report: error: {exc}", file=sys.stderr)
        return 2
    print(table(metrics), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
