"""Test doubles for the signaling package: for tests and benchmarks; never used by the server.

`InMemoryPolicy` is a `RoomPolicy` that keeps admissions, room state and events in
dictionaries; `make_admission` builds the terms of a window open from now on. Nothing under
signaling/ or consult/ imports this module: an application supplies its own policy.
"""

from __future__ import annotations

import dataclasses
import time

from signaling.policy import Admission, PeerInfo, Refused, Role, RoomEvent, RoomState


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
