"""The site's nnU-Net work: its data → fingerprint, preprocessing with the federation's plans, local rounds.

Everything here runs at the site, on the site's own cases (``<case>/ct/`` +
``<case>/labels.nii.gz``, see :mod:`rtseg.cases`). What leaves the site is
returned to the ClientApp: a :class:`~rtseg.federation.fingerprint.SiteFingerprint`
(aggregate statistics) or the weights as NumPy arrays plus the case count.
nnU-Net runs in child processes with bounded threads and lower priority.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rtseg.errors import FederationError, ModelError
from rtseg.federation.fingerprint import FingerprintAccumulator, SiteFingerprint, pooled_fingerprint
from rtseg.model.children import nnunet_dirs
from rtseg.model.cpu import CpuConfig
from rtseg.model.dataset import dataset_folder_name, write_raw_dataset
from rtseg.model.plans_check import check_plans
from rtseg.model.rounds import RoundSchedule, preprocess_with_plans, train_round
from rtseg.model.weights import load_arrays, save_arrays
from rtseg.paths import safe_child, safe_name
from rtseg.privacy import redact_uids

log = logging.getLogger(__name__)

DATASET_ID = 601
DATASET_NAME = "RtsegFederated"
PLANS_SOURCE = "plans from the coordinator"
# how a site trains the structures a case's contour set lacks (case.json "unknown"):
# "ignore": nnU-Net's ignore label (the default); "background": as drawn (External inside the body)
PARTIAL_LABELS = ("ignore", "background")


@dataclass(frozen=True)
class Site:
    """A site's local data and working folder (never sent anywhere)."""

    site_id: str
    data_dir: Path
    work_dir: Path
    threads: int = 1
    nice: int = 10
    partial_labels: str = "ignore"  # one of PARTIAL_LABELS
    max_memory_gb: float | None = None  # what the site's nnU-Net children may take; None: no limit

    def __post_init__(self) -> None:
        if self.partial_labels not in PARTIAL_LABELS:
            raise FederationError(
                f"partial-labels must be {' or '.join(PARTIAL_LABELS)}, got {self.partial_labels!r}"
            )
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise FederationError(f"max-memory-gb must be positive, got {self.max_memory_gb!r}")

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> Site:
        try:
            return cls(
                str(node_config["site-id"]),
                Path(str(node_config["data-dir"])),
                Path(str(node_config["work-dir"])),
                int(node_config.get("threads", 1)),
                int(node_config.get("nice", 10)),
                str(node_config.get("partial-labels", "ignore")),
                float(node_config["max-memory-gb"]) if "max-memory-gb" in node_config else None,
            )
        except KeyError as exc:
            raise FederationError(f"site node config lacks {exc}") from exc


MAX_REASON_CHARS = 400


def site_error_reason(exc: Exception) -> str:
    """What of a failure at the site goes to the coordinator, another institution.

    The kind of error, and rtseg's sentence (never its file, UIDs redacted) only for
    errors about what the coordinator sent or about the federation's protocol and the
    site's federation settings: a :class:`FederationError`, or the :class:`ModelError`
    of the coordinator's plans. Any other text may name what the site holds: a case
    folder (which a department may name after the patient), a value from a DICOM
    header, the tail of an nnU-Net log listing case ids; it stays in the site's log.
    """
    kind = type(exc).__name__
    if isinstance(exc, FederationError) or (isinstance(exc, ModelError) and exc.source == PLANS_SOURCE):
        text = redact_uids(exc.message)
        if len(text) > MAX_REASON_CHARS:
            text = text[: MAX_REASON_CHARS - 1] + "…"
        return f"{kind}: {text}"
    return f"{kind} at the site: the reason stays in the site's log"


def plans_hash(plans: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the plans (travels with every round)."""
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()[:16]


def site_config(site: Site, run_config: CpuConfig) -> CpuConfig:
    """The federation's training settings with this site's own resource limits.

    Threads, workers and memory are the site's to give, whatever the coordinator's
    settings say: plans for a network larger than ``max-memory-gb`` allows fail that
    round at this site with a :class:`~rtseg.errors.ModelError`; the machine, which
    also runs the department's DICOM node, keeps the rest of its memory.
    """
    from dataclasses import replace

    return replace(
        run_config, threads=site.threads, da_workers=0, preprocess_workers=1, memory_gb=site.max_memory_gb
    )


def prepare_data(site: Site, labels: dict[str, int], spacing: tuple[float, float, float]) -> SiteFingerprint:
    """Write the site's cases as the nnU-Net raw dataset (resampled once) and fingerprint them."""
    from rtseg.cases import unknown_structures
    from rtseg.model.default import canonical_cases

    raw_root = nnunet_dirs(site.work_dir).raw
    name = dataset_folder_name(DATASET_ID, DATASET_NAME)
    folder = safe_child(raw_root, name, "dataset folder", FederationError)
    if folder.exists():
        shutil.rmtree(folder)  # cases may have been added or removed since the last run
    accumulator = FingerprintAccumulator(labels)

    def cases() -> Any:
        for case_id, image, spacing_zyx, label in canonical_cases(site.data_dir, spacing):
            if label is not None:
                accumulator.add(image, spacing_zyx, label)
            yield case_id, image, spacing_zyx, label

    # imported cases: unknown → nnU-Net's ignore label, unless the site trains them as drawn
    unknown = unknown_structures([site.data_dir]) if site.partial_labels == "ignore" else None
    write_raw_dataset(raw_root, DATASET_ID, DATASET_NAME, cases(), labels, unknown=unknown)
    result = accumulator.result()
    (site.work_dir / "fingerprint.json").write_text(json.dumps(result.__dict__))
    log.info("site %s: %d cases prepared, %d foreground voxels", site.site_id, result.n_cases, result.count)
    return result


def local_fingerprint(site: Site) -> SiteFingerprint:
    path = site.work_dir / "fingerprint.json"
    if not path.is_file():
        raise FederationError("the site has not prepared its data (no fingerprint round yet)")
    return SiteFingerprint(**json.loads(path.read_text()))


def check_coordinator_plans(plans: Any) -> None:
    """Plans from the network: for this site's own dataset, naming nothing nnU-Net would import and run.

    A wrong or unsafe dataset name is a :class:`FederationError` (nnU-Net joins
    it into the folders it writes and deletes); plans naming other code are a
    :class:`~rtseg.errors.ModelError` from :func:`~rtseg.model.plans_check.check_plans`.
    """
    if not isinstance(plans, dict):
        raise FederationError("the coordinator's plans are not a JSON object")
    name = safe_name(plans.get("dataset_name"), "dataset name in the coordinator's plans", FederationError)
    own = dataset_folder_name(DATASET_ID, DATASET_NAME)
    if name != own:
        raise FederationError(f"the coordinator's plans are for dataset {name}; this site prepared {own}")
    check_plans(plans, source=PLANS_SOURCE)


def ensure_preprocessed(site: Site, plans: dict[str, Any], expected_hash: str, config: CpuConfig) -> None:
    """Preprocess with the federation's plans unless already done with exactly these plans."""
    check_coordinator_plans(plans)  # before anything is written, deleted or imported
    if plans_hash(plans) != expected_hash:
        raise FederationError(f"plans hash mismatch: got {plans_hash(plans)}, round says {expected_hash}")
    marker = site.work_dir / "plans.sha256"
    if marker.is_file() and marker.read_text() == expected_hash:
        return
    own = pooled_fingerprint([local_fingerprint(site)])  # nnU-Net keeps it beside the plans
    preprocess_with_plans(site.work_dir, DATASET_ID, plans, own, config)
    marker.write_text(expected_hash)


def train_local(
    site: Site,
    global_arrays: dict[str, npt.NDArray[Any]],
    schedule: RoundSchedule,
    config: CpuConfig,
) -> tuple[dict[str, npt.NDArray[Any]], int, float]:
    """One round of local training from the global weights: (arrays, cases, training seconds)."""
    rounds = site.work_dir / "rounds"
    weights_in = save_arrays(rounds / "global.npz", global_arrays)
    weights_out = rounds / "local.npz"
    done = train_round(site.work_dir, DATASET_ID, weights_in, weights_out, schedule, config)
    arrays = load_arrays(weights_out)
    for key, ref in global_arrays.items():
        arrays[key] = arrays[key].astype(ref.dtype, copy=False)
    return arrays, local_fingerprint(site).n_cases, float(done["seconds"])


COVERAGE_PREFIX = "coverage."


def coverage_config(site: Site) -> dict[str, int]:
    """``coverage.<Structure>.<state>`` → cases of the site in that state (contoured/filled/unknown).

    Counts only, from ``case.json``: the coordinator learns which structures a
    site trains, never which case carries what.
    """
    from rtseg.case_report import coverage_counts

    counts = coverage_counts(site.data_dir)
    return {
        f"{COVERAGE_PREFIX}{name}.{state}": n
        for name, states in counts.items()
        for state, n in states.items()
    }


def poison(arrays: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """A NaN in the first float array: what a diverged site would send (for tests of rejection)."""
    out = dict(arrays)
    key = next(k for k, v in out.items() if v.dtype.kind == "f")
    out[key] = out[key].copy()
    out[key].flat[0] = np.nan
    return out
