"""What the recorder's API refuses, without importing aiortc or PyAV (the pool uses it too)."""

from __future__ import annotations

import re

ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class RecordingError(Exception):
    """A request the recorder refuses (bad role, closed session, unusable offer)."""
