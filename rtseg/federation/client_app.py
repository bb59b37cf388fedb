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
from collections.abc import Callable
from typing import Any, TypeVar

from rtseg.errors import FederationError, InputError
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
from rtseg.model.cpu import CpuConfig, validate_config
from rtseg.model.rounds import RoundSchedule
from rtseg.privacy import RedactingFormatter
from rtseg.structures import dataset_labels

log = logging.getLogger(__name__)
T = TypeVar("T")


def _site(context: SiteContext) -> Site:
    site = Site.from_node_config(context.node_config)
    site.work_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(site.work_dir / "site.log")
    handler.setFormatter(RedactingFormatter())
    logging.getLogger("rtseg").addHandler(handler)
    logging.getLogger("rtseg").setLevel(logging.INFO)
    return site


def _from_coordinator(config: dict[str, Any], key: str, read: Callable[[Any], T]) -> T:
    """``read(config[key])`` of a coordinator's message; missing or unreadable: a :class:`FederationError`.

    The coordinator is a peer: its values are checked before the site acts on them,
    and what is wrong with them is said in rtseg's words (which may go back to it).
    """
    if key not in config:
        raise FederationError(f"the coordinator's message has no {key!r}")
    try:
        return read(config[key])
    except InputError as exc:
        raise FederationError(f"the coordinator's {key!r} is not usable: {exc.message}") from exc
    except (TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise FederationError(f"the coordinator's {key!r} is not readable ({type(exc).__name__})") from exc


def _json(value: Any) -> Any:
    return json.loads(str(value))


def _cpu_config(value: Any) -> CpuConfig:
    doc = _json(value)
    if not isinstance(doc, dict):
        raise InputError("not a JSON object")
    config = CpuConfig.from_dict(doc)
    validate_config(config)
    return config


def _spacing(value: Any) -> tuple[float, float, float]:
    z, y, x = (float(v) for v in value)
    if not all(0 < v < 100 for v in (z, y, x)):
        raise InputError(f"spacing {value!r} is not three lengths in mm")
    return z, y, x


def _plans(c: dict[str, Any]) -> tuple[Any, str]:
    return _from_coordinator(c, "plans", _json), _from_coordinator(c, "plans-hash", str)


def fingerprint(payload: Payload, context: SiteContext) -> Payload:
    """Aggregate statistics of this site's data (spacings, shapes, foreground HU histogram)."""
    site = _site(context)
    own = context.node_config.get("labels")  # the site's own label table; the coordinator checks them
    labels = json.loads(str(own)) if own else dataset_labels()
    spacing = _from_coordinator(payload.config, "spacing", _spacing)
    fp = prepare_data(site, labels, spacing)
    log.info("site %s: fingerprint sent (%d cases)", site.site_id, fp.n_cases)
    return Payload(config=fp.to_record())


def prepare(payload: Payload, context: SiteContext) -> Payload:
    """Preprocess the site's data with the federation's plans (once per plans hash)."""
    started = time.monotonic()
    site = _site(context)
    c = payload.config
    config = site_config(site, _from_coordinator(c, "cpu-config", _cpu_config))
    plans, plans_hash = _plans(c)
    ensure_preprocessed(site, plans, plans_hash, config)
    return Payload(config={"plans-hash": plans_hash, "seconds": time.monotonic() - started})


def train(payload: Payload, context: SiteContext) -> Payload:
    """E local epochs from the global weights; the weights and the case count go back."""
    started = time.monotonic()
    site = _site(context)
    c = payload.config
    config = site_config(site, _from_coordinator(c, "cpu-config", _cpu_config))
    plans, plans_hash = _plans(c)
    round_number = _from_coordinator(c, "round", int)
    schedule = RoundSchedule(
        epochs=_from_coordinator(c, "epochs", int),
        epoch_offset=_from_coordinator(c, "epoch-offset", int),
        total_epochs=_from_coordinator(c, "total-epochs", int),
        prox_mu=_from_coordinator(c, "prox-mu", float) if "prox-mu" in c else 0.0,
        nice=site.nice,
    )
    ensure_preprocessed(site, plans, plans_hash, config)
    arrays, cases, seconds = train_local(site, payload.arrays, schedule, config)
    if context.node_config.get("fault") == "nan":
        arrays = poison(arrays)
    elif context.node_config.get("fault"):
        raise FederationError(f"unknown fault {context.node_config.get('fault')!r}")
    log.info("site %s: round %d trained in %.1f s on %d cases", site.site_id, round_number, seconds, cases)
    return Payload(
        arrays=arrays,
        config={
            "round": round_number,
            "plans-hash": plans_hash,
            "cases": cases,
            "train-seconds": seconds,
            "site-seconds": time.monotonic() - started,
            **coverage_config(site),
        },
    )


app = client_app({"fingerprint": fingerprint, "prepare": prepare}, train, site_error_reason)
