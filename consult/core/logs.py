"""Logging: plain or JSON lines, and an access log that never records call-link tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from consult.core import keys, security

# Call links and file links carry bearer tokens in the path or query: keep only a prefix.
_TOKEN_PATH = re.compile(r"(/(?:call|join|ws/rooms|c)/)([A-Za-z0-9_.~-]{6})[A-Za-z0-9_.~-]*")
_TOKEN_QUERY = re.compile(r"((?:token|t|sig)=)([^&]{0,4})[^&]*")


def redact(path: str) -> str:
    if "/c" in path or "/j" in path or "/w" in path:  # cheap test first: every request is logged
        path = _TOKEN_PATH.sub(r"\1\2…", path)
    return _TOKEN_QUERY.sub(r"\1\2…", path) if "=" in path else path


# Anything a stranger sends ends up here; a log line is at most this long and holds no control
# characters (no forged lines, no terminal escapes).
MAX_LOGGED_PATH = 1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# The mask_addresses setting, for requests aiohttp answers before the app sees them (a malformed
# request line has no app to ask); setup_logging sets it.
_mask_fallback = False


def _clean(text: str) -> str:
    if text.isascii() and text.isprintable() and len(text) <= MAX_LOGGED_PATH:
        return text  # nothing to escape or cut: the common case, tested cheaply
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= MAX_LOGGED_PATH else text[:MAX_LOGGED_PATH] + "…"


def _remote(request: BaseRequest) -> str | None:
    """The client address, masked to its network when the mask_addresses setting says so."""
    try:
        app = request.app  # type: ignore[attr-defined]
    except (AttributeError, AssertionError):  # no app: a request aiohttp refused before routing
        app = None
    if app is not None and keys.SETTINGS in app:
        return security.client_address(request)  # type: ignore[arg-type]
    return security.mask_address(request.remote) if _mask_fallback else request.remote


def _describe(request: BaseRequest) -> tuple[str | None, str, str]:
    """(remote, method, path) of any request, however broken; never raises."""
    try:
        remote = _remote(request)
    except Exception:
        remote = None
    try:
        method = _clean(str(request.method))
    except Exception:
        method = "?"
    try:
        # raw_path: as sent, not percent-decoded (a %0a cannot become a line break here).
        path = _clean(redact(request.raw_path))
    except Exception:
        path = "?"
    return remote, method, path


class RedactingAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time_taken: float) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        remote, method, path = _describe(request)
        status = getattr(response, "status", None)
        ms = round(time_taken * 1000, 1)
        # JSON lines carry these as fields, so that a log pipeline need not parse the message.
        http = {"remote": remote, "method": method, "path": path, "status": status, "ms": ms}
        logger.handle(_access_record(logger, (remote, method, path, status, ms), http))


ACCESS_FORMAT = '%s "%s %s" %s %.1fms'
# Per logger and thread (the event loop's, in practice): the attributes its access records share.
_record_bases: dict[tuple[str, int], dict[str, Any]] = {}


def _access_record(logger: logging.Logger, args: tuple, http: dict) -> logging.LogRecord:
    """The access line's record, as ``logger.makeRecord`` makes it (what logger.info would,
    without looking up the caller's file and line), at a fraction of its cost: every request is
    logged, and LogRecord's constructor works out the same file name, module, thread and process
    names for each. Here they are worked out once per logger and thread, by makeRecord itself, and copied;
    only the time, the arguments and the fields are the record's own. A record factory set by
    someone else (logging.setLogRecordFactory) is used as it is."""
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return logger.makeRecord(
            logger.name, logging.INFO, __file__, 0, ACCESS_FORMAT, args, None, extra={"http": http}
        )
    ident = (logger.name, threading.get_ident())
    base = _record_bases.get(ident)
    if base is None:
        made = logger.makeRecord(logger.name, logging.INFO, __file__, 0, ACCESS_FORMAT, (), None)
        base = dict(made.__dict__)
        base["_start"] = made.created - made.relativeCreated / 1000  # logging's own start time
        if len(_record_bases) > 64:  # threads come and go (tests): never a growing map
            _record_bases.clear()
        _record_bases[ident] = base
    record = logging.LogRecord.__new__(logging.LogRecord)
    fields = record.__dict__
    fields.update(base)
    ct = time.time()
    fields["created"] = ct
    fields["msecs"] = int((ct - int(ct)) * 1000) + 0.0
    fields["relativeCreated"] = (ct - fields.pop("_start")) * 1000
    fields["args"] = args
    fields["http"] = http
    if "taskName" in fields:  # Python 3.12+: the task logging now, not the template's
        fields["taskName"] = _task_name()
    return record


def _task_name() -> str | None:
    """The current asyncio task's name, as LogRecord works it out (None outside a task)."""
    if not getattr(logging, "logAsyncioTasks", True):
        return None
    try:
        return asyncio.current_task().get_name()  # type: ignore[union-attr]
    except Exception:
        return None


class _PerSecond:
    """A time's text to the second, made once a second (strftime is most of the cost of
    formatting an access line). One tuple, read and replaced whole: safe from any thread."""

    def __init__(self) -> None:
        self._kept: tuple[int, str] = (-1, "")

    def text(self, created: float, fmt: str, converter: Callable[[float | None], time.struct_time]) -> str:
        second = int(created)
        kept = self._kept
        if kept[0] != second:
            kept = (second, time.strftime(fmt, converter(created)))
            self._kept = kept
        return kept[1]


class PlainFormatter(logging.Formatter):
    """``logging.Formatter`` with the time of day formatted once a second, not once a line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seconds = _PerSecond()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt or not self.default_msec_format:
            return super().formatTime(record, datefmt)
        second = self._seconds.text(record.created, self.default_time_format, self.converter)
        return self.default_msec_format % (second, record.msecs)


class JsonFormatter(logging.Formatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seconds = _PerSecond()  # the time to the second, formatted once a second

    def format(self, record: logging.LogRecord) -> str:
        second = self._seconds.text(record.created, "%Y-%m-%dT%H:%M:%S", time.gmtime)
        out = {
            "ts": f"{second}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        http = getattr(record, "http", None)
        if isinstance(http, dict):
            out["http"] = http
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(json_lines: bool, mask_addresses: bool = False) -> None:
    global _mask_fallback
    _mask_fallback = mask_addresses
    root = logging.getLogger()
    for h in root.handlers:
        if json_lines:
            h.setFormatter(JsonFormatter())
        elif type(h.formatter) is logging.Formatter and type(h.formatter._style) is logging.PercentStyle:
            # basicConfig's: the same format, its time formatted once a second
            h.setFormatter(PlainFormatter(h.formatter._fmt, h.formatter.datefmt))
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
