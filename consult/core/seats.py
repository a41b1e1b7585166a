"""The two seats of a call room and the people in them.

The `signaling` package knows a room's two seats as ``host`` and ``guest``; Consult knows the
people as ``doctor`` and ``patient``. The doctor always takes the host seat.
"""

from __future__ import annotations

ROLE_OF_SEAT = {"host": "doctor", "guest": "patient"}
SEAT_OF_ROLE = {role: seat for seat, role in ROLE_OF_SEAT.items()}


def side(name: str | None) -> str | None:
    """``doctor`` or ``patient`` for a seat or a role name; None for anything else."""
    if name in SEAT_OF_ROLE:
        return name
    return ROLE_OF_SEAT.get(name or "")
