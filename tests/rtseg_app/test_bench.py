"""``rtseg bench --quick`` through the real command line: every section, sane figures, both reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.dcmtk import dcmtk_tool

SECTIONS = ("machine", "inference", "receive", "rtstruct", "turnaround", "turnaround_full_ct", "federation")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if dcmtk_tool("storescp") is None or dcmtk_tool("storescu") is None:
        pytest.skip("dcmtk (storescp, storescu) is not installed")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "bench.md").is_file() and "# rtseg bench (quick)" in (out / "bench.md").read_text()
    return dict(json.loads((out / "bench.json").read_text()))


@pytest.mark.slow
def test_every_section_ran(report: dict) -> None:
    for name in SECTIONS:
        assert isinstance(report[name], dict) and "error" not in report[name], name
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["versions"]["torch"] and machine["versions"]["nnunetv2"]


@pytest.mark.slow
def test_inference_figures_are_sane(report: dict) -> None:
    inference = report["inference"]
    names = [r["variant"] for r in inference["runs"]]
    assert names == [
        "stock nnU-Net (defaults)",
        "rtseg",
        "rtseg, speck removal off (min_island_ml 0)",
        "rtseg, engine onnxruntime",
        "rtseg, engine openvino (f32)",
    ]
    for run in inference["runs"]:
        if "skipped" not in run:  # an engine whose extra is not installed
            assert run["predict_s"] > 0 and run["load_s"] > 0 and run["peak_rss_mb"] > 100
    ours = inference["runs"][1]["dice"]
    for engine in inference["runs"][3:]:  # [node] engine: the same labels as torch, so the same Dice
        for name, score in engine.get("dice", {}).items():
            assert (score is None) == (ours[name] is None), name
            assert score is None or abs(score - ours[name]) <= 0.01, (engine["variant"], name)
    assert inference["speedup"] > 0
    dice = [v for v in inference["dice_vs_stock"].values() if v is not None]
    assert dice and all(0.0 <= v <= 1.0 for v in dice)
    assert 0.0 <= inference["min_dice_unfiltered"] <= 1.0


@pytest.mark.slow
def test_node_core_and_federation_figures_are_sane(report: dict) -> None:
    receive = report["receive"]
    assert receive["rtseg_s"] > 0 and receive["dcmtk_s"] > 0 and receive["ratio_vs_dcmtk"] > 0
    assert report["rtstruct"]["seconds"] > 0 and report["rtstruct"]["structures"] >= 1
    turnaround = report["turnaround"]
    assert len(turnaround["times_s"]) == turnaround["series"] >= 1
    assert 0 < turnaround["p50_s"] <= turnaround["p95_s"]
    full = report["turnaround_full_ct"]
    assert len(full["runs_s"]) == 3 and full["seconds"] == sorted(full["runs_s"])[1] > 0  # the median
    federation = report["federation"]
    assert federation["round_s"] > 0 and 0 <= federation["training_s"] <= federation["round_s"]
    assert federation["sites"] == 2 and all(b > 0 for b in federation["bytes_per_site"].values())
    assert set(report["targets"]) >= {"inference_speedup", "receive", "rtstruct", "turnaround"}


def test_bad_arguments_are_refused_with_a_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "bench", "--out", "x", "--slices", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "must be at least 8" in proc.stderr


def test_an_unknown_section_is_refused_with_the_choices() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "bench", "--out", "x", "--section", "nonsense"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "argument --section: invalid choice: 'nonsense'" in proc.stderr and "'http'" in proc.stderr


def test_the_http_section_alone_measures_uploads_during_a_segmentation(tmp_path: Path) -> None:
    """``--section http`` (once ``python -m service.bench``) runs that section and no other."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "bench", "--quick", "--section", "http", "--uploads", "2"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== http" in proc.stdout and "== inference" not in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    http = report["http"]
    assert http["accepted_202"] == http["stored_intact"] == 2 and http["segmentation_final"] == "done"
    assert not set(report) & {"inference", "receive", "rtstruct", "turnaround", "federation"}
    assert "## HTTP uploads during a segmentation" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_the_scaling_section_takes_slice_counts_and_the_chunk_size(tmp_path: Path) -> None:
    if dcmtk_tool("storescp") is None or dcmtk_tool("storescu") is None:
        pytest.skip("dcmtk (storescp, storescu) is not installed")
    args = ["--quick", "--section", "scaling", "--scaling-slices", "40", "--chunk-slices", "16"]
    proc = subprocess.run(
        [sys.executable, "-m", "rtseg_app", "bench", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scaling = json.loads((tmp_path / "bench.json").read_text())["scaling"]
    assert [f["slices"] for f in scaling["by_slices"]] == [40] and scaling["chunk_slices"] == 16
    assert all(f["peak_rss_mb"] > 0 for f in scaling["by_slices"])
    worker = scaling["by_slices"][0]
    assert 0 < worker["largest_process_peak_mb"] <= worker["process_peaks_sum_mb"]
    assert "series over 16 slices in z-chunks" in (tmp_path / "bench.md").read_text()
    node_log = (tmp_path / "work" / "scaling" / "node-data" / "logs" / "rtseg.log").read_text()
    assert re.search(r"series preprocessed in \d+ z-chunks", node_log)


def test_a_process_peak_is_exact_and_resets_between_rows() -> None:
    """The scaling rows read each node process's VmHWM after resetting it: a peak a sampler would miss
    counts, and an earlier row's peak does not."""
    import os

    import numpy as np

    from rtseg_app.bench.node import process_peaks_mb, reset_peaks

    pid = os.getpid()
    assert reset_peaks([pid]), "this kernel refused clear_refs"
    base = process_peaks_mb([pid])[pid]
    block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB touched, then freed before anyone samples
    del block
    high = process_peaks_mb([pid])[pid]
    assert high - base > 250
    reset_peaks([pid])
    assert high - process_peaks_mb([pid])[pid] > 250
