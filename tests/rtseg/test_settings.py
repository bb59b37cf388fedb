"""rtseg.settings: defaults, TOML, RTSEG_* overrides, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rtseg.errors import InputError
from rtseg.settings import Caller, Destination, Settings, load_settings

FULL = """
[dicom]
ae_title = "RTSEG_TEST"
port = 104
host = "127.0.0.1"
max_pdu = 0
return_to_sender = true
allowed_callers = [{ae_title = "PACS", host = "10.0.0.5", port = 4242}, {ae_title = "CT1"}]

[[destinations]]
name = "tps"
ae_title = "ECLIPSE"
host = "10.0.0.7"
port = 105

[selection]
modalities = ["CT"]
series_description_include = "abd|thorax"
series_description_exclude = "(?i)scout"
body_parts = ["abdomen"]
slice_thickness_mm = [0.5, 5]
slice_count = [30, 1500]

[node]
quiet_time_s = 20
late_instance_policy = "reject"
workers = 2
inference_threads = 2
min_island_ml = 0
retention_h = 48
min_free_disk_mb = 2048
retry_limit = 5
retry_backoff_s = 2
retry_backoff_max_s = 60

[paths]
data_dir = "/srv/rtseg"

[model]
path = "/srv/models/abdomen"

[http]
port = 8080
anything = {nested = true}

[federation]
site = "a"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rtseg.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_node() -> None:
    s = load_settings(environ={})
    assert (s.dicom.ae_title, s.dicom.port, s.dicom.allowed_callers) == ("RTSEG", 11112, ())
    assert s.destinations == () and s.model_path is None
    assert s.data_dir == Path("rtseg-data")
    assert s.selection.image_type_exclude == ("LOCALIZER", "SCOUT", "TOPOGRAM")
    assert s.node.late_instance_policy == "supersede" and not s.dicom.tls.enabled
    from rtseg.model.inference import MIN_ISLAND_ML

    assert s.node.min_island_ml == MIN_ISLAND_ML  # the node's default is the inference path's


def test_full_file(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, FULL), environ={})
    assert s.dicom.ae_title == "RTSEG_TEST" and s.dicom.port == 104 and s.dicom.max_pdu == 0
    assert s.dicom.allowed_callers == (Caller("PACS", "10.0.0.5", 4242), Caller("CT1"))
    assert s.destinations == (Destination("tps", "ECLIPSE", "10.0.0.7", 105),)
    assert s.selection.body_parts == ("ABDOMEN",) and s.selection.slice_count == (30, 1500)
    assert s.selection.slice_thickness_mm == (0.5, 5.0)
    assert s.node.workers == 2 and s.node.late_instance_policy == "reject"
    assert s.node.min_island_ml == 0.0
    assert s.data_dir == Path("/srv/rtseg") and s.model_path == Path("/srv/models/abdomen")
    assert s.http == {"port": 8080, "anything": {"nested": True}}  # kept raw for service/
    assert s.federation == {"site": "a"}


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "RTSEG_DICOM_PORT": "11113",
        "RTSEG_DATA_DIR": "/data/x",
        "RTSEG_MODEL_PATH": "/m",
        "RTSEG_NODE_QUIET_TIME_S": "2.5",
        "RTSEG_NODE_INFERENCE_THREADS": "",
        "RTSEG_DICOM_RETURN_TO_SENDER": "false",
        "RTSEG_SELECTION_MODALITIES": "CT, PT",
        "RTSEG_DICOM_ALLOWED_CALLERS": "ORTHANC@127.0.0.1:4242,CT2",
        "RTSEG_DESTINATIONS": "pacs=ORTHANC@127.0.0.1:4242,tps=TPS@10.1.1.1:104",
        "OTHER_VAR": "ignored",
    }
    s = load_settings(_write(tmp_path, FULL), environ=env)
    assert s.dicom.port == 11113 and s.dicom.ae_title == "RTSEG_TEST"
    assert s.data_dir == Path("/data/x") and s.model_path == Path("/m")
    assert s.node.quiet_time_s == 2.5 and s.node.inference_threads is None and s.node.workers == 2
    assert not s.dicom.return_to_sender
    assert s.selection.modalities == ("CT", "PT")
    assert s.dicom.allowed_callers == (Caller("ORTHANC", "127.0.0.1", 4242), Caller("CT2"))
    assert [d.name for d in s.destinations] == ["pacs", "tps"] and s.destinations[1].port == 104


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[dicom]\nport = 70000\n", {}, "dicom.port must be between"),
        ("[dicom]\nport = 'x'\n", {}, "dicom.port"),
        ("[dicom]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", {}, "dicom.ae_title"),
        ("[dicom]\nprot = 1\n", {}, "unknown setting dicom.prot"),
        ("[dicmo]\n", {}, "unknown setting 'dicmo'"),
        ("[node]\nlate_instance_policy = 'resend'\n", {}, "node.late_instance_policy must be one of"),
        ("[node]\nworkers = 0\n", {}, "node.workers"),
        ("[node]\nengine = 'tensorrt'\n", {}, "node.engine must be one of auto, torch, onnxruntime"),
        ("", {"RTSEG_NODE_ENGINE": "onnx"}, "RTSEG_NODE_ENGINE must be one of"),
        ("[node]\nworker_crash_limit = 0\n", {}, "node.worker_crash_limit"),
        ("[selection]\nseries_description_include = '('\n", {}, "selection.series_description_include"),
        ("[selection]\nslice_count = [100, 10]\n", {}, "selection.slice_count min must not exceed max"),
        ("[[destinations]]\nname = 'x'\nhost = 'h'\nport = 1\n", {}, "destinations[0].ae_title is required"),
        ("[dicom.tls]\ncert = '/nonexistent.pem'\n", {}, "dicom.tls.cert and dicom.tls.key"),
        ("dicom = 3\n", {}, "dicom must be a table"),
        ("not toml [", {}, "not valid TOML"),
        ("", {"RTSEG_DICOM_PORT": "abc"}, "RTSEG_DICOM_PORT must be an integer"),
        ("", {"RTSEG_DESTINATIONS": "pacs=ORTHANC@127.0.0.1"}, "RTSEG_DESTINATIONS has a bad entry"),
        (
            "",
            {"RTSEG_NODE_RETRY_BACKOFF_MAX_S": "1", "RTSEG_NODE_RETRY_BACKOFF_S": "5"},
            "retry_backoff_max_s",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_settings(_write(tmp_path, text), environ=env)


def test_engine_defaults_to_auto_and_reads_the_environment() -> None:
    assert load_settings(environ={}).node.engine == "auto"
    assert load_settings(environ={"RTSEG_NODE_ENGINE": "OnnxRuntime"}).node.engine == "onnxruntime"


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the configuration file"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_settings_are_frozen() -> None:
    s = load_settings(environ={})
    with pytest.raises(AttributeError):
        s.dicom.port = 1  # type: ignore[misc]


def test_late_instance_policy_ignore_no_longer_drops_instances() -> None:
    # "ignore" dropped the rest of a series silently; it now keeps it and flags the job
    s = load_settings(environ={"RTSEG_NODE_LATE_INSTANCE_POLICY": "ignore"})
    assert s.node.late_instance_policy == "flag" and s.node.worker_crash_limit == 3


# -- one mechanism for every table: RTSEG_<TABLE>_<KEY>, one message style for a bad value ----
SITE = '[federation]\ncoordinator = "127.0.0.1:9092"\nsite_id = "site-a"\ninsecure = true\n'


def _parse_faces(s: Settings) -> None:
    """Parse the tables the core keeps raw, as ``rtseg serve`` does before it listens."""
    from rtseg.closed_loop import config_from_settings
    from rtseg.federation.schedule import SiteSettings

    config_from_settings(s.federation)
    SiteSettings.from_mapping(s.federation, "[federation]", s.data_dir)


@pytest.mark.parametrize(
    ("table", "key", "value", "reason"),
    [
        ("dicom", "port", "70000", "must be between 0 and 65535"),
        ("node", "workers", "0", "must be between 1 and 64"),
        ("federation", "threads", "0", "must be between 1 and 256"),
        ("federation", "max_memory_gb", "1.5", "must be at least 2"),
        ("federation.closed_loop", "window_h", "-1", "must be between 0 and 1e+06"),
    ],
)
def test_a_bad_value_reads_the_same_in_every_table(
    tmp_path: Path, table: str, key: str, value: str, reason: str
) -> None:
    header = "" if table == "federation" else f"[{table}]\n"
    config = _write(tmp_path, f"{SITE}{header}{key} = {value}\n")
    with pytest.raises(InputError) as in_file:
        _parse_faces(load_settings(config, environ={}))
    assert str(in_file.value) == f"{config}: {table}.{key} {reason}, got {value}"
    variable = f"RTSEG_{table.replace('.', '_').upper()}_{key.upper()}"
    with pytest.raises(InputError) as in_env:
        _parse_faces(load_settings(_write(tmp_path, SITE), environ={variable: value}))
    assert str(in_env.value) == f"environment: {variable} {reason}, got '{value}' ({table}.{key})"


def test_every_table_takes_environment_overrides_by_one_rule(tmp_path: Path) -> None:
    from rtseg.closed_loop import config_from_settings
    from rtseg.federation.schedule import SiteSettings

    env = {
        "RTSEG_DICOM_MAX_PDU": "0",
        "RTSEG_HTTP_PORT": "9001",
        "RTSEG_FEDERATION_THREADS": "3",
        "RTSEG_FEDERATION_CLOSED_LOOP_WINDOW_H": "12",
        "RTSEG_FEDERATION_CLOSED_LOOP_APPROVED_LABELS": "CLINICAL, REVIEWED",
    }
    s = load_settings(_write(tmp_path, SITE + "threads = 1\n[dicom]\nmax_pdu = 16384\n"), environ=env)
    assert s.dicom.max_pdu == 0
    assert s.http["port"] == "9001"  # parsed by service/ (tests/service/test_http_settings.py)
    assert SiteSettings.from_mapping(s.federation, "[federation]", s.data_dir).threads == 3
    loop = config_from_settings(s.federation)
    assert loop.window_h == 12.0 and loop.approved_labels == ("CLINICAL", "REVIEWED")


def test_an_unknown_variable_of_a_table_is_refused_by_name() -> None:
    with pytest.raises(InputError) as info:
        _parse_faces(load_settings(environ={"RTSEG_FEDERATION_CLOSED_LOOP_ADD_CASE": "true"}))
    assert str(info.value).startswith(
        "environment: unknown setting RTSEG_FEDERATION_CLOSED_LOOP_ADD_CASE (federation.closed_loop.add_case;"
    )


def test_long_series_chunking_is_a_node_setting(tmp_path: Path) -> None:
    assert load_settings(environ={}).node.chunk_slices == 300  # short series stay one piece
    s = load_settings(
        _write(tmp_path, "[node]\nchunk_slices = 0\n"), environ={"RTSEG_NODE_CHUNK_SLICES": "120"}
    )
    assert s.node.chunk_slices == 120
    assert load_settings(_write(tmp_path, "[node]\nchunk_slices = 0\n"), environ={}).node.chunk_slices == 0
    with pytest.raises(InputError, match="node.chunk_slices"):
        load_settings(_write(tmp_path, "[node]\nchunk_slices = -5\n"), environ={})


def test_a_sites_training_memory_defaults_to_three_quarters_of_the_machine_and_reaches_its_node_config(
    tmp_path: Path,
) -> None:
    from rtseg.federation.schedule import SiteSettings, default_max_memory_gb
    from rtseg.federation.task import Site, site_config
    from rtseg.model.cpu import CpuConfig

    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert default_max_memory_gb() == pytest.approx(0.75 * total_gb, abs=0.06)
    site_toml = SITE + 'data_dir = "d"\nwork_dir = "w"\n'
    settings = SiteSettings.from_toml(_write(tmp_path, site_toml), environ={})
    assert settings.max_memory_gb == default_max_memory_gb()
    assert f"training memory at most {settings.max_memory_gb:g} GB" in settings.describe()
    settings = SiteSettings.from_toml(_write(tmp_path, site_toml + "max_memory_gb = 6\n"), environ={})
    assert settings.max_memory_gb == 6.0
    site = Site.from_node_config({"site-id": "a", "data-dir": "d", "work-dir": "w", "max-memory-gb": 6.0})
    # the coordinator's settings cannot lift the site's limit
    assert site_config(site, CpuConfig(memory_gb=500.0)).memory_gb == 6.0
    assert "memory_gb" not in CpuConfig().to_dict()  # settings written before the limit read the same
