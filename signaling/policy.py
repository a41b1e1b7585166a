"""The contract between the signaling server and the application that embeds it.

The server never decides who a token belongs to or where state lives: it asks the policy.
That keeps hospital concepts (appointments, clinicians, patients) out of this package.
"""

from __future__ import annotations

import dataclasses
import time
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


@dataclass(frozen=True)
class PeerInfo:
    """What the server knows about a connecting client before it is admitted."""

    remote: str | None
    user_agent: str | None


@dataclass(frozen=True)
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

    async def on_event(self, event: RoomEvent) -> None:
        """Record an event. Exceptions are logged by the server and otherwise ignored."""
        ...


class InMemoryPolicy:
    """A dictionary-backed policy for tests and benchmarks.

    Sharing one instance between two `SignalingServer`s simulates a restart: state survives
    because it lives here, not in the server.
    """

    def __init__(self, admissions: dict[str, Admission] | None = None, *, keep_events: bool = True) -> None:
        self.admissions: dict[str, Admission] = dict(admissions or {})
        self.states: dict[str, RoomState] = {}
        self.events: list[RoomEvent] = []
        self.keep_events = keep_events

    def register(self, token: str, admission: Admission) -> None:
        self.admissions[token] = admission

    async def admit(self, room_id: str, token: str, peer: PeerInfo) -> Admission:
        admission = self.admissions.get(token)
        if admission is None or admission.room_id != room_id:
            raise Refused("invalid_token", "This link is not valid for this room.")
        return admission

    async def load_state(self, room_id: str) -> RoomState | None:
        state = self.states.get(room_id)
        # A copy, so that the server cannot mutate what the "database" holds behind its back.
        return dataclasses.replace(state) if state is not None else None

    async def save_state(self, state: RoomState) -> None:
        self.states[state.room_id] = dataclasses.replace(state)

    async def on_event(self, event: RoomEvent) -> None:
        if self.keep_events:
            self.events.append(event)

    def event_names(self, room_id: str | None = None) -> list[str]:
        return [e.name for e in self.events if room_id is None or e.room_id == room_id]


def make_admission(
    room_id: str,
    role: Role,
    *,
    participant: str | None = None,
    duration_s: float = 1800,
    warning_s: float = 300,
    window_s: float = 3600,
    recording: bool = False,
    user_id: str | None = None,
    now: float | None = None,
) -> Admission:
    """Convenience constructor for tests and benchmarks: a window open from now on."""
    now = time.time() if now is None else now
    return Admission(
        room_id=room_id,
        role=role,
        participant=participant or role,
        not_before=now - 60,
        not_after=now + window_s,
        duration_s=duration_s,
        warning_s=warning_s,
        recording=recording,
        user_id=user_id or f"{room_id}-{role}",
    )
