"""A real federation on loopback: SuperLink + two SuperNodes (centers A and B), TLS and node keys.

One federation is started for the module and driven through a sequence of
runs (each test is one step; later steps build on the coordinator state of
earlier ones, as a real coordinator does): a first round, the privacy audit of
what the sites sent, an unregistered key, a coordinator restart, a NaN update,
a site dropping out mid-round. Tiny nnU-Net (3 stages, 4 features, patch
32×48×48, 2 iterations per local epoch), 2 phantom cases of 48×48 per site.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtseg.federation.fingerprint import N_BINS
from rtseg.federation.simulate import TINY, LocalFederation, SimulationSpec, rounds_log
from rtseg.model.weights import load_arrays

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    spec = SimulationSpec(
        sites=2,
        rounds=1,
        cases_per_site=2,
        matrix=48,
        cpu=replace(TINY, iterations_per_epoch=2),
        secure=True,
        min_sites=1,
        round_timeout=600.0,
    )
    with LocalFederation(tmp_path_factory.mktemp("federation"), spec) as federation:
        # phantoms are deterministic: keep them between test sessions (they take minutes on a busy machine)
        federation.make_cohorts(cache=Path(tempfile.gettempdir()) / "rtseg-fed-cohorts")
        federation.start_coordinator()
        for i in range(spec.sites):
            federation.start_site(i)
        yield federation


def _log(fed: LocalFederation) -> str:
    return (fed.state_dir / "coordinator.log").read_text()


def _sent(fed: LocalFederation, site: int, kind: str) -> list[Path]:
    return sorted((fed.site_dir(site) / "sent").glob(f"*-{kind}.json"))


def _run(fed: LocalFederation, rounds: int) -> None:
    fed.spec.rounds = rounds
    run_id, status = fed.run(timeout=1200)
    assert status == "finished:completed", _log(fed)[-3000:]


def test_first_round_gives_a_loadable_model_that_is_the_weighted_average(fed: LocalFederation) -> None:
    _run(fed, 1)
    log = _log(fed)
    assert "pooled fingerprint of 2 sites, 4 cases" in log
    assert "round 1 completed" in log and "2 updates aggregated, 0 rejected" in log
    (record,) = rounds_log(fed.state_dir)
    assert record["round"] == 1 and len(record["sites"]) == 2 and not record["rejected"]
    # the coordinator knows each site's structure coverage (phantoms: every structure contoured)
    for site in record["sites"].values():
        assert site["coverage"]["Pancreas"] == {"contoured": 2, "filled": 0, "unknown": 0}
    # the global model is the case-weighted mean of exactly what the two sites sent
    sent = [load_arrays(_sent(fed, i, "train")[-1].with_suffix(".npz")) for i in range(2)]
    weights = [s["weight"] for s in record["sites"].values()]
    assert weights == [2.0, 2.0]
    glob = load_arrays(fed.state_dir / "rounds" / "round_001.npz")
    start = load_arrays(fed.state_dir / "rounds" / "round_000.npz")
    assert set(glob) == set(sent[0]) == set(start)
    for key in glob:
        np.testing.assert_allclose(glob[key], (sent[0][key] + sent[1][key]) / 2, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(glob[k], start[k]) for k in glob)  # training moved the weights
    # a standard nnU-Net results folder with a manifest naming federation, round and hash
    from rtseg.cases import case_dirs, load_case
    from rtseg.model.manifest import load_manifest, model_hash
    from rtseg.model.segmenter import NnunetSegmenter

    model_dir = fed.state_dir / "models" / "round_001"
    manifest = load_manifest(model_dir)
    assert manifest.provenance["federation"] == "rtseg-sim" and manifest.provenance["round"] == 1
    assert manifest.provenance["hash"] == model_hash(model_dir) and manifest.version.endswith(
        model_hash(model_dir)
    )
    segmenter = NnunetSegmenter(model_dir, threads=1)
    assert segmenter.loaded_via == "trainer"
    volume = load_case(case_dirs(fed.site_dir(1) / "cases")[0]).volume
    labels = segmenter.segment(volume).labels
    assert labels.shape == volume.shape and labels.dtype == np.uint8


def test_sites_send_no_voxels_and_no_identifiers(fed: LocalFederation) -> None:
    glob = load_arrays(fed.state_dir / "rounds" / "round_001.npz")
    for i in range(2):
        case_dirs = sorted(p for p in (fed.site_dir(i) / "cases").iterdir() if p.is_dir())
        identifiers = set()
        for case in case_dirs:
            ds = pydicom.dcmread(next((case / "ct").iterdir()), stop_before_pixels=True)
            identifiers |= {str(ds.PatientName), str(ds.PatientID), ds.StudyInstanceUID, ds.SeriesInstanceUID}
            identifiers.add(case.name)
        identifiers.discard("")
        files = sorted((fed.site_dir(i) / "sent").iterdir())
        assert files, "the ClientApp adapter recorded nothing"
        for path in files:
            data = path.read_bytes()
            for ident in identifiers:
                assert ident.encode() not in data, f"{ident!r} found in {path.name}"
        (fp,) = _sent(fed, i, "query.fingerprint")
        fingerprint = json.loads(fp.read_text())["records"]["config"]["values"]
        assert set(fingerprint) == {"labels", "spacings", "shapes", "histogram", "count", "total", "total-sq"}
        assert len(fingerprint["spacings"]) == len(fingerprint["shapes"]) == 3 * len(case_dirs)
        assert len(fingerprint["histogram"]) == N_BINS
        for path in _sent(fed, i, "train"):
            doc = json.loads(path.read_text())
            assert set(doc["records"]) == {"arrays", "config"}
            arrays = doc["records"]["arrays"]["arrays"]
            # exactly the model's tensors, with the model's shapes: nothing else rides along
            assert {k: v[0] for k, v in arrays.items()} == {k: list(v.shape) for k, v in glob.items()}
            config = doc["records"]["config"]["values"]
            coverage = {k: v for k, v in config.items() if k.startswith("coverage.")}
            assert set(config) - set(coverage) == {
                "round",
                "plans-hash",
                "cases",
                "train-seconds",
                "site-seconds",
            }
            # per structure and state, counts of cases: whole numbers, no case ids
            assert len(coverage) == 3 * 19 and all(isinstance(v, int) for v in coverage.values())
            assert coverage["coverage.Liver.contoured"] == len(case_dirs)
            weights_bytes = sum(v.nbytes for v in glob.values())
            # Flower's envelope and the config record add ~8 KB (seen: 95,065 B for 87,168 B of
            # weights). The key and shape checks above are what exclude extra arrays; this bound only
            # catches a bulky payload hidden elsewhere in the message.
            assert doc["bytes"] < weights_bytes + 16384


def test_an_unregistered_site_key_is_rejected(fed: LocalFederation) -> None:
    proc = fed.start_site(9, key="intruder")
    try:
        log_file = fed.site_dir(9) / "flwr-home" / "supernode.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if re.search(
                r"(?i)failed to activate supernode|unauthenticated|not authorized|permission denied",
                log_file.read_text(),
            ):
                break
            time.sleep(1)
        text = log_file.read_text()
        assert re.search(
            r"(?i)failed to activate supernode|unauthenticated|not authorized|permission denied", text
        ), text[-2000:]
    finally:
        fed.stop_site(9)


def test_restarted_coordinator_resumes_from_the_last_round(fed: LocalFederation) -> None:
    fed.stop_coordinator()
    fed.start_coordinator(register=False)
    _run(fed, 2)
    assert "resuming after round 1" in _log(fed)
    assert [r["round"] for r in rounds_log(fed.state_dir)] == [1, 2]
    assert len(re.findall("pooled fingerprint", _log(fed))) == 1  # planned once
    assert (fed.state_dir / "models" / "round_002" / "fold_all" / "checkpoint_final.pth").is_file()


def test_a_nan_update_is_rejected_and_logged_and_the_round_completes(fed: LocalFederation) -> None:
    fed.stop_site(1)
    fed.spec.site_extra[1] = {"fault": "nan"}
    fed.start_site(1)
    try:
        _run(fed, 3)
    finally:
        fed.stop_site(1)
        fed.spec.site_extra.pop(1)
        fed.start_site(1)
    record = rounds_log(fed.state_dir)[-1]
    assert record["round"] == 3 and len(record["sites"]) == 1
    (reason,) = record["rejected"].values()
    assert "NaN/Inf" in reason
    assert re.search(r"update of site \d+ rejected: NaN/Inf", _log(fed))
    (site0,) = record["sites"]
    sent0 = load_arrays(_sent(fed, 0, "train")[-1].with_suffix(".npz"))
    glob = load_arrays(fed.state_dir / "rounds" / "round_003.npz")
    for key in glob:
        np.testing.assert_array_equal(glob[key], sent0[key].astype(glob[key].dtype))


def test_a_site_going_offline_mid_round_does_not_fail_the_round(fed: LocalFederation) -> None:
    started = time.time()
    marker = fed.site_dir(1) / "work" / "rounds" / "global.npz"

    def drop_site_when_training() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if marker.is_file() and marker.stat().st_mtime > started:
                fed.stop_site(1)
                return
            time.sleep(0.5)

    dropper = threading.Thread(target=drop_site_when_training)
    dropper.start()
    _run(fed, 4)
    dropper.join()
    assert 1 not in fed.nodes
    record = rounds_log(fed.state_dir)[-1]
    assert record["round"] == 4 and len(record["sites"]) == 1 and record["missing"]
    assert re.search(r"round 4: (site \d+ failed|no usable reply)", _log(fed))
    assert (fed.state_dir / "models" / "round_004" / "rtseg-model.json").is_file()
