"""Structured logs: one JSON object per line, on stderr.

Each line carries ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``node``, ``logger``,
``msg`` (an event name such as ``leader_changed``) and the event's fields::

    {"ts":"2024-05-01T12:00:00.123Z","level":"info","node":"n1",
     "logger":"liferaft.node","msg":"leader_changed","term":3,"leader":"n2"}

Call sites use the standard loggers and ``event``::

    log = logging.getLogger("liferaft.node")
    event(log, "leader_changed", term=3, leader="n2")

The node id comes with the record, not from process state: ``event`` captures the
node bound to the calling task (``bind_node`` / ``node_context``, a contextvar that
Trio child tasks inherit from the task that spawns them), so several nodes in one
process each log their own id. A record without one falls back to the id given to
``configure`` (the single node of a ``liferaft node`` process).

No secret is ever written: fields named like a secret (``SENSITIVE_KEYS``) are masked
by the formatter itself, at any depth, and bytes are logged only as their length.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TextIO

#: Field names whose values are never logged (compared case-insensitively). A "key" is
#: a key-value store key, which the audit log must show; a private key is "private_key".
SENSITIVE_KEYS: Final = frozenset(
    {
        "token",
        "authorization",
        "password",
        "value",
        "secret",
        "private_key",
        "access_token",
        "refresh_token",
        "jwt",
        "cookie",
    }
)
REDACTED: Final = "<redacted>"

_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("liferaft_node_id", default=None)

# The record attribute ``event`` stores its fields under (a dict, so that field names
# such as ``name`` or ``args`` cannot clash with LogRecord's own attributes).
_FIELDS_ATTR: Final = "liferaft_fields"
_NODE_ATTR: Final = "node"
# Keys of the JSON object set by the formatter; a field with one of these names is
# written with a trailing underscore instead.
_BASE_KEYS: Final = frozenset({"ts", "level", "node", "logger", "msg", "exc", "stack"})
# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRS: Final = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    _FIELDS_ATTR,
    _NODE_ATTR,
}
_MAX_DEPTH: Final = 8


# -------------------------------------------------------------------- node binding


def bind_node(node_id: str) -> contextvars.Token[str | None]:
    """Bind ``node_id`` to the current context: this task and every task it spawns
    afterwards. Returns the token for ``contextvars.ContextVar.reset``."""
    return _node.set(node_id)


class LastError:
    """Where a node's tasks record its last error-level event (``liferaft status`` shows
    it, so an operator sees a node's latest trouble without its logs)."""

    def __init__(self) -> None:
        self.last: dict[str, object] | None = None  # {"event", "at" (Unix time)}

    def record(self, name: str) -> None:
        # Only the event's name and time: its fields may say more than a read-role
        # token should see (status is a read op); the node's log has them.
        self.last = {"event": name, "at": time.time()}


_errors: contextvars.ContextVar[LastError | None] = contextvars.ContextVar(
    "liferaft_last_error", default=None
)


@contextlib.contextmanager
def node_context(node_id: str, errors: LastError | None = None) -> Iterator[None]:
    """``with node_context("n1"):`` binds the node id for the block (see bind_node), and
    ``errors`` as where its error events are recorded."""
    token = _node.set(node_id)
    errors_token = _errors.set(errors) if errors is not None else None
    try:
        yield
    finally:
        if errors_token is not None:
            _errors.reset(errors_token)
        _node.reset(token)


def current_node() -> str | None:
    """The node id bound to the calling task, if any."""
    return _node.get()


# -------------------------------------------------------------------- redaction


def _is_sensitive(key: object) -> bool:
    return isinstance(key, str) and key.lower() in SENSITIVE_KEYS


_PLAIN: Final = (str, int, float, bool, type(None))
_SCALAR: Final = (str, int, bool, type(None))  # as JSON carries them (a float may not be finite)


def _redact_value(value: object, depth: int) -> object:
    if type(value) in _PLAIN:  # the usual case, and a list of keys: nothing to look into
        return value
    if type(value) is list and all(type(v) is str for v in value):
        return value
    if depth > _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _is_sensitive(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v, depth + 1) for v in value]
    return value


# -------------------------------------------------------------------- formatting


def _jsonable(value: object, depth: int = 0) -> object:
    """``value`` as JSON can carry it: bytes as their length (they may be user values),
    non-finite floats and unknown types as strings."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if type(value) is list and all(type(v) is str for v in value):  # keys, of an audit
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if depth > _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return str(value)


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def format_ts(created: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``. The text of
    a second is kept until the next: every write is audited, and strftime was an eighth
    of a record's cost."""
    global _second
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    last, text = _second
    if seconds != last:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)  # one assignment: threads that log may race here
    return f"{text}.{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring)."""

    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        node = getattr(record, _NODE_ATTR, None) or current_node() or self.node_id
        out: dict[str, object] = {
            "ts": format_ts(record.created),
            "level": record.levelname.lower(),
            "node": node,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, _FIELDS_ATTR, None)
        if isinstance(extra, Mapping):  # from event(): its fields are all there is
            fields = dict(extra)
        else:
            fields = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
        for k, v in fields.items():  # a copy, secrets masked at any depth, JSON-safe
            if _is_sensitive(k):
                v = REDACTED
            elif type(v) not in _SCALAR:  # a scalar needs neither step
                v = _jsonable(_redact_value(v, 1))
            out[f"{k}_" if k in _BASE_KEYS else k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=True, separators=(",", ":"), default=str)


# -------------------------------------------------------------------- call sites


def event(
    logger: logging.Logger | logging.LoggerAdapter[Any],
    name: str,
    /,
    *,
    level: int = logging.INFO,
    exc_info: Any = None,
    **fields: object,
) -> None:
    """Log the event ``name`` with ``fields``, tagged with the calling task's node id:
    ``event(log, "leader_changed", term=3, leader="n2")``."""
    target: Any = logger
    if isinstance(logger, logging.LoggerAdapter):
        fields = {**(logger.extra or {}), **fields}
        target = logger.logger
        while isinstance(target, logging.LoggerAdapter):
            target = target.logger
    base: logging.Logger = target
    if level >= logging.ERROR and (errors := _errors.get()) is not None:
        errors.record(name)
    if not base.isEnabledFor(level):
        return
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    # makeRecord and handle, not log(): log() looks up the caller's file and line by
    # walking the stack, which no line of ours shows, and it cost a fifth of an event.
    record = base.makeRecord(
        base.name,
        level,
        "(event)",
        0,
        name,
        (),
        exc_info or None,
        extra={_FIELDS_ATTR: fields, _NODE_ATTR: _node.get()},
    )
    base.handle(record)


# -------------------------------------------------------------------- setup

_installed: list[tuple[logging.Handler, int]] = []  # (our handler, root's previous level)


AUDIT_LOGGER = "liferaft.audit"


def configure(
    node_id: str,
    stream: TextIO | None = None,
    level: int | str = "INFO",
    audit_file: Path | None = None,
) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr by default) as JSON
    lines, at ``level`` and above; records not bound to a node are tagged ``node_id``.
    Audit records are written whatever ``level`` says: with the rest, or to
    ``audit_file`` alone (see ``AuditFile``). Calling it again replaces the previous
    setup. Returns the installed handler."""
    reset()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(node_id))
    root = logging.getLogger()
    _installed.append((handler, root.level))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    audit = logging.getLogger(AUDIT_LOGGER)
    audit.setLevel(logging.INFO)  # never dropped for the log's level
    if audit_file is not None:
        file_handler = AuditFile(audit_file)
        file_handler.setFormatter(JsonFormatter(node_id))
        audit.addHandler(file_handler)
        audit.propagate = False
        _audit_files.append(file_handler)
    return handler


class AuditFile(logging.StreamHandler):  # type: ignore[type-arg]
    """Audit records as JSON lines appended to a file (created private: records name
    keys), flushed per record; ``reopen`` (on SIGHUP) starts writing to whatever file is
    at the path now, so that logrotate can move the old one away."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> TextIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.setStream(self._open())
            if old is not None:
                old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
            super().close()


def reopen_audit_files() -> None:
    """SIGHUP: reopen the audit file (logrotate)."""
    for handler in _audit_files:
        handler.reopen()


_audit_files: list[AuditFile] = []


def reset() -> None:
    """Undo ``configure``: remove its handlers and restore the loggers' levels."""
    audit = logging.getLogger(AUDIT_LOGGER)
    while _audit_files:
        h = _audit_files.pop()
        audit.removeHandler(h)
        h.close()
    audit.propagate = True
    audit.setLevel(logging.NOTSET)
    root = logging.getLogger()
    while _installed:
        handler, previous_level = _installed.pop()
        root.removeHandler(handler)
        root.setLevel(previous_level)
