"""What a coordinator sends never runs code or picks a path at a site; a site joins only over TLS.

The site here is real (its raw dataset and fingerprint written as the
fingerprint round leaves them); the coordinator's messages go straight to the
ClientApp's handlers, as Flower would deliver them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_model_safety import appeared, shell_payloads

from rtseg.errors import FederationError, InputError, ModelError
from rtseg.federation import client_app
from rtseg.federation.fingerprint import FingerprintAccumulator
from rtseg.federation.flower import Payload, SiteContext
from rtseg.federation.schedule import SiteSettings, run_site
from rtseg.federation.task import DATASET_ID, DATASET_NAME, plans_hash, site_error_reason
from rtseg.model.children import nnunet_dirs
from rtseg.model.cpu import CpuConfig
from rtseg.model.dataset import dataset_folder_name, write_raw_dataset
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import read_json

LABELS = {"background": 0, "Bright": 1}
CPU = CpuConfig(
    target_spacing_zyx=(4.0, 3.0, 3.0),
    patch_size_zyx=(48, 80, 80),
    n_stages=5,
    epochs=1,
    iterations_per_epoch=1,
    val_iterations_per_epoch=1,
)


def prepared_site(root: Path) -> SiteContext:
    """A site whose fingerprint round is done: raw dataset and fingerprint.json in its work folder."""
    work = root / "work"
    rng = np.random.default_rng(0)
    accumulator = FingerprintAccumulator(LABELS)
    cases = []
    for i in range(2):
        image = rng.normal(0, 20, (16, 24, 24)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[4:10, 8:16, 8:16] = 1
        image[label > 0] += 300
        accumulator.add(image, (4.0, 3.0, 3.0), label)
        cases.append((f"case{i}", image, (4.0, 3.0, 3.0), label))
    write_raw_dataset(nnunet_dirs(work).raw, DATASET_ID, DATASET_NAME, cases, LABELS)
    (work / "fingerprint.json").write_text(json.dumps(accumulator.result().__dict__))
    node_config = {"site-id": "site-a", "data-dir": str(root / "cases"), "work-dir": str(work)}
    return SiteContext(node_config=node_config, run_config={}, run_id=1)


def coordinator_plans(**changes: Any) -> dict[str, Any]:
    """Plans as the coordinator makes them (the default model's, for this site's dataset)."""
    plans = read_json(default_model_dir() / "plans.json")
    plans["dataset_name"] = dataset_folder_name(DATASET_ID, DATASET_NAME)
    plans.update(changes)
    return plans


def round_payload(plans: dict[str, Any]) -> Payload:
    config = {
        "plans": json.dumps(plans),
        "plans-hash": plans_hash(plans),
        "cpu-config": json.dumps(CPU.to_dict()),
        "round": 1,
        "epochs": 1,
        "epoch-offset": 0,
        "total-epochs": 1,
    }
    return Payload(config=config)


def test_site_refuses_plans_that_name_a_callable(tmp_path: Path) -> None:
    """Plans arrive over the network: the nonlinearity ``subprocess.Popen`` never runs at the site."""
    marker = tmp_path / "code-ran"
    context = prepared_site(tmp_path / "site")
    plans = coordinator_plans()
    nonlin, kwargs = shell_payloads(marker)[0]
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["nonlin"], arch["nonlin_kwargs"] = nonlin, kwargs
    with pytest.raises(ModelError) as info:
        client_app.train(round_payload(plans), context)
    assert not appeared(marker), "the site ran the command the coordinator's plans name"
    assert info.value.source == "plans from the coordinator"
    assert "arch_kwargs.nonlin is 'subprocess.Popen'" in info.value.message


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_site_never_deletes_a_folder_the_coordinator_names(tmp_path: Path, how: str) -> None:
    context = prepared_site(tmp_path / "site")
    preprocessed = nnunet_dirs(Path(context.node_config["work-dir"])).preprocessed
    if how == "absolute":
        target = tmp_path / "xyz_absolute"
        name = str(target)
    else:
        name = "../../escape"
        target = (preprocessed / name).resolve()
    target.mkdir(parents=True)
    (target / "sentinel.txt").write_text("keep me")
    with pytest.raises(FederationError) as info:
        client_app.prepare(round_payload(coordinator_plans(dataset_name=name)), context)
    assert (target / "sentinel.txt").read_text() == "keep me"
    assert "dataset name in the coordinator's plans" in str(info.value)
    assert "is not a plain name" in str(info.value)
    assert not preprocessed.exists() or not any(preprocessed.iterdir())


def test_site_refuses_a_plain_but_foreign_dataset_name(tmp_path: Path) -> None:
    """A plain name that is not this site's dataset would make nnU-Net preprocess elsewhere."""
    context = prepared_site(tmp_path / "site")
    plans = coordinator_plans(dataset_name="Dataset602_Other")
    with pytest.raises(FederationError, match="Dataset602_Other; this site prepared Dataset601"):
        client_app.prepare(round_payload(plans), context)


def _table(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "coordinator": "127.0.0.1:9",
        "site_id": "site-a",
        "data_dir": str(tmp_path / "data"),
        "work_dir": str(tmp_path / "work"),
        **extra,
    }


def test_site_without_tls_needs_insecure_true(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="no `ca`.*insecure = true") as info:
        SiteSettings.from_mapping(_table(tmp_path), "site.toml")
    assert info.value.source == "site.toml"
    with pytest.raises(InputError, match="federation.insecure must be true or false, got .yes."):
        SiteSettings.from_mapping(_table(tmp_path, insecure="yes"), "site.toml")
    with pytest.raises(FederationError, match="both `ca` and insecure = true"):
        SiteSettings.from_mapping(_table(tmp_path, insecure=True, ca="ca.crt"), "site.toml")
    assert SiteSettings.from_mapping(_table(tmp_path, ca="ca.crt"), "site.toml").insecure is False
    assert SiteSettings.from_mapping(_table(tmp_path, insecure=True), "site.toml").insecure is True


def test_supernode_without_tls_is_not_started_unless_insecure(tmp_path: Path) -> None:
    from rtseg.federation.processes import start_supernode, stop

    with pytest.raises(FederationError, match="without TLS"):
        proc = start_supernode(tmp_path / "home", "127.0.0.1:9", 9, {"site-id": "a"})
        stop(proc)  # reached only when it was started after all: leave no SuperNode behind
    assert not (tmp_path / "home" / "supernode.log").exists()


def test_insecure_site_warns_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = SiteSettings.from_mapping(_table(tmp_path, insecure=True), "site.toml")
    stop = threading.Event()
    stop.set()  # only the start: no SuperNode is launched
    with caplog.at_level(logging.WARNING, logger="rtseg.federation.schedule"):
        run_site(settings, stop)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("WITHOUT TLS" in w and "insecure = true" in w for w in warnings), warnings


def test_site_command_without_tls_is_refused_with_a_message(tmp_path: Path) -> None:
    # a window that is closed now: refused at start whether or not the SuperNode would run yet
    opens = (dt.datetime.now() + dt.timedelta(hours=6)).time()
    window = f"{opens:%H:%M}-{(dt.datetime.combine(dt.date.today(), opens) + dt.timedelta(minutes=1)):%H:%M}"
    result = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "federation", "site", "--coordinator", "127.0.0.1:9"]
        + ["--site-id", "site-a", "--data", str(tmp_path / "d"), "--work", str(tmp_path / "w")]
        + ["--window", window],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "no `ca`" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr
    config = tmp_path / "site.toml"
    config.write_text(
        '[federation]\ncoordinator = "127.0.0.1:9"\nsite_id = "site-a"\ndata_dir = "d"\nwork_dir = "w"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "federation", "site", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and f"{config}: [federation] no `ca`" in result.stderr
    assert not (tmp_path / "w").exists()


def test_site_names_never_leave_the_certificate_folder(tmp_path: Path) -> None:
    from rtseg.federation.certs import make_certs

    with pytest.raises(FederationError, match="site name '../evil' is not a plain name"):
        make_certs(tmp_path / "certs", ["site-a", "../evil"])
    assert not (tmp_path / "certs" / "evil").exists() and not (tmp_path / "certs" / "ca.crt").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"plans": "{not json"}, "the coordinator's 'plans' is not readable (JSONDecodeError)"),
        ({"plans": "[" * 100_000 + "]" * 100_000}, "'plans' is not readable (RecursionError)"),
        ({"cpu-config": "[1, 2]"}, "the coordinator's 'cpu-config' is not usable: not a JSON object"),
        ({"cpu-config": '{"epochs": 1, "shell": "rm -rf /"}'}, "unknown training settings ['shell']"),
        ({"cpu-config": '{"epochs": 0}'}, "not usable: batch_size, epochs and iterations_per_epoch must"),
        ({"epochs": "many"}, "the coordinator's 'epochs' is not readable (ValueError)"),
        ({"round": None}, "the coordinator's 'round' is not readable (TypeError)"),
        ({"total-epochs": ...}, "the coordinator's message has no 'total-epochs'"),
    ],
)
def test_a_malformed_round_message_is_refused_naming_the_value_before_the_site_acts(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    """The coordinator is a peer: what it sends is read in rtseg's terms, and the reason may go back to it."""
    context = prepared_site(tmp_path / "site")
    config = {**round_payload(coordinator_plans()).config, **change}
    config = {k: v for k, v in config.items() if v is not ...}
    before = set(tmp_path.rglob("*"))
    with pytest.raises(FederationError) as info:
        client_app.train(Payload(config=config), context)
    assert expected in info.value.message
    assert site_error_reason(info.value) == f"FederationError: {info.value.message}"  # what goes back
    assert {p.name for p in set(tmp_path.rglob("*")) - before} <= {"site.log"}  # nothing preprocessed


@pytest.mark.parametrize("spacing", [[4.0, 3.0], ["x", 1, 1], [0.0, 3.0, 3.0], [float("nan"), 3.0, 3.0]])
def test_a_malformed_fingerprint_query_is_refused_naming_the_spacing(tmp_path: Path, spacing: Any) -> None:
    context = prepared_site(tmp_path / "site")
    with pytest.raises(FederationError, match="the coordinator's 'spacing' is not"):
        client_app.fingerprint(Payload(config={"spacing": spacing}), context)


def test_plans_for_a_network_too_large_for_the_sites_memory_fail_the_round(tmp_path: Path) -> None:
    """A coordinator's plans decide the network's size; the site decides how much memory training may take."""
    context = prepared_site(tmp_path / "site")
    context.node_config["max-memory-gb"] = 3.0
    plans = coordinator_plans()
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [1024, 2048, 4096, 8192, 8192]  # ~10 GB of float32 weights
    with pytest.raises(ModelError) as info:
        client_app.train(round_payload(plans), context)
    assert "nnU-Net train_round needed more memory than the 3 GB it may use" in info.value.message
    logs = sorted((tmp_path / "site" / "work" / "logs").glob("train_round-*.log"))
    assert "can't allocate memory" in logs[-1].read_text()  # torch's allocator refused, nothing was killed
    assert site_error_reason(info.value) == "ModelError at the site: the reason stays in the site's log"
