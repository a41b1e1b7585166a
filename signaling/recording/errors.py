"""What the recorder's API refuses, without importing aiortc or PyAV (the pool uses it too)."""

from __future__ import annotations

import re

ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class RecordingError(Exception):
    """A request the recorder refuses (bad role, closed session, unusable offer)."""


def check_offer(role: object, sdp: object) -> None:
    """Refuse a participant's offer the recorder cannot use, before any work is done for it."""
    if not isinstance(role, str) or not ROLE_RE.fullmatch(role):
        raise RecordingError("invalid role")
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise RecordingError("not an SDP offer")
