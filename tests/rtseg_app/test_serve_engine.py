"""``rtseg serve`` refuses at startup an ``[node] engine`` whose runtime is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rtseg.net import free_port

# onnxruntime is installed here: the child hides it, as on a node installed without the extra
HIDE_ORT = (
    "import sys; sys.modules['onnxruntime'] = None\n"
    "from rtseg_app.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_serve_without_the_engine_package_names_the_extra_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    data = tmp_path / "data"
    config.write_text(
        f'[dicom]\nport = {free_port()}\nhost = "127.0.0.1"\n[node]\nengine = "onnxruntime"\n'
        f'[paths]\ndata_dir = "{data}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_ORT, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "engine 'onnxruntime' needs onnxruntime, which is not installed" in proc.stderr
    assert 'pip install "rtseg[onnx]"' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout  # stopped before anything listened
