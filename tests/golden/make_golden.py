"""Regenerate the golden prediction of the default model (run after `rtseg model build-default`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from rtseg.cases import load_case
from rtseg.model.default import default_model_dir
from rtseg.model.manifest import model_hash
from rtseg.model.segmenter import NnunetSegmenter
from rtseg.phantom.cohort import write_case

CENTER, SEED, MATRIX = "A", 9002, 96


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        info = write_case(CENTER, SEED, 0, Path(tmp), matrix=MATRIX)
        case = load_case(Path(tmp) / info.case_id)
        labels = NnunetSegmenter(default_model_dir(), threads=2).segment(case.volume).labels
    out = Path(__file__).with_name("default_model_prediction.npz")
    np.savez_compressed(
        out,
        labels=labels,
        center=CENTER,
        seed=SEED,
        matrix=MATRIX,
        model_hash=model_hash(default_model_dir()),
    )
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
