"""Log setup: one JSON object per line in production, readable lines in dev; secrets scrubbed."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from authsvc.crypto.secrets import SECRET_PREFIX

__all__ = [
    "AUDIT_FIELDS",
    "RPC_FIELDS",
    "HumanFormatter",
    "JsonFormatter",
    "configure_logging",
    "redact",
    "rpc_context",
]

# Per-call fields, set by the RPC interceptor and added to every record logged during the call
# (the servicer's own audit lines included), so one request id ties them together.
RPC_FIELDS = ("request_id", "method", "peer", "outcome", "duration_ms")
# An audit event's fields, each its own member of the line (the event text stays "audit"), so
# an id holding `outcome=ok actor=…` is one value and cannot pose as another field.
AUDIT_FIELDS = ("action", "actor", "target", "outcome", "peer", "request_id")
_RECORD_FIELDS = tuple(dict.fromkeys(RPC_FIELDS + AUDIT_FIELDS))
_rpc: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "authsvc_rpc_log_fields", default=None
)

# A JWT (three base64url parts, header starting `{"`), a service secret, a bearer header value.
_SECRET_PATTERNS = (
    re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    re.compile(re.escape(SECRET_PREFIX) + r"[A-Za-z0-9_-]+"),
    re.compile(r"(?i)(bearer\s+)\S+"),
)


# Every pattern above needs one of these (case-folded) to match: a text without any cannot hold a
# secret, and most log lines (every access line) skip the three regex passes.
_SECRET_MARKERS = ("eyj", SECRET_PREFIX.lower(), "bearer")
_MARKER_A, _MARKER_B, _MARKER_C = _SECRET_MARKERS


def redact(text: str) -> str:
    """Scrub anything shaped like a token or a secret: a second line of defence, not the first."""
    folded = text.lower()
    # Three `in` tests, not any() over a generator: this runs for every field of every log
    # line (an audit line has seven), and the generator cost more than the tests.
    if not (_MARKER_A in folded or _MARKER_B in folded or _MARKER_C in folded):
        return text
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(
            lambda m: (m.group(1) if m.re.groups else "") + "[REDACTED]",
            text,
        )
    return text


# What a caller's `x-request-id` may hold to reach logs and audit rows as given: no space, quote,
# `=` or control character, so it can neither split a log line nor pose as another field.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's `x-request-id` if it fits a safe grammar, else a fresh one.

    Only the RPC interceptor calls this; everything else reads the id of the current call
    through `current_request_id()`, so logs and audit rows carry the same id.
    """
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            if redact(value) == value:
                return value
    return uuid.uuid4().hex


class Deferred:
    """A per-call field worked out only when a log line or an audit row first reads it.

    Most calls (a successful ValidateToken, a health check) write neither, and for them making
    a request id was a measurable share of the server's CPU per call (BENCHMARKS.md). Once
    read, the value replaces this in the call's fields, so every line and row of one call
    carries the same request id. It may be read from any thread the call's context was
    copied to (the login batch's, a worker's), so it must not touch the gRPC call: the
    request id is made from the metadata alone.
    """

    __slots__ = ("_arg", "_fn")

    def __init__(self, fn: Callable[..., Any], *arg: Any) -> None:
        self._fn = fn
        self._arg = arg

    def resolve(self) -> Any:
        return self._fn(*self._arg)


def _read(fields: dict[str, Any], key: str) -> Any:
    value = fields.get(key)
    if type(value) is Deferred:
        value = fields[key] = value.resolve()
    return value


def current_request_id() -> str | None:
    fields = _rpc.get()
    value = _read(fields, "request_id") if fields else None
    return value if isinstance(value, str) else None


def enter_rpc(fields: dict[str, Any]) -> contextvars.Token[dict[str, Any] | None]:
    """Attach per-call fields (values may be `Deferred`) to every record logged until
    `leave_rpc`; the dict may be updated in place. `rpc_context` in two calls, for the
    per-call hot path that a generator-based context manager would slow."""
    return _rpc.set(fields)


def leave_rpc(token: contextvars.Token[dict[str, Any] | None]) -> None:
    try:
        _rpc.reset(token)
    except ValueError:
        # A stream's generator that gRPC left suspended is closed later by asyncio in a task
        # of its own (a copied context): the call's context is gone, nothing to undo.
        pass


@contextmanager
def rpc_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Attach per-call fields to every record logged inside; the dict may be updated in place."""
    current = dict(fields)
    token = enter_rpc(current)
    try:
        yield current
    finally:
        leave_rpc(token)


def _fields(record: logging.LogRecord, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-call fields, then the record's own (which win), added to `out` in that order."""
    if out is None:
        out = {}
    ctx = _rpc.get()
    if ctx:
        for k in ctx:
            v = _read(ctx, k)  # an existing key: the dict keeps its size
            if v is not None:
                out[k] = v
    given = record.__dict__
    for name in _RECORD_FIELDS:
        value = given.get(name)
        if value is not None:
            out[name] = redact(value) if isinstance(value, str) else value
    return out


def _exception(record: logging.LogRecord) -> dict[str, Any]:
    """The exception's type and stack, never its message: messages may hold request data."""
    if not record.exc_info or record.exc_info[0] is None:
        return {}
    exc_type, _exc, tb = record.exc_info
    return {
        "exc_type": exc_type.__name__,
        "stack": redact("".join(traceback.format_tb(tb))),
    }


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
# The standard levels' names as a JSON line spells them; a custom level falls back to its name.
_LEVELS = {
    level: logging.getLevelName(level).lower()
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, event, then the per-call fields.

    Every RPC writes one of these, so the timestamp's whole seconds are formatted once per
    second rather than once per line.
    """

    # (whole second, its ISO 8601 text without the offset); swapped whole, so threads logging
    # at once never see a second with another second's text.
    _second: tuple[int, str] = (-1, "")

    def _timestamp(self, created: float) -> str:
        second = int(created)
        cached = self._second
        if cached[0] != second:
            stamp = datetime.fromtimestamp(second, tz=UTC).isoformat(timespec="seconds")
            cached = self._second = (second, stamp[: -len("+00:00")])
        return f"{cached[1]}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVELS.get(record.levelno)
        entry: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
            "level": level if level is not None else record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        _fields(record, entry)
        if record.exc_info:
            entry.update(_exception(record))
        return _ENCODER.encode(entry)


def _quoted(value: Any) -> str:
    """A key=value value as one token: quoted and escaped when it holds a space, a quote, an
    `=`, a control or other non-printable character (logfmt's rule), bare otherwise."""
    text = redact(str(value))
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return _ENCODER.encode(text)


class HumanFormatter(logging.Formatter):
    """Dev mode: `time LEVEL logger message key=value…`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            line = redact(super().format(record))
        finally:
            record.exc_info, record.exc_text = saved
        extra = " ".join(f"{k}={_quoted(v)}" for k, v in _fields(record).items())
        exc = _exception(record)
        if extra:
            line = f"{line} [{extra}]"
        if exc:
            line = f"{line}\n{exc['exc_type']}\n{exc['stack']}".rstrip()
        return line


def configure_logging(*, dev: bool, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every `authsvc` record (and grpc's) to one stream in the mode's format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(HumanFormatter() if dev else JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Neither formatter shows the caller's file and line, thread, process or multiprocessing
    # name; skipping their lookup is the logging documentation's own advice ("Optimization"),
    # worth about a fifth of the cost of the access line every RPC writes.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
