"""What a failure at a site tells the coordinator: its kind, never the site's files.

Flower's own error reply carries ``str(exception)``; for a case that cannot be read
that is the path of the case folder, which a department may name after the
patient. The coordinator is another institution: the reason stays in the site's
log, the link carries the kind of error (and rtseg's sentence for errors about
what the coordinator sent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtseg.errors import FederationError, InputError, ModelError
from rtseg.federation import client_app
from rtseg.federation.flower import Payload, SiteContext
from rtseg.federation.simulate import TINY, LocalFederation, SimulationSpec
from rtseg.federation.task import (
    DATASET_ID,
    DATASET_NAME,
    MAX_REASON_CHARS,
    check_coordinator_plans,
    site_error_reason,
)
from rtseg.model.dataset import dataset_folder_name

PATIENT_FOLDER = "Doe^Jane_MRN4711"  # a case folder named as departments often name them
KIND_ONLY = "{} at the site: the reason stays in the site's log"


def unreadable_case(cases: Path) -> Path:
    """A case folder named after its patient whose CT folder holds no DICOM file."""
    case = cases / PATIENT_FOLDER
    (case / "ct").mkdir(parents=True)
    (case / "labels.nii.gz").write_bytes(b"not a NIfTI file")
    (case / "case.json").write_text(json.dumps({"case_id": PATIENT_FOLDER}))
    return case


def test_a_site_data_error_leaves_the_site_as_its_kind_only(tmp_path: Path) -> None:
    unreadable_case(tmp_path / "cases")
    config = {"site-id": "a", "data-dir": str(tmp_path / "cases"), "work-dir": str(tmp_path / "w")}
    site = SiteContext(config, {}, 1)
    with pytest.raises(InputError) as caught:
        client_app.fingerprint(Payload(config={"spacing": [4.0, 3.0, 3.0]}), site)
    assert PATIENT_FOLDER in str(caught.value)  # what Flower would have sent
    reason = site_error_reason(caught.value)
    assert reason == KIND_ONLY.format("InputError")
    assert "MRN4711" not in reason and str(tmp_path) not in reason


def test_other_errors_leave_as_their_class_name_only(tmp_path: Path) -> None:
    target = tmp_path / PATIENT_FOLDER / "labels.nii.gz"
    with pytest.raises(OSError) as caught:
        target.read_bytes()
    assert site_error_reason(caught.value) == KIND_ONLY.format("FileNotFoundError")


def test_a_model_error_about_the_sites_own_files_leaves_as_its_kind_only(tmp_path: Path) -> None:
    from rtseg.model.rounds import _labels_of

    dataset_json = tmp_path / PATIENT_FOLDER / "dataset.json"
    dataset_json.parent.mkdir()
    dataset_json.write_text('{"labels": ')
    with pytest.raises(ModelError) as caught:
        _labels_of(dataset_json)
    assert site_error_reason(caught.value) == KIND_ONLY.format("ModelError")


def test_errors_about_what_the_coordinator_sent_keep_rtsegs_sentence_without_file_or_uid() -> None:
    with pytest.raises(ModelError) as caught:
        check_coordinator_plans({"dataset_name": dataset_folder_name(DATASET_ID, DATASET_NAME)})
    assert caught.value.source  # names where the plans came from; the sentence is what travels
    assert site_error_reason(caught.value) == "ModelError: plans have no 'configurations' object"
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    err = FederationError(f"plans hash mismatch for {uid}", source="/srv/site/work/plans.json")
    assert site_error_reason(err) == "FederationError: plans hash mismatch for <uid>"
    long = site_error_reason(FederationError("x" * 5000))
    assert len(long) == len("FederationError: ") + MAX_REASON_CHARS and long.endswith("…")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_coordinator_learns_that_a_site_failed_but_not_its_case_names(tmp_path: Path) -> None:
    """Real SuperLink and SuperNode over TLS; the site's only case cannot be read."""
    spec = SimulationSpec(sites=1, rounds=1, cases_per_site=1, cpu=TINY, min_sites=1, round_timeout=300.0)
    with LocalFederation(tmp_path, spec) as fed:
        unreadable_case(fed.site_dir(0) / "cases")
        fed.start_coordinator()
        fed.start_site(0)
        _, status = fed.run(timeout=400)
    log = (fed.state_dir / "coordinator.log").read_text()
    assert status.startswith("finished:") and status != "finished:completed", log[-2000:]
    assert KIND_ONLY.format("InputError") in log
    assert "federation rtseg-sim stopped: 0 fingerprints, fewer than min-sites 1" in log  # why it ended
    everything = log + "".join(p.read_text(errors="replace") for p in fed.state_dir.rglob("*") if p.is_file())
    assert "MRN4711" not in everything and str(fed.site_dir(0)) not in everything
    # the site's record of what it sent holds the error reply, as it crossed the link
    (sent,) = (fed.site_dir(0) / "sent").glob("*-query.fingerprint.json")
    assert json.loads(sent.read_text())["error"]["reason"] == KIND_ONLY.format("InputError")
    # the site's own log keeps the whole reason for the department's physicist
    site_log = (fed.site_dir(0) / "work" / "site.log").read_text()
    assert f"{PATIENT_FOLDER}/ct: no DICOM files found in this folder" in site_log
