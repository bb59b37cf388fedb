"""The one frozen settings object: TOML file + ``RTSEG_*`` environment.

Built once at the entry point (:func:`load_settings`) and passed explicitly;
nothing else reads the environment. Every table follows one rule: the variable
``RTSEG_<TABLE>_<KEY>`` overrides ``<key>`` of ``[<table>]`` (dots of a
sub-table become underscores: ``RTSEG_DICOM_TLS_CERT`` is ``dicom.tls.cert``,
``RTSEG_FEDERATION_CLOSED_LOOP_WINDOW_H`` is ``federation.closed_loop.window_h``;
lists comma-separated). Besides the rule::

    RTSEG_DATA_DIR                      paths.data_dir (also RTSEG_PATHS_DATA_DIR)
    RTSEG_DICOM_ALLOWED_CALLERS         "AE@host[:port],AE2"  (replaces the list)
    RTSEG_DESTINATIONS                  "name=AE@host:port[+tls],..."  (replaces the list)

Every bad value raises :class:`~rtseg.errors.InputError` in one style, naming
where it came from (the file or the variable), the ``table.key``, the value and
what is expected. The ``[http]`` and ``[federation]`` tables are kept as
:class:`Table` (values and their origins) for the modules that own their keys,
which parse them with :func:`parse_table` and the public parsers here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from rtseg.errors import InputError
from rtseg.model.chunked import CHUNK_SLICES
from rtseg.structures import MIN_ISLAND_ML

ENV_PREFIX = "RTSEG_"
# supersede: late instances make a new job on the whole series; flag: kept, the job and its
# RTSTRUCT say the series was incomplete; reject: failure status. "ignore" (the old default,
# which dropped them silently) now means "flag".
LATE_POLICIES = ("supersede", "flag", "reject", "ignore")
# what runs the network (rtseg.model.runtimes): auto = torch on CUDA, else the one measured fastest
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
SITE_DATA_DIR = "site-data"  # under the data directory: the site's training cases (closed loop, federation)
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash
# series that are not diagnostic axial CT, by the names vendors give them: scouts (GE "Scout", Siemens
# "Topogram", Philips "Surview", Canon "Scanogram") and bolus-tracking monitor scans (Siemens "CARE Bolus",
# "Monitoring", GE "SmartPrep"); ImageType LOCALIZER catches scouts whose description says nothing
DEFAULT_DESCRIPTION_EXCLUDE = "scout|topogram|localizer|surview|scanogram|bolus|monitoring|smartprep"


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS: a certificate + key enables TLS on the SCP; ``ca`` verifies peers."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None and self.key is not None


@dataclass(frozen=True)
class Caller:
    """An allowed calling AE; ``host`` pins its address, ``port`` is where return-to-sender goes."""

    ae_title: str
    host: str | None = None
    port: int | None = None


OUTPUT_FORMATS = ("rtstruct", "seg")  # what a destination can ask for: RT Structure Set, DICOM SEG


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP the results are sent to (PACS, TPS); ``formats``: RTSTRUCT and/or DICOM SEG."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    formats: tuple[str, ...] = ("rtstruct",)


@dataclass(frozen=True)
class DicomSettings:
    ae_title: str = "RTSEG"
    port: int = 11112
    # loopback unless the operator opts in: all interfaces (0.0.0.0) to any calling AE is not a default
    host: str = "127.0.0.1"
    max_pdu: int = 4 * 1024 * 1024  # advertised maximum PDU; 0 = unlimited
    allowed_callers: tuple[Caller, ...] = ()  # empty: any calling AE is accepted
    return_to_sender: bool = False
    accept_rtstruct: bool = True
    network_timeout_s: float = 60.0
    max_instance_mb: int = 64  # one received instance: as sent, inflated (Deflate) and decoded
    # one C-GET of `rtseg cases import|names --pacs`: a PACS cannot make it write more than this
    retrieve_max_instances: int = 5000
    retrieve_max_mb: int = 4096
    tls: TlsSettings = field(default_factory=TlsSettings)

    @property
    def max_instance_bytes(self) -> int:
        return self.max_instance_mb << 20


@dataclass(frozen=True)
class Selection:
    """Which complete series are segmented; the rest are recorded as skipped."""

    modalities: tuple[str, ...] = ("CT",)
    series_description_include: str | None = None  # regex, searched case-insensitively
    series_description_exclude: str | None = DEFAULT_DESCRIPTION_EXCLUDE  # "" in the file: none
    body_parts: tuple[str, ...] = ()  # empty: any BodyPartExamined
    image_type_exclude: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM")
    slice_thickness_mm: tuple[float, float] = (0.0, 10.0)
    slice_count: tuple[int, int] = (10, 3000)
    # measured on the image, not BodyPartExamined: a series without the model's region fails its job
    region_check: bool = True


@dataclass(frozen=True)
class NodeSettings:
    quiet_time_s: float = 10.0
    # a series is complete at once when its sender releases the association and it is a whole stack
    complete_on_release: bool = True
    release_grace_s: float = 1.0  # ... after this long with no new instance of it
    late_instance_policy: str = "supersede"  # see LATE_POLICIES
    workers: int = 1
    worker_crash_limit: int = 3  # a job whose worker died this often is failed, not retried
    inference_threads: int | None = None
    min_island_ml: float = MIN_ISLAND_ML
    chunk_slices: int = CHUNK_SLICES  # longer series are predicted in z-chunks of about this many (0: never)
    retention_h: float = 24.0
    results_retention_h: float = 720.0  # a DICOM job's outputs (jobs/<id>/: RTSTRUCT, SEG, labels, preview)
    min_free_disk_mb: int = 1024
    retry_limit: int = 8
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 600.0
    write_preview: bool = False  # also write jobs/<id>/preview.png (contours on the CT) per result
    engine: str = "auto"  # see ENGINES; exports are cached in <data_dir>/engines
    shift_ensemble: bool = False  # vote eight predictions of half-voxel-shifted copies (rtseg.model.shifts)


@dataclass(frozen=True)
class LoggingSettings:
    """The log file under the data directory (stderr, and so the journal under systemd, as well)."""

    file: bool = True  # <data_dir>/logs/rtseg.log, rotated
    max_mb: int = 10  # rotate when the file reaches this size
    backups: int = 5  # rotated files kept (rtseg.log.1 ... rtseg.log.N)
    level: str = "INFO"  # of the file; stderr stays at WARNING unless -v


class Table(Mapping[str, Any]):
    """One configuration table as read: its values and where each came from (immutable).

    ``origin(key)`` is the file's path, or the ``RTSEG_*`` variable that set the key;
    values of the environment are strings, and the parsers take both.
    """

    def __init__(
        self,
        name: str,
        values: Mapping[str, Any] | None = None,
        origins: Mapping[str, str] | None = None,
        *,
        source: str = "settings",
    ) -> None:
        self.name = name
        self.source = source
        self._values = dict(values or {})
        self._origins = dict(origins or {})

    @classmethod
    def of(cls, name: str, values: Mapping[str, Any], source: str = "settings") -> Table:
        """``values`` as a table: itself if it is one, else a plain mapping from ``source``."""
        return values if isinstance(values, Table) else cls(name, values, source=source)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Table({self.name!r}, {self._values!r})"

    def origin(self, key: str) -> str:
        """The file or the variable ``key`` came from."""
        return self._origins.get(key, self.source)

    def sub(self, key: str) -> Table:
        """The sub-table ``key`` (empty when absent); :class:`InputError` if it is not a table."""
        value = self._values.get(key, {})
        if isinstance(value, Table):
            return value
        if not isinstance(value, Mapping):
            raise InputError(f"{self.name}.{key} must be a table", source=self.origin(key))
        return Table(f"{self.name}.{key}", value, source=self.origin(key))

    def overlaid(self, key: str, value: Any, origin: str) -> Table:
        """A copy with ``key`` set to ``value`` from ``origin`` (e.g. a command-line option)."""
        return Table(
            self.name, {**self._values, key: value}, {**self._origins, key: origin}, source=self.source
        )


@dataclass(frozen=True)
class Settings:
    dicom: DicomSettings = field(default_factory=DicomSettings)
    destinations: tuple[Destination, ...] = ()
    selection: Selection = field(default_factory=Selection)
    node: NodeSettings = field(default_factory=NodeSettings)
    data_dir: Path = Path("rtseg-data")
    model_path: Path | None = None  # None: the registry's current model (initially the embedded default)
    http: Table = field(default_factory=lambda: Table("http"))  # parsed by service/
    federation: Table = field(default_factory=lambda: Table("federation"))  # rtseg.federation, closed loop
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    config_file: Path | None = None


# -- value parsers: value (TOML, or a variable's string) -> typed value; ValueError says why ----
Parser = Callable[[Any], Any]


def parse_int(lo: int, hi: int | None = None) -> Parser:
    """Parser of an integer in ``[lo, hi]`` (no upper bound without ``hi``), from TOML or a string."""

    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int | str) or not str(v).strip().lstrip("+-").isdigit():
            raise ValueError("must be an integer")
        n = int(v)
        if hi is None and n < lo:
            raise ValueError(f"must be at least {lo}")
        if hi is not None and not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n

    return parse


def parse_float(lo: float, hi: float = float("inf")) -> Parser:
    """Parser of a number in ``[lo, hi]``, from TOML or a string."""

    def parse(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError("must be a number")
        try:
            x = float(v)
        except ValueError:
            raise ValueError("must be a number") from None
        if hi == float("inf") and not lo <= x:
            raise ValueError(f"must be at least {lo:g}")
        if not lo <= x <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")
        return x

    return parse


def parse_bool(v: Any) -> bool:
    """``true``/``false`` (TOML), or 1/0, yes/no, on/off as a string."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    raise ValueError("must be true or false")


def parse_str(v: Any) -> str:
    """A non-empty string, stripped."""
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v.strip()


def _ae(v: Any) -> str:
    s = parse_str(v)
    if not _AE_RE.match(s):
        raise ValueError("must be 1-16 printable characters without backslash")
    return s


def parse_path(v: Any) -> Path:
    """A path; ``~`` expanded."""
    return Path(parse_str(v)).expanduser()


def _regex(v: Any) -> str | None:
    if v is None or v == "":
        return None
    s = parse_str(v)
    try:
        re.compile(s)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from exc
    return s


def parse_strings(case: Callable[[str], str] = str.upper) -> Parser:
    """Parser of a list of strings (a TOML array, or comma-separated), stripped, ``case`` applied."""

    def parse(v: Any) -> tuple[str, ...]:
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError("must be a list of strings")
        return tuple(case(i.strip()) for i in items if i.strip())

    return parse


_strings = parse_strings()


def _range(parse: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, Any]]:
    def parse_range(v: Any) -> tuple[Any, Any]:
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, list | tuple) or len(items) != 2:
            raise ValueError("must be [min, max]")
        lo, hi = parse(items[0]), parse(items[1])
        if lo > hi:
            raise ValueError("min must not exceed max")
        return (lo, hi)

    return parse_range


def optional(parse: Parser) -> Parser:
    """``parse``, or None for a missing or empty value."""
    return lambda v: None if v is None or v == "" else parse(v)


def _engine(v: Any) -> str:
    s = parse_str(v).lower()
    if s not in ENGINES:
        raise ValueError(f"must be one of {', '.join(ENGINES)}")
    return s


def _late_policy(v: Any) -> str:
    s = parse_str(v).lower()
    if s not in LATE_POLICIES:
        raise ValueError(f"must be one of {', '.join(LATE_POLICIES[:3])}")
    return "flag" if s == "ignore" else s


_PORT = parse_int(1, 65535)
_DICOM: dict[str, Callable[[Any], Any]] = {
    "ae_title": _ae,
    "port": parse_int(0, 65535),  # 0: any free port (tests)
    "host": parse_str,
    "max_pdu": parse_int(0, 2**31 - 1),
    "return_to_sender": parse_bool,
    "accept_rtstruct": parse_bool,
    "network_timeout_s": parse_float(1.0, 3600.0),
    "max_instance_mb": parse_int(1, 4096),
    "retrieve_max_instances": parse_int(1, 1_000_000),
    "retrieve_max_mb": parse_int(1, 1_000_000),
}
_TLS: dict[str, Callable[[Any], Any]] = {
    "cert": optional(parse_path),
    "key": optional(parse_path),
    "ca": optional(parse_path),
}
_SELECTION: dict[str, Callable[[Any], Any]] = {
    "modalities": _strings,
    "series_description_include": _regex,
    "series_description_exclude": _regex,
    "body_parts": _strings,
    "image_type_exclude": _strings,
    "slice_thickness_mm": _range(parse_float(0.0)),
    "slice_count": _range(parse_int(1, 100_000)),
    "region_check": parse_bool,
}
_NODE: dict[str, Callable[[Any], Any]] = {
    "quiet_time_s": parse_float(0.1, 86400.0),
    "complete_on_release": parse_bool,
    "release_grace_s": parse_float(0.0, 60.0),
    "late_instance_policy": _late_policy,
    "workers": parse_int(1, 64),
    "worker_crash_limit": parse_int(1, 100),
    "inference_threads": optional(parse_int(1, 256)),
    "min_island_ml": parse_float(0.0, 1000.0),
    "chunk_slices": parse_int(0, 100_000),
    "retention_h": parse_float(0.0),
    "results_retention_h": parse_float(0.0),
    "min_free_disk_mb": parse_int(0, 10**9),
    "retry_limit": parse_int(1, 1000),
    "retry_backoff_s": parse_float(0.0, 86400.0),
    "retry_backoff_max_s": parse_float(0.0, 7 * 86400.0),
    "write_preview": parse_bool,
    "engine": _engine,
    "shift_ensemble": parse_bool,
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(v: Any) -> str:
    s = parse_str(v).upper()
    if s not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return s


_LOGGING: dict[str, Callable[[Any], Any]] = {
    "file": parse_bool,
    "max_mb": parse_int(1, 10_000),
    "backups": parse_int(0, 1000),
    "level": _log_level,
}
_CALLER: dict[str, Callable[[Any], Any]] = {
    "ae_title": _ae,
    "host": optional(parse_str),
    "port": optional(_PORT),
}


def parse_formats(v: Any) -> tuple[str, ...]:
    """Output formats: a non-empty list of ``rtstruct`` and ``seg``, without repeats."""
    formats: tuple[str, ...]
    try:
        formats = parse_strings(str.lower)(v)
    except ValueError:
        formats = ()  # not a list of strings: the message below says what is expected
    bad = [f for f in formats if f not in OUTPUT_FORMATS]
    if bad or not formats or len(set(formats)) != len(formats):
        raise ValueError(f"must be a non-empty list of {' and '.join(repr(f) for f in OUTPUT_FORMATS)}")
    return formats


_DESTINATION: dict[str, Callable[[Any], Any]] = {
    "name": parse_str,
    "ae_title": _ae,
    "host": parse_str,
    "port": _PORT,
    "tls": parse_bool,
    "formats": parse_formats,
}
_TOP_LEVEL = (
    "dicom",
    "destinations",
    "selection",
    "node",
    "paths",
    "model",
    "http",
    "federation",
    "logging",
)


def load_settings(config: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``config`` (TOML, optional) overridden by ``RTSEG_*`` variables in ``environ``.

    ``environ`` defaults to the process environment: this is the one place that reads it.
    """
    env = os.environ if environ is None else environ
    raw = read_toml(config) if config is not None else {}
    where = str(config) if config is not None else "defaults"
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise InputError(f"unknown setting {unknown[0]!r} (known: {', '.join(_TOP_LEVEL)})", source=where)
    ours = {name: value for name, value in env.items() if name.startswith(ENV_PREFIX)}
    dicom = read_table(raw, "dicom", where, ours, subtables=("tls",))
    paths = read_table(raw, "paths", where, ours, aliases={"RTSEG_DATA_DIR": "data_dir"})
    model = parse_table(read_table(raw, "model", where, ours), {"path": optional(parse_path)})
    settings = Settings(
        dicom=_dicom(dicom),
        destinations=_destination_list(raw, where, ours),
        selection=Selection(**parse_table(read_table(raw, "selection", where, ours), _SELECTION)),
        node=NodeSettings(**parse_table(read_table(raw, "node", where, ours), _NODE)),
        data_dir=parse_table(paths, {"data_dir": parse_path}).get("data_dir", Path("rtseg-data")),
        model_path=model.get("path"),
        http=read_table(raw, "http", where, ours),
        federation=read_table(raw, "federation", where, ours, subtables=("closed_loop",)),
        logging=LoggingSettings(**parse_table(read_table(raw, "logging", where, ours), _LOGGING)),
        config_file=config,
    )
    _check(settings)
    return settings


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file; :class:`InputError` naming it when it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise InputError(f"cannot read the configuration file ({exc.strerror})", source=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML ({exc})", source=str(path)) from exc


def env_name(table: str, key: str) -> str:
    """The variable that overrides ``key`` of ``table``: ``RTSEG_<TABLE>_<KEY>``, dots as underscores."""
    return f"{ENV_PREFIX}{table.replace('.', '_').upper()}_{key.upper()}"


def read_table(
    raw: Mapping[str, Any],
    name: str,
    where: str,
    environ: Mapping[str, str],
    *,
    subtables: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> Table:
    """Table ``name`` (dotted) of the parsed file ``raw``, its ``RTSEG_<TABLE>_<KEY>`` variables laid over it.

    Parameters
    ----------
    raw
        The parsed TOML file (empty without one).
    name
        The table, e.g. ``"http"`` or ``"federation.closed_loop"``.
    where
        The file's path, for messages.
    environ
        The environment (variables outside the table's prefix are ignored).
    subtables
        Keys that are tables of their own (``tls`` of ``dicom``): read the same way, kept as
        :class:`Table` values, and their variables not taken for keys of this table.
    aliases
        Further variable names for keys, e.g. ``{"RTSEG_DATA_DIR": "data_dir"}``.
    """
    values: Any = raw
    for part in name.split("."):
        values = values.get(part, {})
        if not isinstance(values, dict):
            raise InputError(f"{name} must be a table", source=where)
    own = {key: value for key, value in values.items() if key not in subtables}
    origins = dict.fromkeys(own, where)
    prefix = env_name(name, "")
    nested = tuple(env_name(name, sub) + "_" for sub in subtables)
    names = {var: var[len(prefix) :].lower() for var in environ if var.startswith(prefix)}
    names.update(aliases or {})
    for var, key in names.items():
        if var in environ and not var.startswith(nested):
            own[key], origins[key] = environ[var], var
    for sub in subtables:
        table = read_table(raw, f"{name}.{sub}", where, environ)
        if table or sub in values:
            own[sub], origins[sub] = table, where
    return Table(name, own, origins, source=where)


def parse_table(table: Table, schema: Mapping[str, Parser], skip: Sequence[str] = ()) -> dict[str, Any]:
    """The values of ``table`` parsed by ``schema`` (key → parser); keys in ``skip`` are left out.

    Raises
    ------
    InputError
        For an unknown key or a bad value, naming where it came from (file or variable),
        the ``table.key``, the value and what is expected.
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        parse = schema.get(key)
        if parse is None:
            raise unknown_setting(table, key, [*schema, *skip])
        try:
            out[key] = parse(value)
        except (ValueError, TypeError) as exc:
            raise bad_value(table, key, str(exc)) from exc
    return out


def bad_value(table: Table, key: str, reason: str) -> InputError:
    """The one message for a bad value: ``<file>: table.key <reason>, got <value>``.

    From a variable: ``environment: RTSEG_TABLE_KEY <reason>, got '<value>' (table.key)``.
    """
    return _bad(table.origin(key), f"{table.name}.{key}", table.get(key), reason)


def unknown_setting(table: Table, key: str, known: Sequence[str]) -> InputError:
    """An unknown key of ``table``, named as it was written (file key or variable)."""
    origin, choices = table.origin(key), ", ".join(known)
    if origin.startswith(ENV_PREFIX):
        message = f"unknown setting {origin} ({table.name}.{key}; known: {choices})"
        return InputError(message, source="environment")
    return InputError(f"unknown setting {table.name}.{key} (known: {choices})", source=origin)


def _bad(origin: str, qualified: str, value: Any, reason: str) -> InputError:
    if origin.startswith(ENV_PREFIX):
        return InputError(f"{origin} {reason}, got {value!r} ({qualified})", source="environment")
    return InputError(f"{qualified} {reason}, got {value!r}", source=origin)


def _dicom(table: Table) -> DicomSettings:
    tls = TlsSettings(**parse_table(table.sub("tls"), _TLS))
    parsed = parse_table(table, _DICOM, skip=("tls", "allowed_callers"))
    return DicomSettings(**parsed, tls=tls, allowed_callers=_allowed_callers(table))


def _allowed_callers(dicom: Table) -> tuple[Caller, ...]:
    if "allowed_callers" not in dicom:
        return ()
    value, origin = dicom["allowed_callers"], dicom.origin("allowed_callers")
    if not origin.startswith(ENV_PREFIX):
        return tuple(_records(value, _CALLER, "dicom.allowed_callers", origin, Caller))
    try:
        return _callers(value)
    except ValueError as exc:
        raise bad_value(dicom, "allowed_callers", str(exc)) from exc


def _destination_list(raw: Mapping[str, Any], where: str, env: Mapping[str, str]) -> tuple[Destination, ...]:
    name = f"{ENV_PREFIX}DESTINATIONS"
    if name not in env:
        return tuple(_records(raw.get("destinations", []), _DESTINATION, "destinations", where, Destination))
    try:
        return _destinations(env[name])
    except ValueError as exc:
        raise _bad(name, "destinations", env[name], str(exc)) from exc


def _records(values: Any, schema: Mapping[str, Parser], key: str, where: str, cls: Any) -> list[Any]:
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise InputError(f"{key} must be a list of tables", source=where)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    out = []
    for i, value in enumerate(values):
        parsed = parse_table(Table(f"{key}[{i}]", value, source=where), schema)
        missing = [name for name in required if name not in parsed]
        if missing:
            raise InputError(f"{key}[{i}].{missing[0]} is required", source=where)
        out.append(cls(**parsed))
    return out


_ADDRESS_RE = re.compile(r"^(?P<ae>[^@]+)(@(?P<host>[^:+]+)(:(?P<port>\d+))?)?(?P<tls>\+tls)?$")


def _callers(v: str) -> tuple[Caller, ...]:
    out = []
    for item in filter(None, (i.strip() for i in v.split(","))):
        m = _ADDRESS_RE.match(item)
        if m is None or m["tls"]:
            raise ValueError(f"has a bad entry {item!r} (expected AE@host[:port])")
        out.append(Caller(_ae(m["ae"]), m["host"], _PORT(m["port"]) if m["port"] else None))
    return tuple(out)


def _destinations(v: str) -> tuple[Destination, ...]:
    out = []
    for item in filter(None, (i.strip() for i in v.split(","))):
        name, _, address = item.partition("=")
        m = _ADDRESS_RE.match(address)
        if not name or m is None or not m["host"] or not m["port"]:
            raise ValueError(f"has a bad entry {item!r} (expected name=AE@host:port[+tls])")
        out.append(Destination(name.strip(), _ae(m["ae"]), m["host"], _PORT(m["port"]), bool(m["tls"])))
    return tuple(out)


def _check(s: Settings) -> None:
    where = str(s.config_file) if s.config_file else "settings"
    names = [d.name for d in s.destinations]
    if len(set(names)) != len(names):
        raise InputError("destinations: names must be unique", source=where)
    tls = s.dicom.tls
    if (tls.cert is None) != (tls.key is None):
        raise InputError("dicom.tls.cert and dicom.tls.key must be given together", source=where)
    for key, path in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca)):
        if path is not None and not path.is_file():
            raise InputError(f"dicom.tls.{key}: no such file {path}", source=where)
    if any(d.tls for d in s.destinations) and tls.ca is None:
        raise InputError("destinations with tls = true need dicom.tls.ca to verify them", source=where)
    if s.node.retry_backoff_max_s < s.node.retry_backoff_s:
        raise InputError("node.retry_backoff_max_s must be at least node.retry_backoff_s", source=where)
