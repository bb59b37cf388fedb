"""The rotating log file under the data folder: INFO lines without -v, no patient data, worker lines too."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

SCRIPT = textwrap.dedent(
    """
    import logging, multiprocessing as mp, sys
    from pathlib import Path
    from rtseg.privacy import configure_logging, forward_logs, listen_for_logs, start_log_file
    from rtseg.settings import LoggingSettings

    def child(queue):
        forward_logs(queue, logging.INFO)
        logging.getLogger("rtseg.worker").info("job w1 segmented in 1.0 s → done")

    if __name__ == "__main__":
        data = Path(sys.argv[1])
        configure_logging(logging.WARNING)  # `rtseg serve` without -v
        path = start_log_file(data, LoggingSettings(max_mb=1, backups=2))
        log = logging.getLogger("rtseg.jobs")
        log.info("job j1 done")
        log.info("series 1.2.826.0.1.3680043.8.498.1234567 received")
        logging.getLogger("pydicom").warning("Invalid value for VR PN: 'DOE^JANE'")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        listener = listen_for_logs(queue)
        proc = ctx.Process(target=child, args=(queue,))
        proc.start(); proc.join(); listener.stop()
        for i in range(3000):
            log.info("filler %05d %s", i, "x" * 800)
        print(path)
    """
)


def test_log_file_rotates_redacts_and_keeps_info_without_verbose(tmp_path: Path) -> None:
    script = tmp_path / "logs_demo.py"
    script.write_text(SCRIPT)
    data = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, str(script), str(data)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == data / "logs" / "rtseg.log"
    files = sorted(p.name for p in (data / "logs").iterdir())
    assert files == ["rtseg.log", "rtseg.log.1", "rtseg.log.2"]  # rotated at 1 MB, two kept
    text = "".join((data / "logs" / name).read_text() for name in files[::-1])
    assert "INFO rtseg.jobs: job j1 done" in text  # INFO in the file without -v
    assert "job w1 segmented in 1.0 s → done" in text  # a worker process's line, through the parent
    assert "series <uid> received" in text
    assert "DOE^JANE" not in text and "JANE" not in text and "<value>" in text
    assert "1.2.826.0.1.3680043" not in text
    assert "job j1 done" not in run.stderr  # stderr stays at WARNING without -v
    assert "<value>" in run.stderr and "DOE" not in run.stderr


def _hold_the_write_lock(queue: Any) -> None:
    queue._wlock.acquire()  # what a worker holds while it sends a record
    time.sleep(600)


def test_stopping_the_log_listener_does_not_hang_on_a_worker_killed_while_logging() -> None:
    """A worker SIGKILLed while holding the queue's write lock: the node still stops."""
    import multiprocessing as mp

    from rtseg.privacy import LISTENER_STOP_S, listen_for_logs

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    listener = listen_for_logs(queue)
    holder = mp.get_context("fork").Process(target=_hold_the_write_lock, args=(queue,))
    holder.start()
    time.sleep(2.0)  # the child has the lock
    holder.kill()
    holder.join()
    done = threading.Event()
    threading.Thread(target=lambda: (listener.stop(), done.set()), daemon=True).start()
    assert done.wait(LISTENER_STOP_S + 10), "the listener's stop hung on the dead worker's lock"
