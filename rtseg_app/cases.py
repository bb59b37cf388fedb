"""``rtseg cases names|import --pacs AE@HOST:PORT``: the site import, fed from a PACS.

The core owns the folder import (:mod:`rtseg.site_import`) and the commands'
``--from``; the DICOM face owns query/retrieve (:mod:`dicom_node.qr`). This glue
adds ``--pacs`` to both commands: it C-FINDs the RTSTRUCTs (date range), skips
those the import index already holds (by SOPInstanceUID, nothing retrieved) and
those the PACS says are unapproved, C-GETs each remaining RTSTRUCT and then its
referenced CT into ``<out>/.rtseg-import/staging/<key>/``, imports that staged
folder and removes it. A bad item (refused association, failed C-GET, CT not in
the PACS) is listed with its reason; only a PACS that cannot be queried at all
ends the run (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.qr import FoundRtstruct, Pacs, QueryRetrieve, Retrieved, RetrieveLimits
from rtseg.cli_commands import print_import_item, print_import_summary, print_names
from rtseg.errors import InputError
from rtseg.privacy import uid_key
from rtseg.roi_names import RoiNameMapper, load_site_names, survey
from rtseg.settings import load_settings
from rtseg.site_import import (
    BAD_RTSTRUCT,
    NOT_APPROVED,
    PRESENT,
    SKIPPED,
    ImportItem,
    ImportOptions,
    ImportReport,
    approved,
    import_staged,
    imported_case,
    referenced_ct,
    staging_path,
)

Handler = Callable[[argparse.Namespace], int]
# reasons a PACS item is skipped before the folder import sees it
NOT_RETRIEVED = "retrieve failed"
NO_CT_IN_PACS = "referenced CT not in the PACS"
OVER_LIMIT = "retrieval over a limit"  # the PACS sent more than [dicom] allows one C-GET


def register(sources: dict[str, Any], handlers: dict[str, Handler]) -> None:
    """Add ``--pacs`` (and its options) beside ``--from`` of ``cases names`` and ``cases import``.

    ``sources`` are the commands' required source groups, from :func:`rtseg.cli_commands.register`.
    """
    for group in sources.values():
        group.add_argument("--pacs", metavar="AE@HOST:PORT", help="query/retrieve the RTSTRUCTs from a PACS")
        parser = group._container  # the command's parser: the options below go with --pacs
        parser.add_argument("--calling-ae", help="our AE title towards the PACS (default: [dicom] ae_title)")
        parser.add_argument(
            "--since", type=date.fromisoformat, help="--pacs: studies from this date (YYYY-MM-DD)"
        )
        parser.add_argument("--until", type=date.fromisoformat, help="--pacs: studies up to this date")
        parser.add_argument("--config", type=Path, help="--pacs: settings file (for [dicom] ae_title)")
    folder_commands = handlers["cases"]

    def cases(args: argparse.Namespace) -> int:
        if getattr(args, "pacs", None) is None:
            return folder_commands(args)
        return _names_pacs(args) if args.cases_command == "names" else _import_pacs(args)

    handlers["cases"] = cases


def _client(args: argparse.Namespace) -> QueryRetrieve:
    settings = load_settings(args.config)
    calling = args.calling_ae or settings.dicom.ae_title
    limits = RetrieveLimits.of(settings.dicom)
    qr = QueryRetrieve(Pacs.parse(args.pacs), calling, settings.dicom.network_timeout_s, limits)
    qr.check_reachable()  # the one real failure: exit 2 with the address and the reason
    return qr


# -- cases import --pacs --------------------------------------------------------------------------
def _import_pacs(args: argparse.Namespace) -> int:
    site = load_site_names(args.mapping) if args.mapping else None
    options = ImportOptions(args.any_approval, tuple(args.approved_label), site)
    qr = _client(args)
    found = qr.find_rtstructs(args.since, args.until)
    print(f"importing {len(found)} structure set(s) from {qr.pacs} into {args.out}", flush=True)
    report = ImportReport()
    for n, item in enumerate(found, 1):
        result = _import_item(qr, item, _name(n, item), args.out, options)
        report.items.append(result)
        print_import_item(n, len(found), result)
    print_import_summary(report, args.out)
    return 0


def _name(n: int, item: FoundRtstruct) -> str:
    """How an item is shown: its place in the query's answer, series number and label (no UIDs)."""
    return f"RTSTRUCT {n} (series {item.series_number or '?'}, label {item.label or '?'!r})"


def _import_item(
    qr: QueryRetrieve, item: FoundRtstruct, name: str, out: Path, options: ImportOptions
) -> ImportItem:
    done = imported_case(out, item.sop_uid)
    if done is not None:  # resumable: never retrieved again
        return ImportItem(name, PRESENT, case_id=done)
    said = pydicom.Dataset()
    said.ApprovalStatus, said.StructureSetLabel = item.approval, item.label
    if item.approval and not options.any_approval and not approved(said, options):
        return ImportItem(name, SKIPPED, NOT_APPROVED, f"{item.approval}, label {item.label!r}")
    folder = staging_path(out) / uid_key(item.sop_uid)
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted run left: retrieve afresh
    try:
        return dataclasses.replace(_retrieve_and_import(qr, item, folder, out, options), source=name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _retrieve_and_import(
    qr: QueryRetrieve, item: FoundRtstruct, folder: Path, out: Path, options: ImportOptions
) -> ImportItem:
    got = qr.get_instance(item, folder / "rtstruct")
    if got.files == 0:
        return _not_retrieved(got, "the PACS sent no instance")
    try:
        ds = pydicom.dcmread(next((folder / "rtstruct").iterdir()))
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        return ImportItem("", SKIPPED, BAD_RTSTRUCT, type(exc).__name__)
    if not options.any_approval and not approved(ds, options):  # the PACS did not say: the file does
        label = str(ds.get("StructureSetLabel", "")).strip()
        return ImportItem(
            "", SKIPPED, NOT_APPROVED, f"{ds.get('ApprovalStatus', '') or 'none'}, label {label!r}"
        )
    problem = _retrieve_ct(qr, item, ds, folder / "ct")
    if problem is not None:
        return problem
    (result,) = import_staged(folder, out, options).items
    return result


def _retrieve_ct(
    qr: QueryRetrieve, item: FoundRtstruct, ds: pydicom.Dataset, folder: Path
) -> ImportItem | None:
    """C-GET the CT series the structure set references; a skipped item when none arrives."""
    pairs, slices = referenced_ct(ds)
    if not pairs and slices:  # no series reference: the series of a slice its contours lie on
        series = qr.find_series_of(item.study_uid, slices[0])
        pairs = [(item.study_uid, series)] if series else []
    if not pairs:
        return ImportItem("", SKIPPED, NO_CT_IN_PACS, "it references no CT series the PACS holds")
    for k, (study, series) in enumerate(pairs):
        study = study or item.study_uid
        try:
            known = qr.has_series(study, series)
        except InputError as exc:  # this query refused or failed: this item, not the run
            return ImportItem("", SKIPPED, NOT_RETRIEVED, exc.message)
        if not known:
            return ImportItem("", SKIPPED, NO_CT_IN_PACS, f"series {k + 1} of {len(pairs)} referenced")
        got = qr.get_series(study, series, folder / str(k))
        if got.files == 0 or got.problem:  # a part of a series would fail to load anyway
            return _not_retrieved(got, "the PACS sent no slice of the CT")
    return None


def _not_retrieved(got: Retrieved, nothing: str) -> ImportItem:
    """The skipped item of a failed C-GET: over a limit, or failed (``nothing``: it sent nothing)."""
    return ImportItem("", SKIPPED, OVER_LIMIT if got.over_limit else NOT_RETRIEVED, got.problem or nothing)


# -- cases names --pacs ---------------------------------------------------------------------------
def _names_pacs(args: argparse.Namespace) -> int:
    site = load_site_names(args.mapping) if args.mapping else None
    qr = _client(args)
    found = qr.find_rtstructs(args.since, args.until)
    # only the structure sets (no CT; they hold patient data), read from a private folder under the
    # data directory (never the system's temporary folder) and removed
    scratch = load_settings(args.config).data_dir / "tmp"
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="names-", dir=scratch) as tmp:
        failed = []
        for n, item in enumerate(found, 1):
            got = qr.get_instance(item, Path(tmp) / f"{n:05d}")
            if got.files == 0:
                failed.append(f"not retrieved: {_name(n, item)}: {got.problem or 'the PACS sent nothing'}")
        print_names(survey(Path(tmp), RoiNameMapper(site=site)), f"from {qr.pacs}", args.mapping)
    for line in failed:
        print(line)
    return 0
