"""The contract between the signaling server and the application that embeds it.

The server never decides who a token belongs to or where state lives: it asks the policy.
That keeps hospital concepts (appointments, clinicians, patients) out of this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["host", "guest"]
ROLES: tuple[Role, ...] = ("host", "guest")

EVENT_NAMES: frozenset[str] = frozenset(
    {
        "room_opened",
        "joined",
        "left",
        "replaced",
        "waiting",
        "admitted",
        "ready",
        "clock_started",
        "warning",
        "ended",
        "ice_state",
        "reconnect",
        "ice_restart",
        "stats",
        "chat",
        "error",
        "recording_started",
        "recording_stopped",
    }
)


# Slotted: one of each per connected participant.
@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the server knows about a connecting client before it is admitted."""

    remote: str | None
    user_agent: str | None


@dataclass(frozen=True, slots=True)
class Admission:
    """A policy's answer to "may this token join this room, and on what terms"."""

    room_id: str
    role: Role
    participant: str  # display label shown to the other party
    not_before: float  # unix seconds: joining is allowed from ...
    not_after: float  # ... until (a running visit may still be rejoined after it)
    duration_s: float  # visit length, counted from when both are first present
    warning_s: float  # warn this many seconds before the end
    # True when this participant's side of the visit is to be recorded (the application has
    # this participant's consent and the other side has not declined). The room records only
    # while both seated participants' admissions say so (docs/protocol.md, "Recording").
    recording: bool = False
    user_id: str = ""  # stable id used in the TURN REST username


class Refused(Exception):
    """Raised by a policy to turn a client away; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class RoomState:
    """The part of a room that must survive reconnects and server restarts."""

    room_id: str
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None


@dataclass(frozen=True)
class RoomEvent:
    """Something that happened in a room, emitted after the state change it describes."""

    name: str
    room_id: str
    role: str | None
    created: float
    data: dict[str, Any] = field(default_factory=dict)


class RoomPolicy(Protocol):
    async def admit(self, room_id: str, token: str, peer: PeerInfo) -> Admission:
        """Return the terms for this token in this room, or raise `Refused`."""
        ...

    async def load_state(self, room_id: str) -> RoomState | None: ...

    async def save_state(self, state: RoomState) -> None: ...

    async def on_event(self, event: RoomEvent) -> bool | None:
        """Record an event. Exceptions are logged by the server and otherwise ignored.

        Return False when the event was not stored because its seat (`event.role` in
        `event.room_id`) has used up its storage budget: the server then records nothing more
        of that seat's telemetry, chat or errors and tells its client once (`over_budget`).
        """
        ...
