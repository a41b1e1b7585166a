"""What every part of the session log shares: days in the clinic's time zone, sides, vocabularies."""

from __future__ import annotations

import math
from typing import Any

from consult.core.dates import DEFAULT_TZ, day_start, local_day
from consult.core.seats import side
from consult.core.security import mask_address

__all__ = [
    "DEFAULT_TZ",
    "END_REASONS",
    "OUTCOMES",
    "SAMPLE_FIELDS",
    "day_start",
    "local_day",
    "mask_address",
    "number",
    "side",
]

OUTCOMES = ("completed", "no_show", "failed", "cancelled", "in_progress")
# server_restart: the room was open when the server died and nobody came back before its end
# (closed by the sweep in consult.calls.closing).
END_REASONS = ("time_limit", "host_ended", "patient_left", "connection_failed", "no_show", "server_restart")
SAMPLE_FIELDS = ("bitrate_kbps", "loss_pct", "jitter_ms", "fps", "width", "height", "freezes", "rtt_ms")


def number(value: Any) -> float | None:
    """A finite JSON number as a float; None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
