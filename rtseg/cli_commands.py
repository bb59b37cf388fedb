"""Sub-commands beyond ``phantom``: segment, demo, model and cases.

Registered by the composition root (:mod:`rtseg_app.cli`), which also adds the
faces' commands; the core library never imports a face.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rtseg.errors import InputError

Handler = Callable[[argparse.Namespace], int]


def _load_segmenter(model: Path | None, threads: int | None = None, shift_ensemble: bool = False) -> Any:
    from rtseg.model.default import default_model_dir
    from rtseg.model.segmenter import NnunetSegmenter

    return NnunetSegmenter(model or default_model_dir(), threads=threads, shift_ensemble=shift_ensemble)


SHIFT_ENSEMBLE_HELP = (
    "predict eight copies of the CT shifted by about half a model voxel and vote the labels"
    " (8x the time; the node's [node] shift_ensemble)"
)


def print_result(result: Any) -> None:
    """Per-structure volumes, flags and timings of a PipelineResult, as a reviewer reads them."""
    print(f"RTSTRUCT: {result.rtstruct_path}")
    print(f"model: {result.model.name} {result.model.version}")
    print(f"{'structure':<14} {'volume (ml)':>11} {'contours':>9}")
    for s in result.structures:
        print(f"{s.name:<14} {s.volume_ml:>11.1f} {s.n_contours:>9}")
    if result.labels_path is not None:
        print(f"label map: {result.labels_path}")
    if result.omitted:
        print(f"not found (left out): {', '.join(result.omitted)}")
    for dropped in result.dropped:
        print(f"dropped: {dropped}")
    for flag in result.flags:
        print(f"check: {flag}")
    t = result.timings
    print(
        f"time: {t['total_s']:.1f} s (load {t['load_s']:.1f}, segment {t['segment_s']:.1f}, "
        f"RTSTRUCT {t['rtstruct_s'] + t['write_s']:.1f}) for {result.n_slices} slices"
    )


def _cmd_segment(args: argparse.Namespace) -> int:
    from rtseg.ct import load_series
    from rtseg.pipeline import model_identity, segment_series

    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", flush=True)

    if args.preview is not None and args.preview.is_dir():
        raise InputError("is a folder: give the PNG file to write", source=str(args.preview))
    if args.labels_out is not None:
        _check_labels_out(args.labels_out)
    say("reading CT series")  # the input is checked before the model loads: quick feedback
    volume = load_series(args.ct_dir, series_uid=args.series)
    say(f"{volume.shape[0]} slices, {volume.info.patient_position}; loading model")
    segmenter = _load_segmenter(args.model, args.threads, args.shift_ensemble)
    identity = model_identity(segmenter.manifest, segmenter.model_dir)
    result = segment_series(
        volume,
        segmenter,
        args.output,
        identity=identity,
        progress=say,
        region_check=args.region_check,
        labels_out=args.labels_out,
    )
    print_result(result)
    if args.preview is not None:
        _write_preview(volume, result, args.preview)
    return 0


def _check_labels_out(path: Path) -> None:
    """Before anything is segmented: a NIfTI file name in a folder that exists."""
    if not path.name.endswith((".nii.gz", ".nii")):
        raise InputError(
            "the label map is NIfTI: give a file name ending in .nii.gz or .nii", source=str(path)
        )
    if path.is_dir():
        raise InputError("is a folder: give the label map file to write", source=str(path))
    if not path.parent.is_dir():
        raise InputError("no such folder for the label map", source=str(path.parent))


def _write_preview(volume: Any, result: Any, png: Path) -> None:
    """The contour preview of the RTSTRUCT just written, read back from the file."""
    from rtseg.preview import render_preview

    try:
        render_preview(volume, result.rtstruct_path, {s.name: s.flags for s in result.structures}, png)
    except OSError as exc:
        raise InputError(f"cannot write the preview ({exc.strerror or exc})", source=str(png)) from exc
    print(f"preview: {png}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from rtseg.phantom.cohort import case_id, write_case
    from rtseg.pipeline import model_identity, segment_series

    out: Path = args.out
    print(f"generating a phantom case (center {args.center}, seed {args.seed}) in {out}")
    info = write_case(args.center, args.seed, 0, out)
    print(
        f"  {info.case_id}: {info.age_years:.1f} y, {info.variant}, {info.patient_position}, "
        f"{info.n_slices} slices × {info.slice_thickness_mm} mm"
    )
    case_dir = out / case_id(args.center, args.seed, 0)
    segmenter = _load_segmenter(args.model, args.threads)
    identity = model_identity(segmenter.manifest, segmenter.model_dir)
    result = segment_series(
        case_dir / "ct",
        segmenter,
        case_dir / "rtstruct.dcm",
        identity=identity,
        progress=lambda m: print(f"  {m}", flush=True),
    )
    print_result(result)
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    action: Handler = args.model_action
    return action(args)


def _model_info(args: argparse.Namespace) -> int:
    from rtseg.model.default import default_model_dir
    from rtseg.model.manifest import load_manifest, model_hash

    model_dir = args.model or default_model_dir()
    m = load_manifest(model_dir)
    print(f"{m.name} {m.version}  hash {model_hash(model_dir)}  ({model_dir})")
    print(f"configuration {m.configuration}, folds {', '.join(m.folds)}, orientation {m.orientation}")
    print("structures: " + ", ".join(f"{s.label}:{s.name}" for s in m.structures))
    for line in provenance_lines(m.name, m.version, m.provenance):
        print(line)
    return 0


# What docs/model.md measured for the embedded models (rtseg model eval, 12 fresh phantom cases of both
# centers): a model folder says nothing about its accuracy itself, so the documented figure is named here.
DOCUMENTED_ACCURACY = {
    ("rtseg-peds-abdomen", "0.8.0"): "mean OAR Dice 0.851 on 12 fresh phantom cases of both centers "
    "(lowest: pancreas 0.67, gallbladder 0.69); docs/model.md",
    ("rtseg-peds-abdomen", "0.9.0"): "mean OAR Dice 0.851 and 0.878 on two sets of 12 fresh phantom cases"
    " of both centers, 0.830 and 0.849 on the same patients as realistic phantoms on a couch"
    " (lowest: pancreas 0.68, gallbladder 0.68); docs/model.md",
    ("rtseg-peds-abdomen", "1.0.0"): "mean OAR Dice 0.893, 0.885 and 0.879 on three sets of 10 fresh phantom"
    " cases (lowest: pancreas 0.74; a 16-24 ml false left kidney in one left nephrectomy); docs/model.md",
    ("rtseg-peds-abdomen", "1.1.0"): "mean OAR Dice 0.903, 0.895 and 0.890 on three sets of 10 fresh phantom"
    " cases, 0.909, 0.901 and 0.896 with the shift ensemble (lowest: pancreas 0.76; a 16 ml false left"
    " kidney in one left nephrectomy); docs/model.md",
    ("rtseg-peds-abdomen", "1.2.0"): "mean OAR Dice 0.909, 0.899 and 0.894 on three sets of 10 fresh phantom"
    " cases, 0.915, 0.905 and 0.900 with the shift ensemble (lowest: pancreas 0.77; no false kidney after"
    " a left nephrectomy); docs/model.md",
    ("rtseg-peds-abdomen", "1.3.0"): "mean OAR Dice 0.912, 0.904 and 0.898 on three sets of 10 fresh phantom"
    " cases, 0.918, 0.911 and 0.905 with the shift ensemble; 0.901, 0.908 and 0.903 on three sets drawn"
    " after it was trained (lowest: pancreas 0.78; no false kidney over 1 ml); docs/model.md",
}
# build-default's recipes (rtseg.model.default.RECIPES, not imported at start-up: it pulls in SciPy)
RECIPE_VERSIONS = ("0.8.0", "0.9.0", "1.0.0", "1.1.0", "1.2.0", "1.3.0")
DEFAULT_RECIPE_VERSION = "1.3.0"
NOT_CLINICAL = "NOT FOR CLINICAL USE: trained on synthetic phantoms only, never on patient CTs"


def provenance_lines(name: str, version: str, provenance: dict[str, Any]) -> list[str]:
    """A model's provenance as a reviewer reads it: origin, training data, federation, gate, accuracy.

    Parameters
    ----------
    name, version
        The manifest's model name and version (for the documented accuracy).
    provenance
        The manifest's ``provenance`` record.
    """
    p = provenance
    made = p.get("command") or "unknown"
    lines = [f"made by: {made} (rtseg {p.get('rtseg_version', '?')}, {p.get('created') or 'date unknown'})"]
    lines.append(f"training data: {_training_data(p.get('training_data'))}")
    realistic = p.get("realistic")
    if isinstance(realistic, dict) and realistic.get("cases_per_center"):
        lines.append(
            f"realistic phantoms: {realistic['cases_per_center']} per center from stage"
            f" {realistic.get('from_stage', '?')} ({realistic.get('realism', '?')}"
            f"{', on a couch' if realistic.get('couch') else ''})"
        )
    fossa = p.get("fossa")
    if isinstance(fossa, dict) and fossa.get("cases_per_center"):
        lines.append(
            f"left nephrectomies with the spleen sunk into the empty fossa: {fossa['cases_per_center']}"
            f" per center from stage {fossa.get('from_stage', '?')} ({fossa.get('realism', '?')})"
        )
    if p.get("started_from"):
        lines.append(f"started from: {_started_from(p['started_from'])}")
    round_ = p.get("federation_round")
    federation = p.get("federation")
    lines.append(
        f"federation: {federation or 'none'}, round {round_}"
        if round_ is not None or federation
        else "federation: none (trained at one place)"
    )
    lines.append(f"gate: {_gate(p.get('gate'))}")
    accuracy = DOCUMENTED_ACCURACY.get((name, version)) or p.get("accuracy")
    lines.append(f"accuracy: {accuracy or 'not documented for this model: run rtseg model eval'}")
    if isinstance(p.get("training_data"), dict) and p["training_data"].get("kind") == "rtseg phantom":
        lines.append(NOT_CLINICAL)
    return lines


def _started_from(start: Any) -> str:
    """A recipe's ``name version (stages …)``, or a federation's start model record."""
    if isinstance(start, dict):
        return f"{start.get('name', '?')} {start.get('version', '?')} (hash {start.get('hash', '?')})"
    return str(start)


def _training_data(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data) if data else "unknown"
    kind = data.get("kind", "unknown")
    centers = data.get("centers")
    per = data.get("cases_per_center")
    parts = [str(kind)]
    if centers:
        parts.append(f"centers {', '.join(map(str, centers))}")
    if per:
        parts.append(f"{per} cases per center")
    if data.get("matrix"):
        parts.append(f"matrix {data['matrix']}")
    return ", ".join(parts)


def _gate(gate: Any) -> str:
    if not isinstance(gate, dict):
        return "not recorded in the model (a node's decisions: <data_dir>/models/gate.jsonl)"
    verdict = "accepted" if gate.get("accepted") else "refused"
    return f"{verdict} on {gate.get('n_cases', '?')} case(s), margin {gate.get('margin', '?')}"


def _model_eval(args: argparse.Namespace) -> int:
    from rtseg.cases import iter_cases
    from rtseg.evaluation import evaluate, summarize, summary_table, write_results

    segmenter = _load_segmenter(args.model, args.threads, args.shift_ensemble)

    def show(r: Any) -> None:
        dices = [s.dice for n, s in r.scores.items() if s.dice is not None and s.reference_ml > 0]
        print(f"  {r.case_id}: mean Dice {sum(dices) / len(dices):.3f} ({r.seconds:.1f} s)", flush=True)

    cases = iter_cases(args.data)
    results = evaluate(segmenter, cases, surfaces=not args.no_surfaces, progress=show, delivered=not args.raw)
    summary = summarize(results)
    print(summary_table(summary))
    if args.out:
        write_results(results, summary, args.out)
        print(f"written: {args.out}/scores.csv, summary.json, summary.md")
    return 0


def _model_build_default(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rtseg.model.default import DEFAULT_MODEL_DIR, PLAIN_RECIPE, RECIPES, build_default

    recipe = PLAIN_RECIPE if args.plain else RECIPES[args.recipe]
    if args.epochs:
        recipe = replace(recipe, config=replace(recipe.config, epochs=args.epochs))
    if args.refine_epochs is not None:
        refine = [e for e in args.refine_epochs if e > 0]
        templates = recipe.refine or (recipe.config,)  # stage n keeps the recipe's stage-n settings
        recipe = replace(
            recipe,
            refine=tuple(
                replace(templates[min(i, len(templates)) - 1], epochs=e, seed=recipe.config.seed + i)
                for i, e in enumerate(refine, start=1)
            ),
        )
    if args.cases:
        recipe = replace(recipe, cases_per_center=args.cases, more_cases=None)  # every stage
    started = time.monotonic()

    def progress(p: Any) -> None:
        dice = sum(p.pseudo_dice) / max(len(p.pseudo_dice), 1)
        print(
            f"  epoch {p.epoch + 1}/{p.epochs}: train loss {p.train_loss:.3f}, val loss {p.val_loss:.3f}, "
            f"pseudo-Dice {dice:.3f}, {p.seconds:.0f} s [{time.monotonic() - started:.0f} s]",
            flush=True,
        )

    out = build_default(
        args.work,
        args.out or DEFAULT_MODEL_DIR,
        recipe,
        progress=progress,
        from_model=args.from_model,
        stages_done=args.stages_done,
    )
    print(f"default model written to {out} in {time.monotonic() - started:.0f} s")
    return 0


# -- model registry and acceptance gate (rtseg/model/registry.py, rtseg/model/gate.py) ------
def _data_dir(args: argparse.Namespace) -> Path | None:
    """The node's data directory from ``--data-dir`` or ``--config``; None when neither was given."""
    from rtseg.settings import load_settings

    if args.data_dir is not None:
        return Path(args.data_dir)
    return load_settings(args.config).data_dir if args.config is not None else None


def _registry(args: argparse.Namespace) -> Any:
    """The registry a mutating command changes: it never guesses a data directory (state is made there)."""
    from rtseg.errors import InputError
    from rtseg.model.registry import Registry

    data_dir = _data_dir(args)
    if data_dir is None:
        raise InputError(
            f"`model {args.model_command}` changes a node's model registry: name the node's data "
            "directory with --data-dir DIR or --config FILE"
        )
    return Registry(data_dir)


def _model_list(args: argparse.Namespace) -> int:
    from rtseg.model.registry import Registry

    data_dir = _data_dir(args)
    registry = Registry(data_dir) if data_dir is not None else None
    current = registry.state().version if registry is not None else None
    if registry is None or current is None:  # read-only: show what a node would start with, write nothing
        where = "no data directory given" if registry is None else f"no registry yet in {registry.root}"
        print(f"{where}; a node starts with the embedded default model:")
        _print_versions([_default_version()], _default_version().version)
        return 0
    print(f"registry: {registry.root} (generation {registry.generation()})")
    _print_versions(registry.list(), current)
    return 0


def _default_version() -> Any:
    from rtseg.model.default import default_model_dir
    from rtseg.model.manifest import load_manifest, model_hash
    from rtseg.model.registry import ModelVersion, version_name

    folder = default_model_dir()
    m = load_manifest(folder)
    full = model_hash(folder, folds=m.folds, checkpoint=m.checkpoint, short=False)
    version = version_name(m, full[:12])
    federation, round_, _ = version.split("/")
    created = str(m.provenance.get("created") or "")
    return ModelVersion(
        version, folder, m.name, m.version, federation, int(round_[1:]), full[:12], created, ""
    )


def _print_versions(versions: list[Any], current: str) -> None:
    print(f"  {'version':<32} {'name':<20} {'model version':<16} {'round':>5} {'hash':<12}  created")
    for v in versions:
        mark = "*" if v.version == current else " "
        print(
            f"{mark} {v.version:<32} {v.name:<20} {v.model_version:<16} {v.round:>5} {v.hash:<12}  "
            f"{v.created or '-'}"
        )
    print("(* = current)")


def _model_promote(args: argparse.Namespace) -> int:
    registry = _registry(args)
    previous = registry.ensure()
    target = args.version
    if Path(target).is_dir():  # a model folder: register it first (bypasses the gate: say so)
        target = registry.add(Path(target)).version
        print(f"added {target} (not checked by the gate)")
    promoted = registry.promote(target, reason=args.reason)
    if promoted.version == previous.version:
        print(f"{promoted.version} is already the current model")
        return 0
    print(f"current model: {promoted.version} (was {previous.version}); generation {registry.generation()}")
    return 0


def _model_rollback(args: argparse.Namespace) -> int:
    registry = _registry(args)
    previous = registry.ensure()
    restored = registry.rollback(reason=args.reason)
    print(f"current model: {restored.version} (was {previous.version}); generation {registry.generation()}")
    return 0


def _model_gate(args: argparse.Namespace) -> int:
    from rtseg.model.gate import run_gate

    registry = _registry(args)
    decision = run_gate(
        args.candidate,
        args.data,
        registry,
        margin=args.margin,
        promote=args.promote,
        threads=args.threads,
        progress=lambda msg: print(f"  {msg}", flush=True),
    )
    if decision.rows:
        print(decision.table())
    verdict = "ACCEPTED" if decision.accepted else "REFUSED"
    print(
        f"gate: {verdict} candidate {decision.candidate} against {decision.incumbent}"
        f" (margin {decision.margin:g})"
    )
    for reason in decision.reasons:
        print(f"  {reason}")
    if decision.promoted:
        print(f"promoted: the node now runs {decision.candidate}")
    elif decision.accepted:
        print("not promoted (run again with --promote, or `rtseg model promote` the version)")
    return 0 if decision.accepted else 1


def _register_core(sub: Any, handlers: dict[str, Handler]) -> None:
    p = sub.add_parser("segment", help="segment one CT series to an RTSTRUCT")
    p.add_argument("ct_dir", type=Path, help="folder with the CT series (DICOM files)")
    p.add_argument("-o", "--output", type=Path, required=True, help="RTSTRUCT file to write")
    p.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    p.add_argument("--series", help="SeriesInstanceUID, when the folder holds several CT series")
    p.add_argument("--threads", type=int, help="CPU threads for inference")
    p.add_argument("--preview", type=Path, metavar="PNG", help="also write a contour preview (PNG) here")
    p.add_argument(
        "--labels-out",
        type=Path,
        metavar="NIFTI",
        help="also write the label map the RTSTRUCT is made from (NIfTI on the CT's grid) here",
    )
    p.add_argument(
        "--no-region-check",
        dest="region_check",
        action="store_false",
        help="segment even a series that does not show the model's body region (a reviewer must know)",
    )
    p.add_argument("--shift-ensemble", action="store_true", help=SHIFT_ENSEMBLE_HELP)
    handlers["segment"] = _cmd_segment

    p = sub.add_parser("demo", help="generate a phantom CT case and segment it with the default model")
    p.add_argument(
        "--out", type=Path, default=Path("rtseg-demo"), help="folder for the case (default rtseg-demo)"
    )
    p.add_argument("--center", default="A", choices=["A", "B", "C", "D"])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    p.add_argument("--threads", type=int)
    handlers["demo"] = _cmd_demo

    p = sub.add_parser("model", help="inspect, evaluate and build models")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    q = msub.add_parser("info", help="name, version, hash, structures and provenance of a model")
    q.add_argument("--model", type=Path)
    q.set_defaults(model_action=_model_info)
    q = msub.add_parser("eval", help="score a model on labelled cases (Dice, HD95, MSD per structure)")
    q.add_argument(
        "--data", type=Path, required=True, help="folder of cases (<case>/ct, <case>/labels.nii.gz)"
    )
    q.add_argument("--model", type=Path)
    q.add_argument("--out", type=Path, help="write scores.csv, summary.json and summary.md here")
    q.add_argument("--no-surfaces", action="store_true", help="Dice only (faster)")
    q.add_argument(
        "--raw",
        action="store_true",
        help="score the model's labels as they come, not what the node sends (impossible structures"
        " dropped, organs settled at their level)",
    )
    q.add_argument("--shift-ensemble", action="store_true", help=SHIFT_ENSEMBLE_HELP)
    q.add_argument("--threads", type=int)
    q.set_defaults(model_action=_model_eval)
    q = msub.add_parser(
        "build-default", help="rebuild the embedded default model from scratch (phantoms, train)"
    )
    q.add_argument(
        "--work", type=Path, default=Path("rtseg-build"), help="working folder (default rtseg-build)"
    )
    q.add_argument("--out", type=Path, help="model folder to write (default: the package's default model)")
    q.add_argument("--epochs", type=int, help="override the recipe's stage-1 epochs")
    q.add_argument(
        "--refine-epochs",
        type=int,
        nargs="+",
        metavar="E",
        help="override the refinement stages' lengths: one epoch count per stage, other settings as"
        " the recipe's stage (0: stage 1 only)",
    )
    q.add_argument(
        "--from-model",
        type=Path,
        help="start from this model folder's weights (same plans) instead of training the first stages",
    )
    q.add_argument(
        "--stages-done",
        type=int,
        default=1,
        help="how many of the recipe's stages --from-model stands for (default 1)",
    )
    q.add_argument("--cases", type=int, help="cases per center for every stage (overrides the recipe's)")
    q.add_argument(
        "--recipe",
        choices=RECIPE_VERSIONS,
        default=DEFAULT_RECIPE_VERSION,
        help=f"the recipe of this model version (default {DEFAULT_RECIPE_VERSION}, the shipped model's;"
        " docs/model.md)",
    )
    q.add_argument(
        "--plain",
        action="store_true",
        help="recipe 0.8.0: the six stages on plain phantoms, without 0.9.0's realistic seventh stage"
        " (docs/model.md)",
    )
    q.set_defaults(model_action=_model_build_default)
    _register_registry(msub)
    handlers["model"] = _cmd_model


def _register_registry(msub: Any) -> None:
    def registry_args(q: Any) -> None:
        q.add_argument("--data-dir", type=Path, help="the node's data directory (or --config; never guessed)")
        q.add_argument("--config", type=Path, help="TOML settings file (paths.data_dir)")

    q = msub.add_parser("list", help="model versions in the node's registry; * marks the current one")
    registry_args(q)
    q.set_defaults(model_action=_model_list)
    q = msub.add_parser("promote", help="make a registered version (or a model folder) the current model")
    q.add_argument("version", help="version name (e.g. fed-peds/r3/1a2b3c4d5e6f) or a model folder")
    q.add_argument("--reason", default="operator", help="recorded in the registry history")
    registry_args(q)
    q.set_defaults(model_action=_model_promote)
    q = msub.add_parser("rollback", help="make the previously current model current again")
    q.add_argument("--reason", default="operator", help="recorded in the registry history")
    registry_args(q)
    q.set_defaults(model_action=_model_rollback)
    q = msub.add_parser("gate", help="site acceptance gate: candidate vs current model on held-out cases")
    q.add_argument("--candidate", type=Path, required=True, help="candidate model folder")
    q.add_argument("--data", type=Path, required=True, help="held-out approved cases (<case>/ct, labels)")
    q.add_argument("--margin", type=float, default=0.02, help="largest allowed Dice drop per structure")
    q.add_argument("--promote", action="store_true", help="promote the candidate if it passes")
    q.add_argument("--threads", type=int, help="CPU threads for inference")
    registry_args(q)
    q.set_defaults(model_action=_model_gate)


def _cmd_cases(args: argparse.Namespace) -> int:
    action: Handler = args.cases_action
    return action(args)


def _cases_names(args: argparse.Namespace) -> int:
    from rtseg.roi_names import RoiNameMapper, load_site_names, survey

    site = load_site_names(args.mapping) if args.mapping else None
    print_names(survey(args.source, RoiNameMapper(site=site)), f"under {args.source}", args.mapping)
    return 0


def print_names(found: Any, where: str, mapping: Path | None) -> None:
    """The table of ``rtseg cases names``: each name with its count, what it maps to and why."""
    rules = f"built-in TG-263 synonyms, site file {mapping}" if mapping else "built-in TG-263 synonyms"
    print(f"ROI names in {len(found.structure_sets)} RTSTRUCT(s) {where} ({rules})")
    print(f"{'count':>5}  {'ROI name':<28} {'→ structure':<15} reason")
    for decision, count in _sorted_counts(found.counts()):
        target = decision.structure or decision.kind
        print(f"{count:>5}  {decision.roi:<28} → {target:<13} {decision.reason}")
    for path, reason in found.unreadable:
        print(f"unreadable: {path}: {reason}")
    _print_names_summary(found)


def _sorted_counts(counts: Any) -> list[Any]:
    """Mapped first (structure order), then ambiguous, combined, ignored, rejected, unknown; busiest first."""
    from rtseg.roi_names import KINDS, structure_order

    def key(item: Any) -> tuple[int, int, int, str]:
        d, n = item
        return (KINDS.index(d.kind), structure_order(d.structure), -n, d.roi.lower())

    return sorted(counts.items(), key=key)


def _print_names_summary(found: Any) -> None:
    from rtseg.roi_names import KINDS

    counts = found.counts()
    names = {kind: {d.roi for d in counts if d.kind == kind} for kind in KINDS}
    kinds = ", ".join(f"{len(names[k])} {k}" for k in KINDS if names[k])
    distinct = len({d.roi for d in counts})
    sets = len(found.structure_sets)
    print(f"summary: {distinct} distinct ROI name(s) in {sets} RTSTRUCT(s): {kinds or 'none'}")
    per = found.cases_per_structure()
    if per:
        print("structure sets giving each structure: " + ", ".join(f"{s} {n}" for s, n in _by_structure(per)))
    print(f"files: {found.files} looked at, {len(found.unreadable)} unreadable")


def _by_structure(per: Any) -> list[tuple[str, int]]:
    from rtseg.roi_names import structure_order

    return sorted(per.items(), key=lambda item: structure_order(item[0]))


def _register_cases(sub: Any, handlers: dict[str, Handler]) -> dict[str, Any]:
    p = sub.add_parser("cases", help="a site's own contoured cases: ROI names, import, report")
    csub = p.add_subparsers(dest="cases_command", required=True, metavar="ACTION")
    q = csub.add_parser(
        "names", help="every ROI name of the RTSTRUCTs under a folder, what it maps to (TG-263) and why"
    )
    sources = {"names": q.add_mutually_exclusive_group(required=True)}
    sources["names"].add_argument("--from", dest="source", type=Path, help="folder (any layout) to read")
    q.add_argument("--mapping", type=Path, help="the site's ROI mapping file (TOML), applied first")
    q.set_defaults(cases_action=_cases_names)
    q = csub.add_parser("import", help="a folder's approved RTSTRUCTs and their CTs → de-identified cases")
    sources["import"] = q.add_mutually_exclusive_group(required=True)
    sources["import"].add_argument("--from", dest="source", type=Path, help="folder (any layout) to read")
    q.add_argument("--out", type=Path, required=True, help="the site's cases folder (created if needed)")
    q.add_argument("--mapping", type=Path, help="the site's ROI mapping file (TOML), applied first")
    q.add_argument(
        "--approved-only",
        dest="any_approval",
        action="store_false",
        help="only structure sets with ApprovalStatus APPROVED (or an --approved-label) (default)",
    )
    q.add_argument(
        "--any-approval", dest="any_approval", action="store_true", help="whatever the ApprovalStatus"
    )
    q.add_argument(
        "--approved-label",
        action="append",
        default=[],
        metavar="LABEL",
        help="a StructureSetLabel that also counts as approved (repeatable)",
    )
    q.set_defaults(cases_action=_cases_import, any_approval=False)
    q = csub.add_parser("report", help="per site: cases, structures per case, volumes, coverage heat map")
    q.add_argument(
        "--cases", type=Path, required=True, help="a site's cases folder, or a folder of site folders"
    )
    q.add_argument("--out", type=Path, help="write the coverage heat map (cases × structures) to this PNG")
    q.set_defaults(cases_action=_cases_report)
    handlers["cases"] = _cmd_cases
    return sources


def _cases_import(args: argparse.Namespace) -> int:
    from rtseg.roi_names import load_site_names
    from rtseg.site_import import ImportOptions, import_folder

    site = load_site_names(args.mapping) if args.mapping else None
    options = ImportOptions(args.any_approval, tuple(args.approved_label), site)
    print(f"importing structure sets under {args.source} into {args.out}", flush=True)
    report = import_folder(args.source, args.out, options, progress=print_import_item)
    print_import_summary(report, args.out)
    return 0


def _cases_report(args: argparse.Namespace) -> int:
    from rtseg.case_report import coverage_png, coverage_summary, report_table, site_folders, site_report

    reports = [site_report(folder) for folder in site_folders(args.cases)]
    for report in reports:
        print(report_table(report))
    total = coverage_summary(reports)
    print(", ".join(f"{total[state]} {state}" for state in ("contoured", "filled", "unknown")), "in all")
    if args.out is not None:
        print(f"coverage heat map: {coverage_png(reports, args.out)}")
    return 0


def print_import_summary(report: Any, out: Path) -> None:
    """The summary table of ``rtseg cases import``: imported, present, skipped by reason."""
    from rtseg.site_import import index_path

    counts, skipped = report.counts(), report.skipped()
    print(f"{'imported':<32} {counts['imported']:>5}")
    print(f"{'already present':<32} {counts['already present']:>5}")
    print(f"{'skipped':<32} {counts['skipped']:>5}")
    for reason, n in sorted(skipped.items()):
        print(f"  {reason:<30} {n:>5}")
    print(f"import index (source UIDs, pseudonyms; keep on site): {index_path(out)}")


def print_import_item(n: int, total: int, item: Any) -> None:
    what = {
        "imported": f"→ {item.case_id} ({', '.join(item.structures)})",
        "already present": f"= {item.case_id}",
    }
    line = what.get(item.status, f"skipped: {item.reason}" + (f" ({item.detail})" if item.detail else ""))
    print(f"[{n}/{total}] {item.source}: {line}", flush=True)
    for note in item.left_out:
        print(f"    left out: {note}", flush=True)


def register(sub: Any, handlers: dict[str, Handler]) -> dict[str, Any]:
    """Add ``rtseg segment``, ``demo``, ``model`` and ``cases``.

    Returns the required source groups of ``cases names`` and ``cases import``
    (``--from``), where the composition root adds ``--pacs``.
    """
    _register_core(sub, handlers)
    return _register_cases(sub, handlers)
