"""Settings of the study: cohorts, the common training budget, the arms and the test sets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rtseg.errors import InputError
from rtseg.federation.simulate import TINY
from rtseg.model.cpu import CpuConfig
from rtseg.model.default import STAGE1

# Phantom centers C and D (rtseg.phantom.cohort): neither is A or B, the default model's training
# centers, so a study whose arms all start from the default model tests two centers it never saw.
CENTERS = ("C", "D")
LOCAL_ARMS = {c: f"local-{c}" for c in CENTERS}
FEDERATED = "federated"
CENTRALISED = "centralised"
ENSEMBLE = "ensemble"
ARMS = (*LOCAL_ARMS.values(), FEDERATED, CENTRALISED, ENSEMBLE)
BOTH = "+".join(CENTERS)
# StudySpec.start_model: the default model 0.9.0, kept in the package as the study's start
# (rtseg/models/study-start) so that the study's design and figures do not move when the default does.
DEFAULT_START = "rtseg-peds-abdomen 0.9.0"
POSITIONS = ("HFS", "FFS", "HFP")  # the orientation test: the same cases stored in each position


@dataclass(frozen=True)
class StudySpec:
    """Everything that determines a study run (recorded in the work folder to resume safely).

    Every trained model gets the same budget: ``rounds × local_epochs`` epochs of
    ``cpu.iterations_per_epoch`` iterations. The federated sites train that many
    epochs each, from the global weights of every round; the local and the
    centralised models train that many epochs in one go.

    ``start_model``: None, every arm starts from the same random weights with plans made
    from its own data; :data:`DEFAULT_START`, every arm starts from that model's
    weights and plans (trained on centers A and B, which the study's centers are not) and
    fine-tunes it with ``cpu``'s schedule.
    """

    mode: str
    matrix: int
    train_cases: int  # per center
    test_cases: int  # per center, before nephrectomy cases are added
    nephrectomy_cases: int  # per center: at least this many nephrectomy cases in the test set
    orientation_cases: int  # per center: first test cases, stored again as each of POSITIONS
    curve_cases: int  # per center: test cases scored after every federated round
    rounds: int
    local_epochs: int
    cpu: CpuConfig
    train_seed: int = 2000  # the default model uses 1000; test cases use yet another seed
    test_seed: int = 3000
    start_model: str | None = None
    shift_cases: int = 0  # per center and factor: the domain-shift experiment's cases (rtseg.study.shift)

    @property
    def epochs(self) -> int:
        return self.rounds * self.local_epochs

    @property
    def iterations(self) -> int:
        """Training iterations of each model (each federated site does as many)."""
        return self.epochs * self.cpu.iterations_per_epoch

    def local_config(self) -> CpuConfig:
        """The settings of the local and centralised models: the whole budget in one schedule."""
        return replace(self.cpu, epochs=self.epochs)

    def budget(self) -> str:
        start = f"{self.start_model}'s weights" if self.start_model else "random weights"
        return (
            f"{self.epochs} epochs × {self.cpu.iterations_per_epoch} iterations (batch {self.cpu.batch_size})"
            f" per model from {start}; federated: {self.rounds} rounds × {self.local_epochs} local"
            " epoch(s) at each site"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_work_dir(self, work: Path) -> None:
        """Record this spec in ``work``; refuse a folder that holds a run with other settings."""
        path = work / "spec.json"
        mine = json.loads(json.dumps(self.to_dict()))  # tuples → lists, as read back
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                raise InputError(
                    "this work folder holds a study run with other settings; use another --work",
                    source=str(work),
                )
            return
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1) + "\n")


QUICK = StudySpec(
    mode="quick",
    matrix=48,
    train_cases=3,
    test_cases=1,
    nephrectomy_cases=1,
    orientation_cases=1,
    curve_cases=1,
    shift_cases=1,
    rounds=1,  # Flower's fixed cost per round (polling, process starts) is the critical path here
    local_epochs=2,
    # the network `rtseg federation simulate` trains, with enough iterations to tell body from air:
    # with TINY's 3 a model labels every voxel at random and its RTSTRUCTs hold tens of thousands of contours
    cpu=replace(TINY, iterations_per_epoch=20),
)


FULL = StudySpec(
    mode="full",
    matrix=96,
    train_cases=8,
    # 13 (+ nephrectomy cases up to 2) a center, so that every OAR, each kidney too, is compared on 10
    # cases or more: Holm's correction over 18 OARs needs p < 0.05 / 18, reached from n = 10 on
    test_cases=13,
    nephrectomy_cases=2,
    orientation_cases=2,
    curve_cases=2,
    shift_cases=8,  # Holm over the 6 factors: p < 0.05 / 6 needs n ≥ 8
    rounds=5,
    local_epochs=1,
    # Fine-tuning the default model: its network and spacing (the plans come with its weights),
    # a warm restart at half its first learning rate, one thread a training process.
    cpu=replace(
        STAGE1,
        epochs=1,
        iterations_per_epoch=40,
        val_iterations_per_epoch=1,
        learning_rate=5e-4,
        da_workers=0,
        preprocess_workers=1,
        threads=1,
    ),
    start_model=DEFAULT_START,
)


def other(center: str) -> str:
    return next(c for c in CENTERS if c != center)


def relation(arm: str, test_center: str) -> str:
    """How a test center relates to an arm's training data: in-center, cross-center or both."""
    for center, name in LOCAL_ARMS.items():
        if arm == name:
            return "in-center" if test_center == center else "cross-center"
    return "both centers"
