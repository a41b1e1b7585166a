"""Logging: plain or JSON lines, and an access log that never records call-link tokens."""

from __future__ import annotations

import json
import logging
import re
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

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
    from consult.core import keys, security

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
        # As logger.info(...) would, without looking up the caller's file and line in the stack
        # (every request is logged; nothing prints them).
        record = logger.makeRecord(
            logger.name,
            logging.INFO,
            __file__,
            0,
            '%s "%s %s" %s %.1fms',
            (remote, method, path, status, ms),
            None,
            # JSON lines carry these as fields, so that a log pipeline need not parse the message.
            extra={"http": {"remote": remote, "method": method, "path": path, "status": status, "ms": ms}},
        )
        logger.handle(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
    if json_lines:
        for h in root.handlers:
            h.setFormatter(JsonFormatter())
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
