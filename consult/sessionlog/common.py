"""What every part of the session log shares: days in the clinic's time zone, sides, vocabularies."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

DEFAULT_TZ = "Asia/Shanghai"  # Settings.timezone's default; callers pass the configured one
OUTCOMES = ("completed", "no_show", "failed", "cancelled", "in_progress")
END_REASONS = ("time_limit", "host_ended", "patient_left", "connection_failed", "no_show")
SAMPLE_FIELDS = ("bitrate_kbps", "loss_pct", "jitter_ms", "fps", "width", "height", "freezes", "rtt_ms")
_ROLES = {"host": "doctor", "doctor": "doctor", "guest": "patient", "patient": "patient"}


def local_day(ts: float, tz: str) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone(ZoneInfo(tz)).date().isoformat()


def day_start(day: date, tz: str) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz)).timestamp())


def side(role: str | None) -> str | None:
    """Signaling seats (host/guest) and application roles (doctor/patient) name the same sides."""
    return _ROLES.get(role or "")


def mask_address(remote: str | None) -> str | None:
    """The network part only, as ``security.client_address`` stores it when masking is on."""
    if not remote:
        return remote
    if ":" in remote:
        return ":".join(remote.split(":")[:3]) + "::/48"
    return ".".join(remote.split(".")[:3]) + ".0/24"


def number(value: Any) -> float | None:
    """A finite JSON number as a float; None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
