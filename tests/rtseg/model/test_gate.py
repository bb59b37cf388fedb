"""Site acceptance gate with real models: a worse candidate is refused, an equal one promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from case_helpers import small_case

from rtseg.model.default import default_model_dir
from rtseg.model.manifest import load_manifest, model_hash, save_manifest
from rtseg.model.registry import Registry
from rtseg.phantom.cohort import case_id, write_case
from rtseg_app.cli import main


def candidate(out: Path, round_: int, bias_shift: dict[int, float] | None = None) -> Path:
    """The default model as "round ``round_``" of federation fed-test, its weights changed with numpy.

    All weights get a negligible nudge (a new hash, the same predictions);
    ``bias_shift`` adds to the output bias of labels (-1000: never predicted; fp16 logits overflow near -1e4).
    """
    import torch

    shutil.copytree(default_model_dir(), out)
    path = out / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    rng = np.random.default_rng(round_)
    for key, tensor in checkpoint["network_weights"].items():
        array = tensor.detach().cpu().numpy().copy()
        if key.startswith("decoder.seg_layers.") and key.endswith(".bias"):
            for label, shift in (bias_shift or {}).items():
                array[label] += shift
        elif array.dtype == np.float32 and array.size > 1:
            array += rng.normal(0.0, 1e-6, array.shape).astype(np.float32) * float(array.std() or 1.0)
        checkpoint["network_weights"][key] = torch.from_numpy(array)
    torch.save(checkpoint, path)
    manifest = load_manifest(out)
    provenance = {**manifest.provenance, "federation": "fed-test", "federation_round": round_}
    save_manifest(out, type(manifest)(**{**manifest.__dict__, "provenance": provenance}))
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    write_case("A", 21, 0, root / "full", matrix=96)
    small_case(root / "full" / case_id("A", 21, 0), root / "heldout" / "case-1", 24)
    return {"data_dir": root / "node", "heldout": root / "heldout", "root": root}


def labels_by_name() -> dict[str, int]:
    return {s.name: s.label for s in load_manifest(default_model_dir()).structures}


def _gate(site: dict[str, Path], model: Path, *extra: str) -> list[str]:
    argv = ["model", "gate", "--candidate", str(model), "--data", str(site["heldout"])]
    return [*argv, "--data-dir", str(site["data_dir"]), "--threads", "1", *extra]


def test_worse_candidate_is_refused_with_the_structures_that_dropped(
    site: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    labels = [s.label for s in load_manifest(default_model_dir()).structures]
    worse = candidate(site["root"] / "worse", 2, dict.fromkeys(labels, -1000.0))  # predicts background only
    assert main(_gate(site, worse, "--promote")) == 1
    out = capsys.readouterr().out
    version = f"fed-test/r2/{model_hash(worse)}"
    registry = Registry(site["data_dir"])
    in_use = registry.current().version
    assert f"gate: REFUSED candidate {version} against {in_use} (margin 0.02)" in out
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split() and line.split()[0] in labels_by_name()
    }
    assert len(rows) == len(labels)
    # every organ the model in use found (Dice > margin) is lost, and only those are marked; the
    # External is the body outline from the image (rtseg.body), so a network that predicts
    # background only still gets it and it does not drop
    had = {name for name, line in rows.items() if float(line.split()[1]) > 0.02} - {"External"}
    assert "Liver" in had
    assert {name for name, line in rows.items() if "DROP > 0.02" in line} == had
    assert all(float(rows[name].split()[2]) == 0.0 for name in had)
    assert float(rows["External"].split()[2]) > 0.95
    assert f"Liver: Dice {float(rows['Liver'].split()[1]):.3f} → 0.000 (drop > 0.02)" in out
    # nothing changed for the node, and the decision is on record
    assert registry.generation() == 1 and in_use.startswith("local/r0/")
    assert version not in {v.version for v in registry.list()}
    (record,) = [
        json.loads(line) for line in (site["data_dir"] / "models" / "gate.jsonl").read_text().splitlines()
    ]
    assert record["accepted"] is False and record["promoted"] is False
    assert (record["candidate"], record["incumbent"], record["n_cases"]) == (version, in_use, 1)
    assert set(record["dropped"]) == had
    assert {r["name"] for r in record["rows"] if r["dropped"]} == set(record["dropped"])


def test_equal_candidate_is_promoted(site: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    same = candidate(site["root"] / "same", 3)
    assert main(_gate(site, same, "--promote")) == 0
    out = capsys.readouterr().out
    version = f"fed-test/r3/{model_hash(same)}"
    assert "gate: ACCEPTED" in out and f"promoted: the node now runs {version}" in out
    assert "DROP" not in out
    registry = Registry(site["data_dir"])
    assert registry.current().version == version
    assert registry.generation() == 2
    assert model_hash(registry.current_dir()) == model_hash(same)
    last = json.loads((site["data_dir"] / "models" / "gate.jsonl").read_text().splitlines()[-1])
    assert last["accepted"] is True and last["promoted"] is True and last["dropped"] == []
    assert registry.history()[-1]["reason"].startswith("gate: passed on 1 case(s)")
