"""Aggregation of site updates: checks first, then weighted FedAvg, trimmed mean or median.

Plain FedAvg averages whatever arrives and trusts every self-reported example
count. Here an update is rejected (and logged) when its keys, shapes or dtypes
differ from the global model, when it holds NaN/Inf, or when its distance from
the global model is an outlier; a site's weight is its case count capped by
what it declared in the fingerprint round and by a configured maximum, and no
site's share of the total weight exceeds ``max_share`` (a site that lied in the
fingerprint round as well still cannot take over the global model).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rtseg.errors import FederationError

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
METHODS = ("fedavg", "fedprox", "trimmed-mean", "median")


@dataclass(frozen=True)
class Update:
    site: str
    arrays: Arrays
    cases: int  # as reported by the site


@dataclass(frozen=True)
class AggregationPolicy:
    method: str = "fedavg"  # fedprox aggregates like fedavg; its proximal term acts at the sites
    trim_fraction: float = 0.2  # trimmed mean: fraction cut at each end
    norm_factor: float = 5.0  # reject an update whose norm exceeds this × the median update norm
    max_cases: int = 10_000  # ceiling of any one site's weight
    # no site carries more than this share of the total weight (0.5: no site holds a majority;
    # with two sites FedAvg becomes the plain mean). 1.0: plain case-weighted FedAvg.
    max_share: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FederationError(f"unknown aggregation {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.max_share <= 1.0:
            raise FederationError(f"max-share {self.max_share!r} is not in (0, 1]")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise FederationError(f"trim-fraction {self.trim_fraction!r} is not in [0, 0.5)")


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str


MAX_REPORTED_CASES = 2**63 - 1  # what Flower carries as an integer; beyond it a count is no count


def cases_problem(value: object) -> str | None:
    """Why a reported case count is unusable (not a whole number, not positive, absurd), or None.

    A count within range but above what the site declared is capped later
    (:func:`site_weights`), not refused: the closed loop legitimately adds cases.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        return f"cases must be a whole number, got {type(value).__name__}"
    if value < 1:
        return f"cases must be positive, got {value}"
    if value > MAX_REPORTED_CASES:
        return f"cases {value:.3g} is beyond any real cohort"
    return None


def update_norm(update: Arrays, reference: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum((update[k] - reference[k]) ** 2)) for k in reference)))


def screen(
    updates: list[Update], reference: Arrays, policy: AggregationPolicy
) -> tuple[list[Update], list[Rejection]]:
    """Updates fit to aggregate, and the rejected ones with their reason (also logged)."""
    fit, rejected = [], []
    for u in updates:
        reason = (
            _shape_problem(u.arrays, reference)
            or _dtype_problem(u.arrays, reference)
            or _finite_problem(u.arrays)
        )
        if reason:
            rejected.append(Rejection(u.site, reason))
        else:
            fit.append(u)
    norms = {u.site: update_norm(u.arrays, reference) for u in fit}
    if len(fit) >= 3:  # with two sites there is no majority to call one of them an outlier
        limit = policy.norm_factor * float(np.median(list(norms.values())))
        outliers = {s for s, n in norms.items() if n > limit > 0}
        rejected += [Rejection(s, f"update norm {norms[s]:.3g} > {limit:.3g}") for s in sorted(outliers)]
        fit = [u for u in fit if u.site not in outliers]
    for r in rejected:
        log.warning("update of site %s rejected: %s", r.site, r.reason)
    return fit, rejected


def _shape_problem(arrays: Arrays, reference: Arrays) -> str | None:
    if set(arrays) != set(reference):
        return f"keys differ from the global model ({len(set(arrays) ^ set(reference))} differ)"
    bad = [k for k in reference if arrays[k].shape != reference[k].shape]
    return f"shapes differ for {bad[:3]}" if bad else None


def _dtype_problem(arrays: Arrays, reference: Arrays) -> str | None:
    # sites send back the dtypes they received; anything else (object, strings, complex, a wider
    # float that may overflow on the way back) is refused before any arithmetic touches it
    bad = [k for k in reference if arrays[k].dtype != reference[k].dtype]
    if not bad:
        return None
    k = bad[0]
    return f"dtype {arrays[k].dtype} for {k} ({len(bad)} arrays), the global model has {reference[k].dtype}"


def _finite_problem(arrays: Arrays) -> str | None:
    bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
    return f"NaN/Inf in {len(bad)} arrays (e.g. {bad[0]})" if bad else None


def site_weights(updates: list[Update], declared: dict[str, int], policy: AggregationPolicy) -> list[float]:
    """Case counts, each capped by what the site declared earlier and by ``policy.max_cases``."""
    weights = []
    for u in updates:
        cap = min(declared.get(u.site, policy.max_cases), policy.max_cases)
        if u.cases > cap:
            log.warning("site %s reported %d cases, more than %d: capped", u.site, u.cases, cap)
        weights.append(float(max(1, min(u.cases, cap))))
    return weights


def bounded_shares(weights: list[float], max_share: float) -> list[float]:
    """Weights normalised to shares, none above ``max_share``; the excess goes to the others pro rata.

    Water-filling: shares over the bound are fixed at the bound and the rest
    re-normalised until none exceeds it. When ``max_share`` is below
    ``1 / len(weights)`` the bound cannot hold for everybody: equal shares.
    """
    n = len(weights)
    if max_share * n <= 1.0:
        return [1.0 / n] * n
    capped: set[int] = set()
    while True:
        free = sum(w for i, w in enumerate(weights) if i not in capped)
        left = 1.0 - max_share * len(capped)
        shares = [max_share if i in capped else left * w / free for i, w in enumerate(weights)]
        over = {i for i, s in enumerate(shares) if s > max_share and i not in capped}
        if not over:
            return shares
        capped |= over


def aggregate(
    updates: list[Update], weights: list[float], reference: Arrays, policy: AggregationPolicy
) -> Arrays:
    """The new global arrays from screened updates."""
    if not updates:
        raise FederationError("no update left to aggregate")
    out: Arrays = {}
    w = np.asarray(bounded_shares(weights, policy.max_share), np.float64)
    for key, ref in reference.items():
        stack = np.stack([u.arrays[key].astype(np.float64) for u in updates])
        if ref.dtype.kind != "f":
            out[key] = updates[0].arrays[key]
        elif policy.method in ("fedavg", "fedprox"):
            out[key] = np.tensordot(w, stack, axes=1).astype(ref.dtype)
        elif policy.method == "median":
            out[key] = np.median(stack, axis=0).astype(ref.dtype)
        else:
            out[key] = _trimmed_mean(stack, policy.trim_fraction).astype(ref.dtype)
    return out


def _trimmed_mean(stack: npt.NDArray[np.float64], fraction: float) -> npt.NDArray[np.float64]:
    # Flower's FedTrimmedAvg cuts int(fraction * n), i.e. nothing below 5 sites at 0.2; rounding up
    # cuts one site at each end from three sites on, so one poisoned site of three is always cut
    n = stack.shape[0]
    cut = min(math.ceil(fraction * n), (n - 1) // 2)
    ordered = np.sort(stack, axis=0)
    return np.asarray(ordered[cut : n - cut].mean(axis=0))
