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
    path = _TOKEN_PATH.sub(r"\1\2…", path)
    return _TOKEN_QUERY.sub(r"\1\2…", path)


def _remote(request: BaseRequest) -> str | None:
    """The client address, masked to its network when the mask_addresses setting says so."""
    from consult.core import keys, security

    app = getattr(request, "app", None)
    if app is not None and keys.SETTINGS in app:
        return security.client_address(request)  # type: ignore[arg-type]
    return request.remote


class RedactingAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time_taken: float) -> None:
        remote = _remote(request)
        self.logger.info(
            '%s "%s %s" %s %.1fms',
            remote,
            request.method,
            redact(request.path_qs),
            response.status,
            time_taken * 1000,
            # JSON lines carry these as fields, so that a log pipeline need not parse the message.
            extra={
                "http": {
                    "remote": remote,
                    "method": request.method,
                    "path": redact(request.path_qs),
                    "status": response.status,
                    "ms": round(time_taken * 1000, 1),
                }
            },
        )


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


def setup_logging(json_lines: bool) -> None:
    root = logging.getLogger()
    if json_lines:
        for h in root.handlers:
            h.setFormatter(JsonFormatter())
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
