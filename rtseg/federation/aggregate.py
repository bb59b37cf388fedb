"""Aggregation of site updates: checks first, then weighted FedAvg, trimmed mean or median.

Plain FedAvg averages whatever arrives and trusts every self-reported example
count. Here an update is rejected (and logged) when its keys or shapes differ
from the global model, when it holds NaN/Inf, or when its distance from the
global model is an outlier; a site's weight is its case count capped by what it
declared in the fingerprint round and by a configured maximum.
"""

from __future__ import annotations

import logging
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FederationError(f"unknown aggregation {self.method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str


def update_norm(update: Arrays, reference: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum((update[k] - reference[k]) ** 2)) for k in reference)))


def screen(
    updates: list[Update], reference: Arrays, policy: AggregationPolicy
) -> tuple[list[Update], list[Rejection]]:
    """Updates fit to aggregate, and the rejected ones with their reason (also logged)."""
    fit, rejected = [], []
    for u in updates:
        reason = _shape_problem(u.arrays, reference) or _finite_problem(u.arrays)
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


def aggregate(
    updates: list[Update], weights: list[float], reference: Arrays, policy: AggregationPolicy
) -> Arrays:
    """The new global arrays from screened updates."""
    if not updates:
        raise FederationError("no update left to aggregate")
    out: Arrays = {}
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
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
    cut = int(fraction * stack.shape[0])
    ordered = np.sort(stack, axis=0)
    return np.asarray(ordered[cut : stack.shape[0] - cut].mean(axis=0))
