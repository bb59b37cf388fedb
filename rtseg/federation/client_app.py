"""The site's Flower ClientApp: answers the fingerprint query and trains rounds.

Node config (``flower-supernode --node-config``): ``site-id``, ``data-dir``
(the site's cases), ``work-dir``, ``threads`` and ``nice`` for local training;
optionally ``labels`` (the site's JSON label table; default: rtseg's
structures), ``record-dir`` (every message sent is described there) and
``fault`` (``nan``: send a NaN update; for tests of the coordinator's checks).
"""

from __future__ import annotations

import json
import logging
import time

from rtseg.errors import FederationError
from rtseg.federation.flower import Payload, SiteContext, client_app
from rtseg.federation.task import (
    Site,
    coverage_config,
    ensure_preprocessed,
    poison,
    prepare_data,
    site_config,
    site_error_reason,
    train_local,
)
from rtseg.model.cpu import CpuConfig
from rtseg.model.rounds import RoundSchedule
from rtseg.privacy import RedactingFormatter
from rtseg.structures import dataset_labels

log = logging.getLogger(__name__)


def _site(context: SiteContext) -> Site:
    site = Site.from_node_config(context.node_config)
    site.work_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(site.work_dir / "site.log")
    handler.setFormatter(RedactingFormatter())
    logging.getLogger("rtseg").addHandler(handler)
    logging.getLogger("rtseg").setLevel(logging.INFO)
    return site


def fingerprint(payload: Payload, context: SiteContext) -> Payload:
    """Aggregate statistics of this site's data (spacings, shapes, foreground HU histogram)."""
    site = _site(context)
    own = context.node_config.get("labels")  # the site's own label table; the coordinator checks them
    labels = json.loads(str(own)) if own else dataset_labels()
    spacing = tuple(float(s) for s in payload.config["spacing"])
    fp = prepare_data(site, labels, (spacing[0], spacing[1], spacing[2]))
    log.info("site %s: fingerprint sent (%d cases)", site.site_id, fp.n_cases)
    return Payload(config=fp.to_record())


def prepare(payload: Payload, context: SiteContext) -> Payload:
    """Preprocess the site's data with the federation's plans (once per plans hash)."""
    started = time.monotonic()
    site = _site(context)
    c = payload.config
    config = site_config(site, CpuConfig.from_dict(json.loads(str(c["cpu-config"]))))
    ensure_preprocessed(site, json.loads(str(c["plans"])), str(c["plans-hash"]), config)
    return Payload(config={"plans-hash": str(c["plans-hash"]), "seconds": time.monotonic() - started})


def train(payload: Payload, context: SiteContext) -> Payload:
    """E local epochs from the global weights; the weights and the case count go back."""
    started = time.monotonic()
    site = _site(context)
    c = payload.config
    config = site_config(site, CpuConfig.from_dict(json.loads(str(c["cpu-config"]))))
    ensure_preprocessed(site, json.loads(str(c["plans"])), str(c["plans-hash"]), config)
    schedule = RoundSchedule(
        epochs=int(c["epochs"]),
        epoch_offset=int(c["epoch-offset"]),
        total_epochs=int(c["total-epochs"]),
        prox_mu=float(c.get("prox-mu", 0.0)),
        nice=site.nice,
    )
    arrays, cases, seconds = train_local(site, payload.arrays, schedule, config)
    if context.node_config.get("fault") == "nan":
        arrays = poison(arrays)
    elif context.node_config.get("fault"):
        raise FederationError(f"unknown fault {context.node_config.get('fault')!r}")
    log.info("site %s: round %s trained in %.1f s on %d cases", site.site_id, c["round"], seconds, cases)
    return Payload(
        arrays=arrays,
        config={
            "round": int(c["round"]),
            "plans-hash": str(c["plans-hash"]),
            "cases": cases,
            "train-seconds": seconds,
            "site-seconds": time.monotonic() - started,
            **coverage_config(site),
        },
    )


app = client_app({"fingerprint": fingerprint, "prepare": prepare}, train, site_error_reason)
