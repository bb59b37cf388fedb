"""Federated dataset fingerprint: sites send aggregate statistics only; the coordinator pools them.

A site sends, per case, the spacing and shape it trains on, and one fixed-bin
histogram of the HU values of all its foreground voxels (1 HU per bin), with
the exact count, sum and sum of squares. Pooling the histograms gives the
exact mean and standard deviation and, because the HU values nnU-Net sees are
integers, the exact 0.5/50/99.5 percentiles (linear interpolation between
order statistics, as ``numpy.percentile`` computes them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rtseg.errors import FederationError

HU_MIN = -1024  # the first bin holds everything at or below it
HU_MAX = 3071  # the last bin holds everything at or above it
N_BINS = HU_MAX - HU_MIN + 1


@dataclass(frozen=True)
class SiteFingerprint:
    """What one site tells the coordinator about its training data (no voxel, no identifier)."""

    labels: dict[str, int]
    spacings: list[list[float]]  # per case, (z, y, x) mm
    shapes: list[list[int]]  # per case, (z, y, x) voxels
    histogram: list[int]  # N_BINS counts of foreground HU
    count: int
    total: float  # sum of foreground HU
    total_sq: float  # sum of squared foreground HU

    def to_record(self) -> dict[str, Any]:
        """Flat values for a Flower ConfigRecord."""
        return {
            "labels": json.dumps(self.labels),
            "spacings": [s for case in self.spacings for s in case],
            "shapes": [n for case in self.shapes for n in case],
            "histogram": list(self.histogram),
            "count": int(self.count),
            "total": float(self.total),
            "total-sq": float(self.total_sq),
        }

    @classmethod
    def from_record(cls, doc: dict[str, Any]) -> SiteFingerprint:
        spacings, shapes = list(doc["spacings"]), list(doc["shapes"])
        if len(spacings) % 3 or len(shapes) != len(spacings) or len(doc["histogram"]) != N_BINS:
            raise FederationError("malformed fingerprint from a site")
        return cls(
            labels={str(k): int(v) for k, v in json.loads(str(doc["labels"])).items()},
            spacings=[[float(x) for x in spacings[i : i + 3]] for i in range(0, len(spacings), 3)],
            shapes=[[int(x) for x in shapes[i : i + 3]] for i in range(0, len(shapes), 3)],
            histogram=[int(c) for c in doc["histogram"]],
            count=int(doc["count"]),
            total=float(doc["total"]),
            total_sq=float(doc["total-sq"]),
        )

    @property
    def n_cases(self) -> int:
        return len(self.shapes)


class FingerprintAccumulator:
    """Adds cases one by one (a site never holds all its volumes at once)."""

    def __init__(self, labels: dict[str, int]) -> None:
        self.labels = dict(labels)
        self.spacings: list[list[float]] = []
        self.shapes: list[list[int]] = []
        self.histogram = np.zeros(N_BINS, np.int64)
        self.count, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, image: npt.NDArray[Any], spacing: Sequence[float], labels: npt.NDArray[Any]) -> None:
        values = np.rint(image[labels > 0]).astype(np.int64)
        self.spacings.append([float(s) for s in spacing])
        self.shapes.append([int(n) for n in image.shape])
        self.histogram += np.bincount(np.clip(values, HU_MIN, HU_MAX) - HU_MIN, minlength=N_BINS)
        self.count += int(values.size)
        self.total += float(values.sum())
        self.total_sq += float(np.square(values.astype(np.float64)).sum())

    def result(self) -> SiteFingerprint:
        return SiteFingerprint(
            self.labels,
            self.spacings,
            self.shapes,
            self.histogram.tolist(),
            self.count,
            self.total,
            self.total_sq,
        )


def check_labels(fingerprints: Iterable[tuple[str, SiteFingerprint]]) -> dict[str, int]:
    """The one label table of the federation; a clear error naming the sites that differ."""
    tables = list(fingerprints)
    if not tables:
        raise FederationError("no site sent a fingerprint")
    reference_site, reference = tables[0][0], tables[0][1].labels
    for site, fp in tables[1:]:
        if fp.labels != reference:
            raise FederationError(
                f"dataset.json labels differ between sites: {reference_site} has {reference},"
                f" {site} has {fp.labels}; every site must use the same label table"
            )
    return reference


def pooled_percentiles(histogram: npt.NDArray[np.int64], qs: Sequence[float]) -> list[float]:
    """``numpy.percentile`` (linear) of the integer values a histogram of 1-HU bins counts."""
    cumulative = np.cumsum(histogram)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        position = q / 100 * (n - 1)
        lo, hi = math.floor(position), math.ceil(position)
        v_lo = int(np.searchsorted(cumulative, lo, side="right")) + HU_MIN
        v_hi = int(np.searchsorted(cumulative, hi, side="right")) + HU_MIN
        out.append(v_lo + (v_hi - v_lo) * (position - lo))
    return out


def pooled_fingerprint(fingerprints: Sequence[SiteFingerprint]) -> dict[str, Any]:
    """nnU-Net's ``dataset_fingerprint.json`` for the union of all sites' cases."""
    histogram = np.sum([np.asarray(fp.histogram, np.int64) for fp in fingerprints], axis=0)
    count = sum(fp.count for fp in fingerprints)
    if count == 0:
        raise FederationError("no foreground voxel at any site")
    mean = sum(fp.total for fp in fingerprints) / count
    variance = max(sum(fp.total_sq for fp in fingerprints) / count - mean**2, 0.0)
    p005, median, p995 = pooled_percentiles(histogram, (0.5, 50.0, 99.5))
    nonzero = np.flatnonzero(histogram)
    return {
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": float(nonzero[-1] + HU_MIN),
                "mean": float(mean),
                "median": float(median),
                "min": float(nonzero[0] + HU_MIN),
                "percentile_00_5": float(p005),
                "percentile_99_5": float(p995),
                "std": float(math.sqrt(variance)),
            }
        },
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [shape for fp in fingerprints for shape in fp.shapes],
        "spacings": [spacing for fp in fingerprints for spacing in fp.spacings],
    }
