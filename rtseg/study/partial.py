"""Incomplete contour sets on phantoms: fully labelled vs. missing-as-background vs. nnU-Net's ignore label.

``python -m rtseg.study.partial --work DIR`` generates a training cohort, copies it
with a share of cases keeping only some OARs (the others nobody contoured: the
External covers them, as in a clinical BODY contour, and ``case.json`` marks them
"unknown"), trains three small nnU-Net models with the same budget and scores
each on held-out fully labelled cases of another seed:

* ``full``: the fully labelled cohort;
* ``naive``: the partial cohort, missing structures taken as they are (background/External);
* ``ignore``: the partial cohort with nnU-Net's ignore label where an unknown structure could be;
* ``pseudo``: the partial cohort with its unknown structures filled by the ``ignore`` model
  (the best model a site would have from these cases), then trained as fully labelled.

``--from-model DIR`` fine-tunes every arm from a trained model instead (a federation
continues from the shipped default model): the model's plans and normalisation
preprocess the cases, every arm starts from its weights, and ``pseudo`` is filled by
that model.

Repeatable (seeded) and resumable (a trained arm is not trained again); not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rtseg.cases import (
    CONTOURED,
    LABELS_FILE,
    RECORD_FILE,
    UNKNOWN,
    case_dirs,
    iter_cases,
    unknown_structures,
)
from rtseg.errors import RtsegError
from rtseg.model.children import nnunet_dirs
from rtseg.model.cpu import CpuConfig
from rtseg.model.dataset import write_raw_dataset
from rtseg.model.manifest import MANIFEST_NAME, ModelManifest, default_provenance, load_manifest
from rtseg.model.training import export_model, plan_and_preprocess, train
from rtseg.phantom.cohort import generate_cohort, read_label_image, write_label_image
from rtseg.structures import EXTERNAL, OAR_NAMES, STRUCTURES, dataset_labels

log = logging.getLogger(__name__)

ARMS = ("full", "naive", "ignore")
PSEUDO = "pseudo"
DATASET_ID = 702


@dataclass(frozen=True)
class PartialSpec:
    """Everything that determines a run."""

    train_cases: int = 12
    test_cases: int = 4
    matrix: int = 64
    partial_share: float = 0.5  # of the training cases
    kept_oars: int = 6  # of the 18 OARs, per partial case
    train_seed: int = 2000
    test_seed: int = 3000
    from_model: Path | None = None  # fine-tune every arm from this model folder's weights and plans
    cpu: CpuConfig = CpuConfig(
        target_spacing_zyx=(6.0, 6.0, 6.0),
        patch_size_zyx=(32, 48, 48),
        batch_size=2,
        base_features=8,
        n_stages=3,
        max_features=32,
        epochs=14,
        iterations_per_epoch=25,
        val_iterations_per_epoch=1,
        learning_rate=2e-3,
        optimizer="adamw",
        rotation_deg=10.0,
        da_workers=0,
        preprocess_workers=1,
        seed=0,
        threads=1,
    )


def make_partial(full: Path, out: Path, spec: PartialSpec) -> list[str]:
    """Copy ``full`` to ``out``; every other case keeps External and ``kept_oars`` random OARs.

    Returns the ids of the partial cases. Their dropped organs become External (a
    BODY contour covers them) and ``case.json`` records them as unknown.
    """
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(full, out)
    rng = np.random.default_rng(spec.train_seed)
    dirs = case_dirs(out)
    n_partial = round(spec.partial_share * len(dirs))
    partial = sorted(rng.choice(len(dirs), size=n_partial, replace=False).tolist())
    label_of = {s.name: s.label for s in STRUCTURES}
    for index in partial:
        kept = set(rng.choice(OAR_NAMES, size=spec.kept_oars, replace=False).tolist())
        drop_structures(dirs[index], kept, label_of)
    return [dirs[i].name for i in partial]


def drop_structures(case_dir: Path, kept: set[str], label_of: dict[str, int]) -> None:
    """As if a person had contoured only External and ``kept``: the rest become External, "unknown"."""
    labels, affine = read_label_image(case_dir / LABELS_FILE)
    for name in OAR_NAMES:
        if name not in kept:
            labels[labels == label_of[name]] = label_of[EXTERNAL]
    write_label_image(labels, affine, case_dir / LABELS_FILE)
    record_path = case_dir / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    states = {s.name: CONTOURED if s.name in kept | {EXTERNAL} else UNKNOWN for s in STRUCTURES}
    record["structures"] = states
    record_path.write_text(json.dumps(record, indent=1) + "\n")


def fill_cohort(partial: Path, out: Path, model: Path) -> None:
    """Copy ``partial`` to ``out`` and fill every case's unknown structures with ``model``."""
    from rtseg.model.segmenter import NnunetSegmenter
    from rtseg.pseudo_labels import fill_unknown

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(partial, out)
    segmenter = NnunetSegmenter(model, device="cpu", threads=1)
    for case_dir in case_dirs(out):
        filled = fill_unknown(case_dir, segmenter)
        log.info("case %s: %d structure(s) filled", case_dir.name, len(filled))


def train_partial_arm(arm: str, cohort: Path, work: Path, spec: PartialSpec) -> Path:
    """One arm's model under ``work/<arm>/model`` (kept: an arm trained before is not trained again)."""
    model = work / arm / "model"
    if (model / MANIFEST_NAME).is_file():
        return model
    nnunet = work / arm / "nnunet"
    if nnunet.exists():
        shutil.rmtree(nnunet)
    from rtseg.model.default import canonical_cases

    unknown = unknown_structures([cohort]) if arm == "ignore" else {}
    cases = canonical_cases(cohort, spec.cpu.target_spacing_zyx)
    name = "Partial-" + arm
    write_raw_dataset(nnunet_dirs(nnunet).raw, DATASET_ID, name, cases, dataset_labels(), unknown=unknown)
    start = None
    if spec.from_model is None:
        plan_and_preprocess(nnunet, DATASET_ID, replace(spec.cpu, da_workers=1))
    else:
        start = _preprocess_like(spec.from_model, nnunet, name, spec.cpu)
    results = train(nnunet, DATASET_ID, spec.cpu, start_from=start)
    manifest = ModelManifest(
        name=f"rtseg-partial-{arm}",
        version="0.0.0",
        structures=STRUCTURES,
        provenance=default_provenance(
            training_data={"kind": "rtseg phantom", "arm": arm},
            seeds={"training": spec.cpu.seed, "cohort": spec.train_seed},
            command="python -m rtseg.study.partial",
        ),
    )
    out = export_model(results, model, manifest)
    shutil.rmtree(nnunet)
    return out


def _preprocess_like(model: Path, nnunet: Path, name: str, cpu: CpuConfig) -> Path:
    """Preprocess with ``model``'s plans and fingerprint (renamed to this dataset); its checkpoint."""
    from rtseg.model.rounds import preprocess_like_model

    load_manifest(model)  # a model folder is code until proven otherwise: its plans are checked
    preprocess_like_model(nnunet, DATASET_ID, name, model, replace(cpu, da_workers=1))
    return model / "fold_all" / "checkpoint_final.pth"


def score_arm(model: Path, test_dir: Path) -> dict[str, float]:
    """Mean Dice per OAR over the test cases (structures absent from a reference are skipped)."""
    from rtseg.evaluation import evaluate, summarize
    from rtseg.model.segmenter import NnunetSegmenter

    segmenter = NnunetSegmenter(model, device="cpu", threads=1)
    summary = summarize(evaluate(segmenter, iter_cases(test_dir), surfaces=False))
    out = {}
    for name in OAR_NAMES:
        value = summary.per_structure.get(name, {}).get("dice")
        out[name] = float(value) if value is not None else float("nan")
    return out


def table(scores: dict[str, dict[str, float]]) -> str:
    """Markdown table: OAR rows, arm columns, the mean last."""
    arms = list(scores)
    lines = ["| OAR | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for name in OAR_NAMES:
        lines.append(f"| {name} | " + " | ".join(f"{scores[a][name]:.3f}" for a in arms) + " |")
    means = [float(np.nanmean(list(scores[a].values()))) for a in arms]
    lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    return "\n".join(lines)


def run(work: Path, spec: PartialSpec) -> dict[str, dict[str, float]]:
    """Cohorts, three arms (two at a time, one thread each), scores; ``scores.json``, ``table.md``."""
    full, partial, test = work / "cohort-full", work / "cohort-partial", work / "test"
    if not full.is_dir():
        generate_cohort("A", spec.train_cases, spec.train_seed, full, matrix=spec.matrix)
    if not test.is_dir():
        generate_cohort("A", spec.test_cases, spec.test_seed, test, matrix=spec.matrix)
    if not partial.is_dir():
        make_partial(full, partial, spec)
    cohorts = {"full": full, "naive": partial, "ignore": partial}
    with ThreadPoolExecutor(max_workers=2) as pool:
        trained = pool.map(lambda a: train_partial_arm(a, cohorts[a], work, spec), ARMS)
        models = dict(zip(ARMS, trained, strict=True))
    filled = work / "cohort-filled"
    if not (work / PSEUDO / "model" / MANIFEST_NAME).is_file():
        fill_cohort(partial, filled, spec.from_model or models["ignore"])
    models[PSEUDO] = train_partial_arm(PSEUDO, filled, work, spec)
    scores = {arm: score_arm(model, test) for arm, model in models.items()}
    (work / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    (work / "table.md").write_text(table(scores) + "\n")
    return scores


def from_model_spec(spec: PartialSpec, model: Path) -> PartialSpec:
    """``spec`` fine-tuning from ``model`` (the default model's CPU configuration and spacing).

    Cases at matrix 128 (about 2 mm in-plane, finer than the model's 3 mm); 4 epochs of 25
    iterations at lr 5e-4 from the model's weights, one thread per arm.
    """
    from rtseg.model.default import STAGE1

    cpu = replace(STAGE1, epochs=4, iterations_per_epoch=25, val_iterations_per_epoch=1, learning_rate=5e-4)
    return replace(spec, matrix=128, from_model=model, cpu=replace(cpu, da_workers=0, threads=1, seed=0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rtseg.study.partial", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--work", type=Path, required=True, help="work folder (resumable)")
    parser.add_argument("--train-cases", type=int, default=PartialSpec.train_cases)
    parser.add_argument("--epochs", type=int, help="epochs per arm (14; 4 with --from-model)")
    parser.add_argument("--from-model", type=Path, help="fine-tune every arm from this model folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = PartialSpec(train_cases=args.train_cases)
    if args.from_model is not None:
        try:
            load_manifest(args.from_model)  # before the cohort: a folder that is no model is refused first
        except RtsegError as exc:
            print(f"error: {args.from_model}: {exc}", file=sys.stderr)
            return 2
        spec = from_model_spec(spec, args.from_model)
    if args.epochs:
        spec = replace(spec, cpu=replace(spec.cpu, epochs=args.epochs))
    print(table(run(args.work, spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
