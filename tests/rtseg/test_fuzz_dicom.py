"""Fuzzing with mutated CT instances: ``rtseg.ct.load_series`` in-process and the DICOM node's SCP.

Valid phantom slices are mutated by the seeded engine in ``fuzz_helpers`` (bit
flips in the header, truncation, wrong element lengths and VRs, deleted
required tags, a transfer syntax the data is not in, pixel data shorter or
longer than declared, odd BitsAllocated, SamplesPerPixel 3, several frames,
NaN/Inf and non-ASCII in DS/CS values). Only ``InputError`` may come out of
``load_series``; the node answers every C-STORE with a documented status and
keeps working. A failing case is reproducible from the seed and its index.
"""

from __future__ import annotations

import random
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fuzz_helpers import Instance, file_damage, load_instance, mutate, set_element
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.scp import TRANSFER_SYNTAXES
from dicom_node.spool import uid_key
from rtseg.ct import load_series
from rtseg.errors import InputError

SEED = 20261203
PATIENT_WORDS = ("PHANTOM^", "RTSEG-A_")  # the phantom's PatientName and PatientID
FAST_CASES, FAST_BUDGET_S = 1000, 120.0
SLOW_CASES, SLOW_BUDGET_S = 3000, 300.0  # CI time: 10,000 SCP cases took 764 s
# C-STORE statuses the conformance statement documents for what a peer can send
# (0110 is for a spool that cannot be written, never for bad input).
# A700 answers an instance whose header declares more pixel data than dicom.max_instance_mb.
DOCUMENTED = {
    0x0000: "success",
    0xA700: "out of resources",
    0xA900: "does not match SOP class",
    0xC000: "cannot understand",
}


@dataclass
class Outcome:
    """What a fuzz run saw: counts per outcome and the cases that broke the rules."""

    ran: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def report(self) -> str:
        return f"{self.ran} cases, {dict(self.seen)}; failures:\n" + "\n".join(self.failures[:20])


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    # pydicom warns about every odd value it meets; the fuzz meets thousands
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def bases(phantom_ct96: Path) -> list[Instance]:
    """Three consecutive valid slices, split into encoded elements."""
    files = sorted(
        phantom_ct96.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    middle = len(files) // 2
    return [load_instance(p) for p in files[middle : middle + 3]]


# -- load_series -----------------------------------------------------------------------------
def _write_case(rng: random.Random, bases: list[Instance], folder: Path) -> tuple[str, list[Path]]:
    """A 1- or 3-slice folder with at least one mutated slice; returns the label and the files."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    chosen = bases if rng.random() < 0.5 else [rng.choice(bases)]
    target = rng.randrange(len(chosen))
    labels, paths = [], []
    for k, base in enumerate(chosen):
        label, case = mutate(rng, base) if k == target or rng.random() < 0.2 else ("valid", base)
        data = case.file_bytes()
        if rng.random() < 0.1:
            damage, data = file_damage(rng, data)
            label += "+" + damage
        paths.append(folder / f"IM{k:04d}.dcm")
        paths[-1].write_bytes(data)
        labels.append(label)
    return " | ".join(labels), paths


def fuzz_load_series(bases: list[Instance], work: Path, seed: int, cases: int, budget_s: float) -> Outcome:
    rng, outcome, deadline = random.Random(seed), Outcome(), time.monotonic() + budget_s
    for index in range(cases):
        if time.monotonic() > deadline:
            break
        label, paths = _write_case(rng, bases, work / "case")
        source: Path | list[Path] = paths if rng.random() < 0.3 else work / "case"
        try:
            with _quiet_pydicom():
                load_series(source, min_slices=1)
            outcome.seen["loaded"] += 1
        except InputError as exc:
            outcome.seen["InputError"] += 1
            if not exc.message or exc.source is None:
                outcome.failures.append(f"case {index} [{label}]: InputError without message or source")
            if any(word in str(exc) for word in PATIENT_WORDS):  # the message reaches logs and users
                outcome.failures.append(f"case {index} [{label}]: patient data in {exc}")
        except Exception as exc:  # noqa: BLE001 - the fuzz reports every other type as a bug
            outcome.failures.append(f"case {index} [{label}]: {type(exc).__name__}: {exc!s:.200}")
        outcome.ran += 1
    return outcome


def _check_load_series(outcome: Outcome, minimum: int) -> None:
    assert not outcome.failures, outcome.report()
    assert outcome.ran >= minimum, outcome.report()
    # the mutations are neither all harmless nor all fatal: both outcomes occur
    assert outcome.seen["loaded"] > 0 and outcome.seen["InputError"] > 0, outcome.report()


def test_load_series_fuzz_raises_only_input_error(bases: list[Instance], tmp_path: Path) -> None:
    outcome = fuzz_load_series(bases, tmp_path, SEED, FAST_CASES, FAST_BUDGET_S)
    _check_load_series(outcome, FAST_CASES)


@pytest.mark.slow
def test_load_series_fuzz_long(bases: list[Instance], tmp_path: Path) -> None:
    outcome = fuzz_load_series(bases, tmp_path, SEED + 1, SLOW_CASES, SLOW_BUDGET_S)
    _check_load_series(outcome, FAST_CASES)


# -- the SCP of a running node ---------------------------------------------------------------
def _associate(port: int) -> Any:
    ae = AE(ae_title="FUZZER")
    for syntax in TRANSFER_SYNTAXES:  # one context per syntax, so that every one is accepted
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTSEG")
    assert assoc.is_established
    return assoc


def _send(assoc: Any, case: Instance, path: Path) -> int | None:
    """C-STORE the case's dataset bytes exactly as mutated; None when no response came."""
    status = assoc.send_c_store(case.write(path))
    return int(status.Status) if "Status" in status else None


def fuzz_scp(
    port: int, bases: list[Instance], work: Path, seed: int, cases: int, budget_s: float, batch: int = 250
) -> Outcome:
    rng, outcome, deadline = random.Random(seed), Outcome(), time.monotonic() + budget_s
    path, assoc = work / "case.dcm", None
    try:
        while outcome.ran < cases and time.monotonic() < deadline:
            if assoc is None or not assoc.is_established or outcome.ran % batch == 0:
                if assoc is not None and assoc.is_established:
                    assoc.release()
                assoc = _associate(port)
            label, case = mutate(rng, rng.choice(bases))
            if case.transfer_syntax not in TRANSFER_SYNTAXES:  # no such context: the SCU cannot send it
                case = replace(case, transfer_syntax=rng.choice(TRANSFER_SYNTAXES))
                label += f"+sent as {case.transfer_syntax}"
            status = _send(assoc, case, path)
            outcome.seen[f"{status:#06x}" if status is not None else "no response"] += 1
            if status not in DOCUMENTED:
                outcome.failures.append(f"case {outcome.ran} [{label}]: status {status}")
            outcome.ran += 1
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()
    return outcome


def _valid_new_instance(bases: list[Instance], tmp_path: Path) -> tuple[Path, str, str]:
    ds = pydicom.dcmread(bases[0].write(tmp_path / "base.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "valid.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _check_node_after_fuzz(node: Any, bases: list[Instance], tmp_path: Path) -> None:
    from node_helpers import no_patient_data

    assert node.proc.poll() is None, "the node died during the fuzz"
    path, series, sop = _valid_new_instance(bases, tmp_path)
    assoc = _associate(node.port)
    try:
        assert int(assoc.send_c_store(path).Status) == 0x0000
    finally:
        assoc.release()
    assert (node.data_dir / "spool" / "ct" / uid_key(series) / f"{uid_key(sop)}.dcm").is_file()
    log = node.log()
    assert "Exception in handler" not in log and "Traceback" not in log, log[-3000:]
    assert not no_patient_data(log), "patient data in the node's log"


def _fuzz_node(
    running_node: Any, bases: list[Instance], tmp_path: Path, monkeypatch: Any, **run: Any
) -> Outcome:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes, no re-encoding
    # nothing completes during the test: the spool keeps what was stored and the worker stays idle
    node = running_node(node={"quiet_time_s": 3600.0})
    outcome = fuzz_scp(node.port, bases, tmp_path, **run)
    assert not outcome.failures, outcome.report()
    assert outcome.ran >= FAST_CASES, outcome.report()
    assert outcome.seen["0x0000"] > 0 and outcome.seen["0xc000"] > 0, outcome.report()
    _check_node_after_fuzz(node, bases, tmp_path)
    return outcome


def test_scp_fuzz_answers_documented_statuses_and_keeps_running(
    running_node: Any, bases: list[Instance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fuzz_node(
        running_node, bases, tmp_path, monkeypatch, seed=SEED, cases=FAST_CASES, budget_s=FAST_BUDGET_S
    )


@pytest.mark.slow
def test_scp_fuzz_long(
    running_node: Any, bases: list[Instance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fuzz_node(
        running_node, bases, tmp_path, monkeypatch, seed=SEED + 1, cases=SLOW_CASES, budget_s=SLOW_BUDGET_S
    )


# -- regressions found by the SCP fuzz --------------------------------------------------------
def _store_one(port: int, case: Instance, path: Path) -> int | None:
    assoc = _associate(port)
    try:
        return _send(assoc, case, path)
    finally:
        assoc.release()


def test_scp_raw_data_under_the_deflate_syntax_is_cannot_understand(
    running_node: Any, bases: list[Instance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # was 0xC211 from pynetdicom: zlib.error escaped the handler
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = running_node()
    case = replace(bases[0], transfer_syntax=DeflatedExplicitVRLittleEndian)  # not deflated at all
    assert _store_one(node.port, case, tmp_path / "deflate.dcm") == 0xC000
    assert "refused: unreadable or truncated DICOM file" in node.log()  # the size check reads it first
    assert "Exception in handler" not in node.log()


def test_scp_unknown_vr_in_a_header_element_is_cannot_understand(
    running_node: Any, bases: list[Instance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # was 0xC211 from pynetdicom: NotImplementedError ("Unknown Value Representation") escaped
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = running_node()
    case = set_element(bases[0], 0x00180015, b"CC", b"ABDOMEN ")  # BodyPartExamined, VR 'CC'
    assert _store_one(node.port, case, tmp_path / "vr.dcm") == 0xC000
    assert "unreadable dataset (NotImplementedError)" in node.log()
    assert "Exception in handler" not in node.log()


def test_scp_never_logs_a_patient_name_pydicom_found_in_a_malformed_value(
    running_node: Any, bases: list[Instance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydicom warns "Invalid value for VR UI: '<the value>'" through its logger; a wrong length
    # can make that value swallow the patient's name. The node's log carried it.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = running_node()
    case = set_element(bases[0], 0x0020000E, b"UI", b"1.2.3\\PHANTOM^LEAKED ")  # SeriesInstanceUID
    assert _store_one(node.port, case, tmp_path / "leak.dcm") == 0xC000
    assert "Invalid value for VR UI" in node.log()  # pydicom's warning is kept ...
    assert "PHANTOM^LEAKED" not in node.log()  # ... without the value
