"""Clinical ROI names → rtseg's TG-263 structures, or a reason why not.

A department's structure sets name ROIs as its people and planning system do
("LIVER", "Lever", "Nier li", "Lt Lung", "z_PRV_Cord", "PTV_45"). Every place
that turns clinical contours into rtseg labels (the closed loop, site data
import, ``rtseg cases names``) decides through :class:`RoiNameMapper`, so a name
means the same everywhere. The rules, in order:

1. the site mapping file (TOML) wins: its ``ignore`` list, then its
   ``[roi_names]`` table;
2. a non-anatomical RT ROI Interpreted Type (PTV, CTV, GTV, CONTROL, SUPPORT,
   ...) is rejected whatever the name. AVOIDANCE and ORGAN are *not*: Varian
   Eclipse types OARs AVOIDANCE (``Lt Lung`` in ``../shared/realct/eclipse_rtstruct``);
3. derived structures are rejected by name (PRV, margins, Booleans, helpers);
4. left+right together ("Kidneys", "Longen", "Lung total") are reported, never split;
5. the built-in synonym table (English, Dutch, German, Latin, TG-263; laterality
   L/R, Lt/Rt, Left/Right, li/re, links/rechts, sin/dx, before or after the organ);
6. type EXTERNAL with a name that names nothing else → External;
7. anything else is unknown. Typos are never guessed.

Within one structure set, two ROIs that map to one structure are both reported
ambiguous: the clinician's intent cannot be known, and a wrong label poisons
training (precision before recall).
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from rtseg.ct import READ_ERRORS, check_deflated_file
from rtseg.errors import InputError, TooLargeError
from rtseg.structures import STRUCTURES

MAPPED, REJECTED, COMBINED, AMBIGUOUS, IGNORED, UNKNOWN = (
    "mapped",
    "rejected",
    "combined",
    "ambiguous",
    "ignored",
    "unknown",
)
KINDS = (MAPPED, AMBIGUOUS, COMBINED, IGNORED, REJECTED, UNKNOWN)  # the order reports use

# Single (unpaired) structures: TG-263 name → clinical names, ";"-separated, any spelling (normalised).
_SYNONYMS: dict[str, str] = {
    "External": (
        "External; Body; Outline; Skin; Body contour; Bodycontour; Body outline; "
        "Patient outline; Outline patient; External contour; Outer contour; Extern; Huid; "
        "Lichaam; Buitencontour; Lichaamscontour; Körper; Körperkontur; Außenkontur; Haut; "
        "Patient"
    ),
    "Liver": "Liver; Lever; Leber; Hepar",
    "Spleen": "Spleen; Milt; Milz; Lien",
    "Stomach": "Stomach; Maag; Magen; Gaster",
    "Pancreas": "Pancreas; Pankreas",
    "Duodenum": "Duodenum; Twaalfvingerige darm; Zwölffingerdarm",
    "Bowel_Small": (
        "Bowel_Small; BowelSmall; bowelsmall; Small bowel; Smallbowel; Small intestine; "
        "Intestine small; Dunne darm; Dunnedarm; Dünndarm"
    ),
    "Colon": "Colon; Kolon",
    "Gallbladder": "Gallbladder; Gall bladder; Galblaas; Gallenblase; Vesica fellea",
    "Esophagus": "Esophagus; Oesophagus; Oesofagus; Esofagus; Slokdarm; Ösophagus; Speiseröhre; Oeso",
    "Heart": "Heart; Hart; Herz; Cor",
    "SpinalCord": (
        "SpinalCord; spinalcord; Spinal cord; Cord; Myelum; Myelon; Ruggenmerg; Rückenmark; Medulla spinalis"
    ),
    "VBs": (
        "VBs; vbs; VB; Vertebral bodies; Vertebral body; Vertebrae bodies; Wervellichamen; "
        "Wervellichaam; Wirbelkörper"
    ),
    "A_Aorta": "A_Aorta; Aorta; A Aorta",
    "V_Venacava_I": (
        "V_Venacava_I; Venacava_I; Venacava inferior; Vena cava inferior; Vena cava inf; "
        "V cava inf; Inferior vena cava; IVC; VCI; Onderste holle ader; Untere Hohlvene"
    ),
}
# Paired organs: the organ's words (singular) → (left structure, right structure).
_PAIRED: dict[tuple[str, ...], tuple[str, str]] = {
    ("kidney", "nier", "niere", "ren"): ("Kidney_L", "Kidney_R"),
    ("lung", "long", "lunge", "pulmo"): ("Lung_L", "Lung_R"),
}
_PLURALS = {"kidneys": "kidney", "nieren": "kidney", "renes": "kidney", "lungs": "lung"}
_PLURALS |= {"longen": "lung", "lungen": "lung", "pulmones": "lung"}
_COMPOUNDS = {"linkernier": ("l", "nier"), "rechternier": ("r", "nier")}
_COMPOUNDS |= {"linkerlong": ("l", "long"), "rechterlong": ("r", "long")}
_LEFT = frozenset("l lt lft left li lks links linker linke linken linkes sin sinister sinistra".split())
_RIGHT = frozenset(
    "r rt rght right re rts rechts rechter rechte rechten rechtes dx dex dexter dextra".split()
)
_BOTH = frozenset(
    "both bil bilat bilateral total tot totaal gesamt beide beidseits bds sum all lr rl".split()
)
# Names that look like a structure but do not say which: reported, never guessed.
_UNCLEAR: dict[str, str] = {
    "sc": "abbreviation 'sc' is ambiguous (spinal cord or supraclavicular)",
    "gb": "abbreviation 'gb' is ambiguous",
    "sb": "abbreviation 'sb' is ambiguous",
    "vc": "abbreviation 'vc' is ambiguous (vena cava superior or inferior)",
    "vena cava": "no level: superior or inferior vena cava",
    "venacava": "no level: superior or inferior vena cava",
    "v venacava": "no level: superior or inferior vena cava",
    "cava": "no level: superior or inferior vena cava",
    "bowel": "bowel bag: small bowel and colon together",
    "bowel bag": "bowel bag: small bowel and colon together",
    "bowelbag": "bowel bag: small bowel and colon together",
    "darm": "bowel bag: small bowel and colon together",
    "darmen": "bowel bag: small bowel and colon together",
    "large bowel": "large bowel includes the rectum: not Colon",
    "bowel large": "large bowel includes the rectum: not Colon",
    "large intestine": "large bowel includes the rectum: not Colon",
    "dikke darm": "large bowel includes the rectum: not Colon",
    "dickdarm": "large bowel includes the rectum: not Colon",
}
# RT ROI Interpreted Types that never hold one organ (DICOM PS3.3 C.8.8.8); ORGAN, AVOIDANCE,
# EXTERNAL and CAVITY are decided by name.
REJECTED_TYPES = frozenset(
    "PTV CTV GTV TREATED_VOLUME IRRAD_VOLUME BOLUS SUPPORT FIXATION CONTROL DOSE_REGION MARKER"
    " REGISTRATION ISOCENTER CONTRAST_AGENT BRACHY_CHANNEL BRACHY_ACCESSORY BRACHY_SRC_APP"
    " BRACHY_CHNL_SHLD DOSE_MEASUREMENT".split()
)
_TARGETS = ("ptv", "ctv", "gtv", "itv", "prv")  # anywhere in the name, glued or not
_HELPER_FIRST = frozenset(
    "z zz zzz x xx opt optim optimization optimisation avoid avoidance help helper".split()
)
_HELPER_FIRST |= {"ring", "dummy", "tmp", "temp", "hulp", "hilf", "hilfs", "nt"}
_DERIVED_WORDS = frozenset(
    "ring rings opt optim avoid avoidance help helper hulp hilfs hilfsstruktur dose isodose iso couch"
    " table tafel tisch lagerung marker markers clip clips artefact artifact artefakt exp expand"
    " expanded crop cropped shell bolus mask fiducial seed overlap ovl block dummy override density"
    " contrast wire boost".split()
)
_UNITS = frozenset("mm cm gy cgy".split())
_TYPE_TAGS = ["SOPClassUID", "StructureSetROISequence", "RTROIObservationsSequence"]
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass(frozen=True)
class Decision:
    """What one ROI name was taken as, and why (``structure`` is set only when ``kind`` is mapped)."""

    roi: str
    kind: str  # one of KINDS
    structure: str | None
    reason: str


@dataclass(frozen=True)
class SiteNames:
    """A site's own ROI names: normalised name → structure, and names to ignore."""

    names: Mapping[str, str]
    ignore: frozenset[str]
    source: str = ""


def normalise(name: str) -> str:
    """Lowercase words without accents, separators, camel case or a trailing version number.

    ``"SpinalCord"`` → ``"spinal cord"``, ``"Nier_li"`` → ``"nier li"``, ``"Körper"`` and
    ``"Koerper"`` → ``"korper"``, ``"Liver_1"`` → ``"liver"``.
    """
    return " ".join(_strip_numbering(_tokens(name)))


def _tokens(name: str) -> list[str]:
    text = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)  # camel case
    text = unicodedata.normalize("NFKD", text.replace("ß", "ss"))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", " ", text)  # "liver1" → "liver 1"
    # German transliteration (Koerper = Körper) on both sides of every comparison
    return [re.sub(r"(?<=[a-z])(ae|oe|ue)", lambda m: m[1][0], t) for t in re.split(r"[^a-z0-9]+", text) if t]


def _strip_numbering(tokens: list[str]) -> list[str]:
    # "Liver_2", "Liver 01": a second copy or version; two-digit numbers (V20, 45 Gy) are kept
    if len(tokens) > 1 and re.fullmatch(r"\d|0\d", tokens[-1]):
        return tokens[:-1]
    return tokens


def _lookup_table() -> dict[str, str]:
    table = {normalise(s): structure for structure, names in _SYNONYMS.items() for s in names.split(";")}
    for words, (left, right) in _PAIRED.items():
        for word in words:
            for forms, structure in ((_LEFT, left), (_RIGHT, right)):
                for s in forms:
                    table[f"{word} {s}"] = table[f"{s} {word}"] = structure
    for compound, (side, word) in _COMPOUNDS.items():
        table[compound] = _PAIRED[next(w for w in _PAIRED if word in w)][side == "r"]
    return table


_TABLE = _lookup_table()


class RoiNameMapper:
    """Decides what clinical ROI names stand for among a model's structures.

    Parameters
    ----------
    structures
        The model's structure names (default: rtseg's 19). A synonym of a
        structure the model lacks is reported unknown.
    site
        The site's mapping file, which overrides the built-in rules.
    """

    def __init__(self, structures: Iterable[str] | None = None, site: SiteNames | None = None) -> None:
        self.structures = frozenset(structures or (s.name for s in STRUCTURES))
        self.site = site

    def decide(self, roi: str, interpreted_type: str | None = None) -> Decision:
        """One ROI on its own (name and RT ROI Interpreted Type); see the module's rules."""
        key = normalise(roi)
        rtype = (interpreted_type or "").strip().upper()
        site = self._site(roi, key)
        if site is not None:
            return site
        if rtype in REJECTED_TYPES:
            return Decision(roi, REJECTED, None, f"derived: RT ROI Interpreted Type {rtype}")
        combined = _combined(roi)  # before the Boolean rule: "Kidney L+R" is both kidneys
        if combined is not None:
            return Decision(roi, COMBINED, None, combined)
        reason = derived_reason(roi)
        if reason is not None:
            return Decision(roi, REJECTED, None, f"derived: {reason}")
        return self._by_name(roi, key, rtype)

    def map_case(self, rois: Iterable[tuple[str, str | None]]) -> list[Decision]:
        """Every ROI of one structure set, (name, interpreted type) each; shared targets are ambiguous."""
        decisions = [self.decide(name, rtype) for name, rtype in rois]
        claims: dict[str, list[str]] = defaultdict(list)
        for d in decisions:
            if d.kind == MAPPED and d.structure is not None:
                claims[d.structure].append(d.roi)
        return [_ambiguous(d, claims) for d in decisions]

    def _site(self, roi: str, key: str) -> Decision | None:
        if self.site is None:
            return None
        where = f" ({self.site.source})" if self.site.source else ""
        if key in self.site.ignore:
            return Decision(roi, IGNORED, None, f"site mapping file: ignore{where}")
        structure = self.site.names.get(key)
        if structure is None:
            return None
        return self._target(roi, structure, f"site mapping file: {key!r} → {structure}{where}")

    def _by_name(self, roi: str, key: str, rtype: str) -> Decision:
        if key in _UNCLEAR:
            return Decision(roi, AMBIGUOUS, None, _UNCLEAR[key])
        structure = _TABLE.get(key)
        if structure is not None and rtype == "EXTERNAL" and structure != "External":
            return Decision(roi, UNKNOWN, None, f"conflict: the name says {structure}, the type EXTERNAL")
        if structure is not None:
            return self._target(roi, structure, f"synonym {key!r} → {structure}")
        side = _no_side(key)
        if side is not None:
            return Decision(roi, AMBIGUOUS, None, side)
        if rtype == "EXTERNAL":
            return self._target(roi, "External", "RT ROI Interpreted Type EXTERNAL")
        return Decision(roi, UNKNOWN, None, "unknown")

    def _target(self, roi: str, structure: str, reason: str) -> Decision:
        if structure not in self.structures:
            return Decision(roi, UNKNOWN, None, f"{structure} is not a structure of the model ({reason})")
        return Decision(roi, MAPPED, structure, reason)


def _ambiguous(d: Decision, claims: Mapping[str, list[str]]) -> Decision:
    rivals = claims.get(d.structure or "", [])
    if d.kind != MAPPED or len(rivals) < 2:
        return d
    names = ", ".join(repr(r) for r in rivals)
    return Decision(
        d.roi, AMBIGUOUS, None, f"ambiguous: {names} all map to {d.structure} in one structure set"
    )


def derived_reason(roi: str) -> str | None:
    """Why ``roi`` names a derived (planning, helper, margin, Boolean) structure, or None."""
    raw = roi.strip()
    tokens = _tokens(raw)
    compact = "".join(tokens)
    if raw.startswith(("_", "-", "~", "#")):
        return f"starts with {raw[0]!r}"
    if tokens and tokens[0] in _HELPER_FIRST:
        n = len(tokens[0])
        return f"starts with {raw[: n + 1] if raw[n : n + 1] in ('_', '-', '.', ' ') else raw[:n]!r}"
    target = next((t for t in _TARGETS if t in compact), None)
    if target is not None:
        return f"contains {target.upper()!r}"
    word = next((t for t in tokens if t in _DERIVED_WORDS), None)
    if word is not None:
        return f"contains {word!r}"
    margin = next(
        (f"{a}{b}" for a, b in zip(tokens, tokens[1:], strict=False) if a.isdigit() and b in _UNITS), None
    )
    if margin is not None:
        return f"margin or dose {margin!r}"
    if "+" in raw or "&" in raw:
        return "Boolean expression"
    parts = [p for p in re.split(r"\s*[-–]\s*", raw) if normalise(p)]
    if sum(1 for p in parts if _names_organ(p)) >= 2:
        return "Boolean expression"
    return None


def _names_organ(part: str) -> bool:
    tokens = normalise(part).split()
    words = {w for ws in _PAIRED for w in ws} | set(_PLURALS) | {"body", "external"}
    return normalise(part) in _TABLE or any(t in words for t in tokens)


def _combined(roi: str) -> str | None:
    """A reason when ``roi`` holds both sides of a paired organ ("Kidneys", "Lung L+R", "Longen")."""
    tokens = [_PLURALS.get(t, t) for t in _tokens(roi)]
    plural = any(t in _PLURALS for t in _tokens(roi))
    organs = {w for ws in _PAIRED for w in ws} | set(_PLURALS.values())
    pair = next((p for ws, p in _PAIRED.items() for t in tokens if t in ws or t in _PLURALS), None)
    if pair is None:
        return None
    rest = [t for t in tokens if t not in organs]
    sides = {t in _LEFT for t in rest if t in _LEFT | _RIGHT}
    both = any(t in _BOTH for t in rest) or len(sides) == 2
    leftover = [t for t in rest if t not in _LEFT | _RIGHT | _BOTH]
    if leftover or not (both or (plural and not sides)):
        return None
    return f"combined left+right ({pair[0]} and {pair[1]}): not mapped"


def _no_side(key: str) -> str | None:
    for words, (left, right) in _PAIRED.items():
        if key in words:
            return f"no side given: {left} or {right}?"
    return None


def load_site_names(path: Path, structures: Iterable[str] | None = None) -> SiteNames:
    """Read a site mapping file.

    The file is TOML: a top-level ``ignore`` list and a ``[roi_names]`` table of
    clinical name → structure (an ``ignore`` list inside ``[roi_names]`` is read too)::

        ignore = ["Lever_oud"]

        [roi_names]
        "Nier_L_lokal" = "Kidney_L"

    Names are compared after :func:`normalise`, so case, separators and accents
    do not matter.

    Raises
    ------
    InputError
        If the file cannot be read, is not TOML, or names a structure the model lacks.
    """
    known = set(structures or (s.name for s in STRUCTURES))
    doc = _read_site_file(path)
    table = dict(doc.get("roi_names", {})) if isinstance(doc.get("roi_names", {}), dict) else None
    if table is None:
        raise InputError("[roi_names] must be a table of ROI name = structure", source=str(path))
    ignore = _ignore_list(doc.get("ignore", []), path) + _ignore_list(table.pop("ignore", []), path)
    unknown = sorted(set(doc) - {"roi_names", "ignore"})
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} (expected [roi_names] and ignore)", source=str(path))
    names: dict[str, str] = {}
    for roi, structure in table.items():
        if not isinstance(structure, str) or structure not in known:
            expected = ", ".join(sorted(known))
            raise InputError(
                f"[roi_names] {roi!r} = {structure!r}: not a structure ({expected})", source=str(path)
            )
        names[normalise(roi)] = structure
    both = sorted(set(names) & set(ignore))
    if both:
        raise InputError(f"{both[0]!r} is both mapped and ignored", source=str(path))
    return SiteNames(names, frozenset(ignore), path.name)


def _read_site_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the ROI mapping file ({exc.strerror})", source=str(path)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the ROI mapping file is not valid TOML ({exc})", source=str(path)) from exc


def _ignore_list(value: Any, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError("ignore must be a list of ROI names", source=str(path))
    return [normalise(v) for v in value]


# -- reading structure sets ---------------------------------------------------------------------
def rois_of(ds: pydicom.Dataset) -> list[tuple[str, str | None]]:
    """(ROI name, RT ROI Interpreted Type or None) of every ROI of a structure set, in its order."""
    types = {
        str(o.get("ReferencedROINumber", "")): str(o.get("RTROIInterpretedType", "") or "") or None
        for o in ds.get("RTROIObservationsSequence", [])
    }
    return [
        (str(r.get("ROIName", "") or ""), types.get(str(r.get("ROINumber", ""))))
        for r in ds.get("StructureSetROISequence", [])
    ]


@dataclass(frozen=True)
class Survey:
    """The ROI names of every structure set under a folder, decided per structure set."""

    root: Path
    files: int  # files looked at
    structure_sets: tuple[tuple[Decision, ...], ...]
    unreadable: tuple[tuple[str, str], ...]  # (path relative to root, reason)

    def counts(self) -> Counter[Decision]:
        """How often each decision (name, kind, structure, reason) was made."""
        return Counter(d for case in self.structure_sets for d in case)

    def cases_per_structure(self) -> Counter[str]:
        """How many structure sets give each structure a label."""
        return Counter(d.structure for case in self.structure_sets for d in case if d.structure)


def survey(root: Path, mapper: RoiNameMapper) -> Survey:
    """Every RTSTRUCT under ``root`` (any layout, any file name), headers only.

    Files that are not DICOM or cannot be parsed are listed with the reason; other
    DICOM objects (CT slices, plans) are passed over.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("not a folder", source=str(root))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    sets: list[tuple[Decision, ...]] = []
    unreadable: list[tuple[str, str]] = []
    for path in files:
        rois, problem = _read_rois(path)
        if problem is not None:
            unreadable.append((str(path.relative_to(root)), problem))
        elif rois is not None:
            sets.append(tuple(mapper.map_case(rois)))
    return Survey(root, len(files), tuple(sets), tuple(unreadable))


def _read_rois(path: Path) -> tuple[list[tuple[str, str | None]] | None, str | None]:
    """(ROIs of an RTSTRUCT, None), (None, None) for other DICOM, or (None, why it is unreadable)."""
    try:
        check_deflated_file(path)
        ds = _read_header(path)
    except OSError as exc:
        return None, f"cannot read ({exc.strerror or type(exc).__name__})"
    except _MALFORMED as exc:
        return None, f"malformed DICOM ({_error_name(exc)})"
    except TooLargeError as exc:
        return None, exc.message
    if ds is None:
        return None, "not a DICOM file"
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
    if sop_class != RTSTRUCT_SOP_CLASS:
        return None, None
    # both are Type 1; pydicom stops quietly at the end of a truncated file, so a missing one
    # is how a cut-off copy shows (the observations come last)
    missing = next((k for k in _TYPE_TAGS[1:] if k not in ds), None)
    if missing is not None:
        return None, f"incomplete RTSTRUCT: no {missing} (truncated?)"
    try:
        return rois_of(ds), None
    except _MALFORMED as exc:
        return None, f"malformed structure set ({_error_name(exc)})"


_MALFORMED = (*READ_ERRORS, IndexError)  # damaged Deflate data, sequences nested past the stack, ...


def _error_name(exc: BaseException) -> str:
    """``ValueError``; a module's bare ``error`` with its module (``zlib.error``, ``struct.error``)."""
    name = type(exc).__name__
    return f"{type(exc).__module__}.{name}" if name == "error" else name


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header elements ROI names need; None for a file that is not DICOM.

    Some archives write DICOM without the 128-byte preamble and ``DICM``: such a
    file is read again with ``force``, and is DICOM only if it has a SOP Class UID.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TYPE_TAGS)
    except InvalidDicomError:
        pass
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TYPE_TAGS, force=True)
        return ds if str(ds.get("SOPClassUID", "") or "").startswith("1.2.840.10008.") else None
    except (InvalidDicomError, *_MALFORMED):
        return None


def structure_order(name: str | None) -> int:
    """Position of a structure in rtseg's table (unknown names last), for sorted reports."""
    order = [s.name for s in STRUCTURES]
    return order.index(name) if name in order else len(order)


def summarise(decisions: Sequence[Decision]) -> dict[str, int]:
    """Number of decisions of each kind."""
    found = Counter(d.kind for d in decisions)
    return {kind: found[kind] for kind in KINDS}
