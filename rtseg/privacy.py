"""What logs, paths and audit records show instead of DICOM identifiers."""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtseg.settings import LoggingSettings

KEY_CHARS = 24  # hex characters of a SHA-256: 96 bits, no collisions in practice


def uid_key(uid: str) -> str:
    """Stable, path-safe key of a UID: the same series has the same key in every log and folder."""
    return hashlib.sha256(f"rtseg-uid/{uid}".encode()).hexdigest()[:KEY_CHARS]


# a DICOM UID (12+ characters of digits and dots, 3+ components, e.g. "2.25.<uuid digits>") or its tail as
# error messages print it ("…" + digits); version numbers and millimetres are too short to match
_UID_TEXT = re.compile(r"(?<![\w.])(?:(?=[\d.]{12,})\d+(?:\.\d+){2,}|…[\d.]{6,})(?![\w.])")


def redact_uids(text: str) -> str:
    """``text`` with every DICOM UID (or printed UID tail) replaced by ``<uid>``, for logs."""
    return _UID_TEXT.sub("<uid>", text)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """A log formatter whose whole output, tracebacks included, passes through :func:`redact_uids`.

    Every handler rtseg installs uses it, so a UID that reaches a log line by
    way of an exception message (a failed job, an unexpected error) is still
    replaced by ``<uid>``.
    """

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        return redact_uids(super().format(record))


# a value as repr() prints it ('…', "…", b'…'), as pydicom quotes an invalid value in a warning
_QUOTED = re.compile(r"b?'(?:[^'\\\n]|\\.)*'" r'|b?"(?:[^"\\\n]|\\.)*"')
# pydicom's own logger and Python's warnings (pydicom warns through both)
_VALUE_LOGGERS = ("pydicom", "py.warnings")


class QuotedValueFilter(logging.Filter):
    """Replaces every quoted value in a record's message by ``<value>``.

    pydicom's warnings about an invalid value quote the value, and in a malformed
    data set that "value" can be any of its bytes, the patient's name included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _QUOTED.sub("<value>", record.getMessage())
        record.args = ()
        return True


def configure_logging(level: int | str) -> None:
    """Root logging to stderr through :class:`RedactingFormatter`, unless the process already has handlers.

    pydicom's log records and Python's warnings lose the values they quote, in
    every case; warnings go to the log (not straight to stderr) when this sets it up.
    """
    for name in _VALUE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuotedValueFilter) for f in logger.filters):
            logger.addFilter(QuotedValueFilter())
    if logging.getLogger().handlers:  # e.g. a host application or pytest: leave its logging alone
        return
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter())
    handler.setLevel(level)  # a log file added later may take more than stderr shows
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)


LOG_FILE = Path("logs") / "rtseg.log"  # under the data directory


def start_log_file(data_dir: Path, settings: LoggingSettings) -> Path | None:
    """Also log to ``<data_dir>/logs/rtseg.log``, rotated, through :class:`RedactingFormatter`.

    For the long-running commands (``rtseg serve``, ``rtseg http``): the file keeps
    ``settings.level`` and above (INFO: one line per job outcome) whatever stderr shows.
    Returns the file, or None when ``[logging] file = false``.
    """
    if not settings.file:
        return None
    path = Path(data_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=settings.max_mb << 20, backupCount=settings.backups, encoding="utf-8"
    )
    handler.setFormatter(RedactingFormatter())
    handler.setLevel(settings.level)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.getEffectiveLevel(), handler.level))
    return path


def forward_logs(queue: Any, level: int) -> None:
    """In a child process: every record goes to ``queue``, for the parent's handlers to write.

    One process owns the log file, so rotation never races; the parent's
    :class:`RedactingFormatter` sees the child's lines too.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(queue))
    root.setLevel(level)
    for name in _VALUE_LOGGERS:
        logging.getLogger(name).addFilter(QuotedValueFilter())
    logging.captureWarnings(True)


LISTENER_STOP_S = 5.0  # how long stopping waits for the workers' last log records


class _Listener(logging.handlers.QueueListener):
    """A queue listener whose ``stop`` cannot hang on a worker killed while it wrote.

    A multiprocessing queue's writers share one lock; a worker killed with
    SIGKILL while holding it (it was sending a record) holds it for ever, so the
    sentinel ``stop`` sends never arrives and ``QueueListener.stop`` (and the
    queue's feeder thread at exit) would wait for ever. Here ``stop`` waits
    :data:`LISTENER_STOP_S`, then leaves the daemon thread and the queue behind.
    """

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self.enqueue_sentinel()
        thread.join(LISTENER_STOP_S)
        if thread.is_alive():
            logging.getLogger(__name__).warning(
                "worker log queue blocked (a worker was killed while logging): its last records are lost"
            )
            cancel = getattr(self.queue, "cancel_join_thread", None)
            if cancel is not None:
                cancel()  # else the interpreter's exit waits for the queue's feeder thread
        self._thread = None


def listen_for_logs(queue: Any) -> logging.handlers.QueueListener:
    """The parent's side of :func:`forward_logs`: started, writing to the root logger's handlers."""
    listener = _Listener(queue, *logging.getLogger().handlers, respect_handler_level=True)
    listener.start()
    return listener
