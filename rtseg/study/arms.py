"""Training the study's arms: local and centralised with nnU-Net, federated through real Flower processes.

Each arm ends as a model folder ``<work>/arms/<arm>/model`` with ``rtseg-model.json``;
an arm whose model folder is complete is not trained again (resume). The
ensemble is not trained: it is the two local models together at inference.
With a start model (``StudySpec.start_model``) every arm, the federation's round 0
included, starts from its weights and preprocesses with its plans.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from rtseg.cases import unknown_structures
from rtseg.errors import FederationError
from rtseg.model.children import EpochProgress, nnunet_dirs
from rtseg.model.cpu import CpuConfig
from rtseg.model.dataset import Case, write_raw_dataset
from rtseg.model.default import PACKAGE_MODELS
from rtseg.model.manifest import MANIFEST_NAME, ModelManifest, default_provenance, load_manifest
from rtseg.model.rounds import preprocess_like_model
from rtseg.model.training import export_model, plan_and_preprocess, train
from rtseg.structures import STRUCTURES, dataset_labels
from rtseg.study.design import CENTERS, CENTRALISED, DEFAULT_START, FEDERATED, LOCAL_ARMS, StudySpec

log = logging.getLogger(__name__)

STUDY_START_DIR = PACKAGE_MODELS / "study-start"  # the model DEFAULT_START names

DATASET_ID = 701
MODEL_NAME = "rtseg-study"
RUN_ATTEMPTS = 3  # federated runs started before giving up
Advance = Callable[[], None]


def model_dir(work: Path, arm: str) -> Path:
    return work / "arms" / arm / "model"


def is_trained(work: Path, arm: str) -> bool:
    return (model_dir(work, arm) / MANIFEST_NAME).is_file()


def epochs_file(work: Path, arm: str) -> Path:
    """One JSON line per finished epoch (losses, pseudo Dice) of a local or centralised arm."""
    return work / "arms" / arm / "epochs.jsonl"


def start_model(spec: StudySpec) -> Path | None:
    """The model folder every arm starts from; None: random weights."""
    if spec.start_model is None:
        return None
    if spec.start_model != DEFAULT_START:
        raise ValueError(f"unknown start model {spec.start_model!r}")  # specs are made in design.py only
    return STUDY_START_DIR


def train_pooled_arms(
    spec: StudySpec, train_dirs: dict[str, Path], work: Path, advance: Advance | None = None
) -> None:
    """The local arms and centralised, two at a time (each training process uses one thread)."""
    sources = {**{LOCAL_ARMS[c]: [train_dirs[c]] for c in CENTERS}, CENTRALISED: list(train_dirs.values())}
    todo = {arm: dirs for arm, dirs in sources.items() if not is_trained(work, arm)}
    for arm in sources:
        if arm not in todo and advance:
            for _ in range(spec.epochs):
                advance()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(train_arm, arm, dirs, work, spec.local_config(), advance, start_model(spec))
            for arm, dirs in todo.items()
        ]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()  # arms not started yet; a running one finishes its current step
            raise


def train_arm(
    arm: str,
    cohort_dirs: list[Path],
    work: Path,
    config: CpuConfig,
    advance: Advance | None = None,
    start: Path | None = None,
) -> Path:
    """Plan, preprocess and train one nnU-Net model on the cases of ``cohort_dirs``; export it.

    ``start``: a model folder whose plans preprocess the cases and whose weights training
    starts from (fresh optimizer and schedule); None: plans from these cases, random weights.
    """
    nnunet = work / "arms" / arm / "nnunet"
    if nnunet.exists():
        shutil.rmtree(nnunet)  # an interrupted attempt: start the arm again from its cases
    name = "Study-" + arm.replace("-", "")
    write_raw_dataset(
        nnunet_dirs(nnunet).raw,
        DATASET_ID,
        name,
        _cases(cohort_dirs, config),
        dataset_labels(),
        unknown=unknown_structures(cohort_dirs),  # imported site cases: unknown → ignore label
    )
    # nnU-Net's planner sets torch threads from the augmentation workers: it needs at least one
    if start is None:
        plan_and_preprocess(nnunet, DATASET_ID, replace(config, da_workers=max(1, config.da_workers)))
    else:
        preprocess_like_model(nnunet, DATASET_ID, name, start, config)
    epochs = epochs_file(work, arm)
    epochs.unlink(missing_ok=True)

    def progress(p: EpochProgress) -> None:
        with epochs.open("a") as out:
            out.write(
                json.dumps(
                    {
                        "epoch": p.epoch + 1,
                        "train_loss": p.train_loss,
                        "val_loss": p.val_loss,
                        "pseudo_dice": list(p.pseudo_dice),
                    }
                )
                + "\n"
            )
        if advance:
            advance()

    checkpoint = start / "fold_all" / "checkpoint_final.pth" if start is not None else None
    results = train(nnunet, DATASET_ID, config, fold="all", progress=progress, start_from=checkpoint)
    manifest = ModelManifest(
        name=f"{MODEL_NAME}-{arm}",
        version="0.0.0",
        structures=STRUCTURES,
        provenance=default_provenance(
            training_data={"kind": "rtseg phantom", "cohorts": [p.name for p in cohort_dirs]},
            seeds={"training": config.seed},
            command="rtseg evaluate",
        ),
    )
    extra: dict[str, Any] = {"config": config.to_dict()}
    if start is not None:
        first = load_manifest(start)
        extra["started_from"] = f"{first.name} {first.version}"
    manifest = replace(manifest, provenance={**manifest.provenance, **extra})
    out = export_model(results, model_dir(work, arm), manifest)
    shutil.rmtree(nnunet / "nnUNet_preprocessed", ignore_errors=True)  # the bulk of the disk; not needed now
    log.info("arm %s trained: %s", arm, out)
    return out


def _cases(cohort_dirs: list[Path], config: CpuConfig) -> Iterator[Case]:
    from rtseg.model.default import canonical_cases

    for folder in cohort_dirs:
        yield from canonical_cases(folder, config.target_spacing_zyx)


def rounds_dir(work: Path) -> Path:
    """Global model of every federated round (``round_000`` = initial weights) and ``rounds.jsonl``."""
    return work / "arms" / FEDERATED / "rounds"


def train_federated(
    spec: StudySpec, train_dirs: dict[str, Path], work: Path, advance: Advance | None = None
) -> Path:
    """A SuperLink and one SuperNode per center on loopback (TLS, node keys); the global model.

    Site ``i`` holds exactly the training cases of ``CENTERS[i]``'s local arm.
    """
    from rtseg.federation.simulate import LocalFederation, SimulationSpec

    if is_trained(work, FEDERATED):
        for _ in range(spec.rounds):
            if advance:
                advance()
        return model_dir(work, FEDERATED)
    root = work / "arms" / FEDERATED / "flower"
    if root.exists():
        shutil.rmtree(root)
    sim = SimulationSpec(
        sites=len(CENTERS),
        rounds=spec.rounds,
        cases_per_site=spec.train_cases,
        matrix=spec.matrix,
        seed=spec.train_seed,
        local_epochs=spec.local_epochs,
        cpu=spec.cpu,
        secure=True,
        min_sites=len(CENTERS),
        round_timeout=3600.0,
        federation="rtseg-study",
        start_model=start_model(spec),
    )
    with LocalFederation(root, sim) as fed:
        for i, center in enumerate(CENTERS):
            shutil.copytree(train_dirs[center], fed.site_dir(i) / "cases")
        fed.start_coordinator()
        for i in range(len(CENTERS)):
            fed.start_site(i)
        with _watch_rounds(fed.state_dir, advance):
            _run_to_completion(fed)
        _keep_rounds(fed.state_dir, work)
    return model_dir(work, FEDERATED)


def _run_to_completion(fed: Any, attempts: int = RUN_ATTEMPTS) -> None:
    """Start runs until one completes; each new run resumes after the last completed round.

    A site's reply can be lost in transport (Flower's object store expires it on a starved
    machine); the coordinator's state keeps every finished round, so nothing is trained twice.
    """
    for attempt in range(1, attempts + 1):
        run_id, status = fed.run(timeout=6 * 3600.0)
        if status == "finished:completed":
            return
        log.warning("federated run %d ended %s (attempt %d of %d)", run_id, status, attempt, attempts)
    raise FederationError(
        f"run {run_id} ended {status} after {attempts} attempts; see {fed.state_dir / 'coordinator.log'}"
    )


def _keep_rounds(state_dir: Path, work: Path) -> None:
    target = rounds_dir(work)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(state_dir / "models", target)
    shutil.copyfile(state_dir / "rounds.jsonl", target / "rounds.jsonl")
    final = sorted(p for p in target.iterdir() if p.name.startswith("round_"))[-1]
    out = model_dir(work, FEDERATED)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(final, out)


@contextmanager
def _watch_rounds(state_dir: Path, advance: Advance | None, poll: float = 2.0) -> Iterator[None]:
    """Call ``advance`` once per newly completed round while the run goes on."""
    stop = threading.Event()
    seen = 0

    def catch_up() -> None:
        nonlocal seen
        path = state_dir / "rounds.jsonl"
        done = path.read_text().count("\n") if path.is_file() else 0  # complete lines only
        while seen < done:
            seen += 1
            if advance:
                advance()

    def loop() -> None:
        while not stop.wait(poll):
            catch_up()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        catch_up()


def read_epochs(work: Path, arm: str) -> list[dict[str, Any]]:
    path = epochs_file(work, arm)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
