"""The one frozen settings object of ``rtseg serve``: TOML file + ``RTSEG_*`` environment.

Built once at the entry point (:func:`load_settings`) and passed explicitly;
nothing else reads the environment. Every bad value raises
:class:`~rtseg.errors.InputError` naming the key (``dicom.port``) and where it
came from (the file or the environment variable).

Environment overrides (win over the file)::

    RTSEG_DATA_DIR                      paths.data_dir
    RTSEG_MODEL_PATH                    model.path
    RTSEG_DICOM_<KEY>                   dicom.<key>   e.g. RTSEG_DICOM_PORT=11112, RTSEG_DICOM_AE_TITLE
    RTSEG_DICOM_TLS_<KEY>               dicom.tls.<key> (cert, key, ca)
    RTSEG_NODE_<KEY>                    node.<key>    e.g. RTSEG_NODE_QUIET_TIME_S=5
    RTSEG_SELECTION_<KEY>               selection.<key>; lists comma-separated
    RTSEG_DICOM_ALLOWED_CALLERS         "AE@host[:port],AE2"  (replaces the list)
    RTSEG_DESTINATIONS                  "name=AE@host:port[+tls],..."  (replaces the list)

The ``[http]`` and ``[federation]`` tables are kept raw for the faces that own them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rtseg.errors import InputError
from rtseg.structures import MIN_ISLAND_ML

ENV_PREFIX = "RTSEG_"
# supersede: late instances make a new job on the whole series; flag: kept, the job and its
# RTSTRUCT say the series was incomplete; reject: failure status. "ignore" (the old default,
# which dropped them silently) now means "flag".
LATE_POLICIES = ("supersede", "flag", "reject", "ignore")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


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


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP the RTSTRUCT is sent to (PACS, TPS)."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class DicomSettings:
    ae_title: str = "RTSEG"
    port: int = 11112
    host: str = "0.0.0.0"
    max_pdu: int = 4 * 1024 * 1024  # advertised maximum PDU; 0 = unlimited
    allowed_callers: tuple[Caller, ...] = ()  # empty: any calling AE is accepted
    return_to_sender: bool = False
    accept_rtstruct: bool = True
    network_timeout_s: float = 60.0
    max_instance_mb: int = 64  # one received instance: as sent, inflated (Deflate) and decoded
    tls: TlsSettings = field(default_factory=TlsSettings)

    @property
    def max_instance_bytes(self) -> int:
        return self.max_instance_mb << 20


@dataclass(frozen=True)
class Selection:
    """Which complete series are segmented; the rest are recorded as skipped."""

    modalities: tuple[str, ...] = ("CT",)
    series_description_include: str | None = None  # regex, searched case-insensitively
    series_description_exclude: str | None = None
    body_parts: tuple[str, ...] = ()  # empty: any BodyPartExamined
    image_type_exclude: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM")
    slice_thickness_mm: tuple[float, float] = (0.0, 10.0)
    slice_count: tuple[int, int] = (10, 3000)
    # measured on the image, not BodyPartExamined: a series without the model's region fails its job
    region_check: bool = True


@dataclass(frozen=True)
class NodeSettings:
    quiet_time_s: float = 10.0
    late_instance_policy: str = "supersede"  # see LATE_POLICIES
    workers: int = 1
    worker_crash_limit: int = 3  # a job whose worker died this often is failed, not retried
    inference_threads: int | None = None
    min_island_ml: float = MIN_ISLAND_ML
    retention_h: float = 24.0
    min_free_disk_mb: int = 1024
    retry_limit: int = 8
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 600.0


@dataclass(frozen=True)
class Settings:
    dicom: DicomSettings = field(default_factory=DicomSettings)
    destinations: tuple[Destination, ...] = ()
    selection: Selection = field(default_factory=Selection)
    node: NodeSettings = field(default_factory=NodeSettings)
    data_dir: Path = Path("rtseg-data")
    model_path: Path | None = None  # None: the registry's current model (initially the embedded default)
    http: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    federation: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    config_file: Path | None = None


# -- value parsers: (value, key) -> typed value; raise ValueError with a reason ---------------
def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int | str) or not str(v).strip().lstrip("+-").isdigit():
            raise ValueError("must be an integer")
        n = int(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n

    return parse


def _float(lo: float, hi: float = float("inf")) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError("must be a number")
        try:
            x = float(v)
        except ValueError:
            raise ValueError("must be a number") from None
        if not lo <= x <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")
        return x

    return parse


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    raise ValueError("must be true or false")


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v.strip()


def _ae(v: Any) -> str:
    s = _str(v)
    if not _AE_RE.match(s):
        raise ValueError("must be 1-16 printable characters without backslash")
    return s


def _path(v: Any) -> Path:
    return Path(_str(v)).expanduser()


def _regex(v: Any) -> str | None:
    if v is None or v == "":
        return None
    s = _str(v)
    try:
        re.compile(s)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from exc
    return s


def _strings(v: Any) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be a list of strings")
    return tuple(i.strip().upper() for i in items if i.strip())


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


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None or v == "" else parse(v)


def _late_policy(v: Any) -> str:
    s = _str(v).lower()
    if s not in LATE_POLICIES:
        raise ValueError(f"must be one of {', '.join(LATE_POLICIES[:3])}")
    return "flag" if s == "ignore" else s


_PORT = _int(1, 65535)
_DICOM: dict[str, Callable[[Any], Any]] = {
    "ae_title": _ae,
    "port": _int(0, 65535),  # 0: any free port (tests)
    "host": _str,
    "max_pdu": _int(0, 2**31 - 1),
    "return_to_sender": _bool,
    "accept_rtstruct": _bool,
    "network_timeout_s": _float(1.0, 3600.0),
    "max_instance_mb": _int(1, 4096),
}
_TLS: dict[str, Callable[[Any], Any]] = {
    "cert": _optional(_path),
    "key": _optional(_path),
    "ca": _optional(_path),
}
_SELECTION: dict[str, Callable[[Any], Any]] = {
    "modalities": _strings,
    "series_description_include": _regex,
    "series_description_exclude": _regex,
    "body_parts": _strings,
    "image_type_exclude": _strings,
    "slice_thickness_mm": _range(_float(0.0)),
    "slice_count": _range(_int(1, 100_000)),
    "region_check": _bool,
}
_NODE: dict[str, Callable[[Any], Any]] = {
    "quiet_time_s": _float(0.1, 86400.0),
    "late_instance_policy": _late_policy,
    "workers": _int(1, 64),
    "worker_crash_limit": _int(1, 100),
    "inference_threads": _optional(_int(1, 256)),
    "min_island_ml": _float(0.0, 1000.0),
    "retention_h": _float(0.0),
    "min_free_disk_mb": _int(0, 10**9),
    "retry_limit": _int(1, 1000),
    "retry_backoff_s": _float(0.0, 86400.0),
    "retry_backoff_max_s": _float(0.0, 7 * 86400.0),
}
_CALLER: dict[str, Callable[[Any], Any]] = {
    "ae_title": _ae,
    "host": _optional(_str),
    "port": _optional(_PORT),
}
_DESTINATION: dict[str, Callable[[Any], Any]] = {
    "name": _str,
    "ae_title": _ae,
    "host": _str,
    "port": _PORT,
    "tls": _bool,
}
_TOP_LEVEL = ("dicom", "destinations", "selection", "node", "paths", "model", "http", "federation")


def load_settings(config: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``config`` (TOML, optional) overridden by ``RTSEG_*`` variables in ``environ``."""
    env = os.environ if environ is None else environ
    raw = _read_toml(config) if config is not None else {}
    where = str(config) if config is not None else "defaults"
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise InputError(f"unknown setting {unknown[0]!r} (known: {', '.join(_TOP_LEVEL)})", source=where)
    settings = Settings(config_file=config)
    settings = _from_file(settings, raw, where)
    settings = _from_env(settings, env)
    _check(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise InputError(f"cannot read the configuration file ({exc.strerror})", source=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML ({exc})", source=str(path)) from exc


def _table(raw: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise InputError(f"{key} must be a table", source=where)
    return value


def _parse_table(
    values: Mapping[str, Any], schema: Mapping[str, Callable[[Any], Any]], prefix: str, where: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        parse = schema.get(key)
        if parse is None:
            raise InputError(f"unknown setting {prefix}{key} (known: {', '.join(schema)})", source=where)
        try:
            out[key] = parse(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{prefix}{key} {exc}", source=where) from exc
    return out


def _from_file(s: Settings, raw: Mapping[str, Any], where: str) -> Settings:
    dicom = dict(_table(raw, "dicom", where))
    tls = _parse_table(_table(dicom, "tls", where), _TLS, "dicom.tls.", where)
    callers = dicom.pop("allowed_callers", [])
    dicom.pop("tls", None)
    d = replace(s.dicom, **_parse_table(dicom, _DICOM, "dicom.", where), tls=TlsSettings(**tls))
    d = replace(d, allowed_callers=tuple(_records(callers, _CALLER, "dicom.allowed_callers", where, Caller)))
    paths = _parse_table(_table(raw, "paths", where), {"data_dir": _path}, "paths.", where)
    model = _parse_table(_table(raw, "model", where), {"path": _optional(_path)}, "model.", where)
    return replace(
        s,
        dicom=d,
        destinations=tuple(
            _records(raw.get("destinations", []), _DESTINATION, "destinations", where, Destination)
        ),
        selection=Selection(**_parse_table(_table(raw, "selection", where), _SELECTION, "selection.", where)),
        node=NodeSettings(**_parse_table(_table(raw, "node", where), _NODE, "node.", where)),
        data_dir=paths.get("data_dir", s.data_dir),
        model_path=model.get("path", s.model_path),
        http=MappingProxyType(dict(_table(raw, "http", where))),
        federation=MappingProxyType(dict(_table(raw, "federation", where))),
    )


def _records(
    values: Any, schema: Mapping[str, Callable[[Any], Any]], key: str, where: str, cls: Any
) -> list[Any]:
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise InputError(f"{key} must be a list of tables", source=where)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    out = []
    for i, value in enumerate(values):
        parsed = _parse_table(value, schema, f"{key}[{i}].", where)
        missing = [name for name in required if name not in parsed]
        if missing:
            raise InputError(f"{key}[{i}].{missing[0]} is required", source=where)
        out.append(cls(**parsed))
    return out


def _from_env(s: Settings, env: Mapping[str, str]) -> Settings:
    ours = {k[len(ENV_PREFIX) :]: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    if "DATA_DIR" in ours:
        s = replace(s, data_dir=_env_value(_path, ours, "DATA_DIR"))
    if "MODEL_PATH" in ours:
        s = replace(s, model_path=_env_value(_optional(_path), ours, "MODEL_PATH"))
    tls = {
        k: _env_value(p, ours, f"DICOM_TLS_{k.upper()}")
        for k, p in _TLS.items()
        if f"DICOM_TLS_{k.upper()}" in ours
    }
    s = replace(s, dicom=replace(s.dicom, tls=replace(s.dicom.tls, **tls)))
    s = replace(s, dicom=replace(s.dicom, **_env_section(_DICOM, "DICOM", ours)))
    s = replace(s, selection=replace(s.selection, **_env_section(_SELECTION, "SELECTION", ours)))
    s = replace(s, node=replace(s.node, **_env_section(_NODE, "NODE", ours)))
    if "DICOM_ALLOWED_CALLERS" in ours:
        callers = _env_value(_callers, ours, "DICOM_ALLOWED_CALLERS")
        s = replace(s, dicom=replace(s.dicom, allowed_callers=callers))
    if "DESTINATIONS" in ours:
        s = replace(s, destinations=_env_value(_destinations, ours, "DESTINATIONS"))
    return s


def _env_section(
    schema: Mapping[str, Callable[[Any], Any]], section: str, ours: Mapping[str, str]
) -> dict[str, Any]:
    names = {f"{section}_{key.upper()}": key for key in schema}
    return {key: _env_value(schema[key], ours, name) for name, key in names.items() if name in ours}


def _env_value(parse: Callable[[Any], Any], ours: Mapping[str, str], name: str) -> Any:
    try:
        return parse(ours[name])
    except (ValueError, TypeError) as exc:
        raise InputError(f"{ENV_PREFIX}{name} {exc}", source="environment") from exc


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
