"""A timed two-party room: one host slot, one guest slot, a waiting room and a visit clock.

The room owns its participants, its timer task and its state; every rule of docs/protocol.md
about who sees whom and when the visit ends lives here. It never awaits a client socket
(connections queue their own writes), so a room operation cannot be stalled by a slow peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from signaling.config import SignalingConfig
from signaling.connection import (
    CLOSE_ENDED,
    CLOSE_NORMAL,
    CLOSE_REFUSED,
    CLOSE_REPLACED,
    Connection,
)
from signaling.ice import ice_servers
from signaling.policy import Admission, Role, RoomEvent, RoomPolicy, RoomState
from signaling.protocol import PROTOCOL_VERSION
from signaling.seats import SeatRegistry, SeatState

if TYPE_CHECKING:
    from signaling.recording import RecordingSession
    from signaling.recording.pool import PooledRecordingSession, RecordingPool

log = logging.getLogger(__name__)

# Where a room's recordings go; None: this server does not record (record_offer is refused).
RecordingDir = Callable[[str], Path]

JoinResult = Literal["joined", "refused", "gone"]
_OTHER: dict[str, Role] = {"host": "guest", "guest": "host"}


class Room:
    def __init__(
        self,
        room_id: str,
        *,
        policy: RoomPolicy,
        config: SignalingConfig,
        emit: Callable[[RoomEvent], None],
        clock: Callable[[], float],
        on_idle: Callable[[Room], None],
        recording_dir: RecordingDir | None = None,
        recording_pool: RecordingPool | None = None,
        delivered: Callable[[], Awaitable[None]] | None = None,
        seats: SeatRegistry | None = None,
    ) -> None:
        self.room_id = room_id
        # Per-seat limits and throttles, kept by the server across this room's connections.
        self.seats = seats if seats is not None else SeatRegistry(config)
        # Waits until the events emitted so far have reached the policy (EventDispatcher).
        self._delivered = delivered
        self.recording_dir = recording_dir
        self.recording_pool = recording_pool
        self.policy = policy
        self.config = config
        self._emit_event = emit
        self._clock = clock
        self._on_idle = on_idle
        self.state = RoomState(room_id=room_id)
        self.slots: dict[Role, Connection | None] = {"host": None, "guest": None}
        # Remembered for the room, so a guest whose phone reconnects skips the waiting room.
        self.admitted = False
        # The visit's terms come from the first admission, then the host's (the host's
        # appointment is authoritative); they freeze once the clock starts.
        self.duration_s: float | None = None
        self.warning_s: float = 0
        self._joined_roles: set[str] = set()
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._warned = False
        # True once the room has left the server's registry; a join then has to retry.
        self.discarded = False
        # The visit's recorder (signaling.recording), created on the first record_offer.
        self._recorder: RecordingSession | PooledRecordingSession | None = None
        self._recording_announced = False
        self._recorded_roles: set[str] = set()
        # Seats whose socket dropped (no `leave`) and whose grace has not run out: the other
        # side was told `peer_away` and keeps its media; `peer_left` follows at the end.
        self._away: dict[Role, asyncio.TimerHandle] = {}

    # ----- state -------------------------------------------------------------------------

    async def load(self) -> None:
        """Restore persisted state, e.g. after a server restart."""
        saved = await self.policy.load_state(self.room_id)
        if saved is not None:
            self.state = saved
            # Only an admitted guest can have started the clock.
            self.admitted = saved.started_at is not None

    @property
    def started(self) -> bool:
        return self.state.started_at is not None

    @property
    def ended(self) -> bool:
        return self.state.ended_at is not None

    @property
    def running(self) -> bool:
        return self.started and not self.ended

    @property
    def ends_at(self) -> float | None:
        if self.state.started_at is None or self.duration_s is None:
            return None
        return self.state.started_at + self.duration_s

    @property
    def empty(self) -> bool:
        return self.slots["host"] is None and self.slots["guest"] is None

    @property
    def guest_ready(self) -> bool:
        """The seated guest has pressed Join (sent `join`) on its current connection."""
        guest = self.slots["guest"]
        return guest is not None and guest.ready

    @property
    def in_call(self) -> bool:
        """Both seated, the guest admitted and ready: media may flow, the clock may start."""
        return self.slots["host"] is not None and self.admitted and self.guest_ready

    def _visible(self, viewer: Role) -> bool:
        """Whether `viewer` may see (and signal) the other party right now."""
        other = self.slots[_OTHER[viewer]]
        if other is None:
            return False
        # The host sees a waiting guest; a guest sees the host only once admitted.
        return viewer == "host" or self.admitted

    def clock_message(self) -> dict[str, Any] | None:
        if self.state.started_at is None or self.duration_s is None:
            return None
        return {
            "type": "clock",
            "started_at": self.state.started_at,
            "ends_at": self.ends_at,
            "now": self._clock(),
            "duration_s": self.duration_s,
        }

    def _emit(self, name: str, role: str | None, **data: Any) -> None:
        self._emit_event(RoomEvent(name, self.room_id, role, self._clock(), data))

    def _error(self, conn: Connection, code: str, message: str) -> None:
        conn.send({"type": "error", "code": code, "message": message})
        self.record_error(conn, code)

    # ----- what a client may make the application store ----------------------------------------

    def _recordable(self, conn: Connection) -> SeatState | None:
        """The seat of `conn` if its telemetry, chat or errors may be recorded now, else None
        (counted as dropped): a guest in the waiting room records nothing but joining, leaving
        and admission; a seat over its storage budget nothing more."""
        role = conn.role
        if role == "guest" and not self.admitted:
            self.seats.dropped["waiting_room"] += 1
            return None
        seat = self.seats.get(self.room_id, role)
        if seat.muted:
            self.seats.dropped["over_budget"] += 1
            self._tell_over_budget(role, seat)
            return None
        return seat

    def record_error(self, conn: Connection, code: str) -> None:
        """Record an error frame sent to `conn`: the first few of each code, then counts."""
        seat = self._recordable(conn)
        if seat is None:
            return
        data = seat.take_error(code, self.config.error_events_per_code)
        if data is None:
            self.seats.dropped["repeated_error"] += 1
            return
        self._emit("error", conn.role, **data)

    def over_budget(self, role: str | None) -> None:
        """The application stores nothing more from this seat: stop recording it, tell it once."""
        seat = self.seats.get(self.room_id, role)
        seat.muted = True
        self._tell_over_budget(role, seat)

    def _tell_over_budget(self, role: str | None, seat: SeatState) -> None:
        conn = self.slots.get(role) if role in self.slots else None  # type: ignore[call-overload]
        if conn is None or seat.told:
            return
        seat.told = True
        conn.send(
            {
                "type": "error",
                "code": "over_budget",
                "message": "This visit's log is full for you: telemetry, chat and errors are no"
                " longer recorded. The call goes on.",
            }
        )

    def _peer_info(self, role: Role) -> dict[str, Any] | None:
        conn = self.slots[role]
        if conn is None or conn.admission is None:
            return None
        return {"role": role, "participant": conn.admission.participant, "instance": conn.instance}

    # ----- joining and leaving -------------------------------------------------------------

    def _check_window(self, admission: Admission, now: float) -> tuple[str, str] | None:
        # (code, English note for developers): clients show their own words for the code.
        if self.ended:
            return "room_ended", "This visit has ended."
        if now < admission.not_before:
            return "too_early", "This visit is not open yet."
        # A running visit can always be rejoined: a phone that drops out near the end of its
        # slot must be able to come back.
        if now > admission.not_after and not self.running:
            return "too_late", "The time to join this visit has passed."
        return None

    async def join(self, conn: Connection, admission: Admission) -> JoinResult:
        async with self._lock:
            if self.discarded:
                return "gone"
            now = self._clock()
            role = admission.role
            if self.duration_s is None or (role == "host" and not self.started):
                self.duration_s = admission.duration_s
                self.warning_s = admission.warning_s
            ends_at = self.ends_at
            if self.running and ends_at is not None and now >= ends_at:
                # Without a timer the clock was restored from storage: the server that ran it
                # stopped, and it ran out while nobody was watching. With one, the timer is
                # about to end it.
                reason = "time_limit" if self._timer is not None else "server_restart"
                await self._finish(reason, ended_at=ends_at)
            refusal = self._check_window(admission, now)
            if refusal is not None:
                code, message = refusal
                conn.send({"type": "error", "code": code, "message": message})
                conn.close(CLOSE_ENDED if code == "room_ended" else CLOSE_REFUSED, code)
                data = self.seats.get(self.room_id, role).take_error(code, self.config.error_events_per_code)
                if data is not None:
                    self._emit("error", role, **data)
                self._discard_if_idle()
                return "refused"

            old = self.slots[role]
            self._back(role)
            self.slots[role] = conn
            conn.admission = admission
            conn.room = self
            if old is not None:
                old.send({"type": "replaced"})
                old.close(CLOSE_REPLACED, "replaced")
                self._emit("replaced", role, remote=old.remote)
            rejoin = old is not None or role in self._joined_roles
            if old is None and rejoin:
                self._emit("reconnect", role)
            self._joined_roles.add(role)

            peer_visible = self._visible(role)
            conn.send(
                {
                    "type": "welcome",
                    "version": PROTOCOL_VERSION,
                    "role": role,
                    "participant": admission.participant,
                    "polite": role == "guest",
                    "ice_servers": ice_servers(self.config, admission.user_id, now),
                    "ice_transport_policy": self.config.ice_transport_policy,
                    "recording": admission.recording,
                    "peer_present": peer_visible,
                    "peer": self._peer_info(_OTHER[role]) if peer_visible else None,
                    # The other party's socket dropped moments ago: keep the media with it.
                    "peer_away": _OTHER[role] in self._away,
                    # Whether the guest pressed Join (a new guest connection has not yet).
                    "peer_ready": peer_visible and (role == "guest" or self.guest_ready),
                    "admitted": self.admitted,
                    "clock": self.clock_message(),
                }
            )
            self._emit("joined", role, participant=admission.participant, remote=conn.remote)
            if role == "guest" and not self.admitted:
                conn.send({"type": "waiting"})
                self._emit("waiting", role)
            other = self.slots[_OTHER[role]]
            if other is not None and self._visible(_OTHER[role]):
                # Also sent on a replacement: the other side must renegotiate with the new one.
                other.send(
                    {
                        "type": "peer_joined",
                        "role": role,
                        "participant": admission.participant,
                        "admitted": self.admitted,
                        "ready": role == "host",
                        "reconnected": rejoin,
                        "instance": conn.instance,
                    }
                )
            if self.started:
                clock = self.clock_message()
                assert clock is not None
                conn.send(clock)
                self._ensure_timer()
            else:
                await self._maybe_start_clock()
            self._announce_recording()
            return "joined"

    async def leave(self, conn: Connection, reason: str) -> None:
        """Remove `conn` if it still holds its slot; `reason` is "left" or "disconnected"."""
        async with self._lock:
            role = conn.role
            if role is None or self.slots.get(role) is not conn:
                return  # already replaced, or never joined
            other_saw_it = self._visible(_OTHER[role])
            self.slots[role] = None
            self._emit("left", role, reason=reason)
            other = self.slots[_OTHER[role]]
            if reason == "disconnected" and not self.ended:
                # Maybe only the socket died (a phone changing networks, a proxy restarting):
                # the media between the pages may well be fine. peer_left after the grace.
                self._back(role)
                self._away[role] = asyncio.get_running_loop().call_later(
                    self.config.peer_grace_s, self._grace_over, role
                )
                if other is not None and other_saw_it:
                    other.send({"type": "peer_away", "role": role, "grace_s": self.config.peer_grace_s})
            elif other is not None and other_saw_it:
                self._back(role)
                other.send({"type": "peer_left", "role": role, "reason": reason})
            if reason == "left":
                conn.close(CLOSE_NORMAL, "left")
            self._discard_if_idle()

    def _back(self, role: Role) -> None:
        """`role` is back (or left for good): its grace no longer runs."""
        handle = self._away.pop(role, None)
        if handle is not None:
            handle.cancel()

    def _grace_over(self, role: Role) -> None:
        self._away.pop(role, None)
        if self.slots[role] is not None or self.ended:
            return
        viewer = _OTHER[role]
        other = self.slots[viewer]
        # The host always saw the guest; the guest saw the host once admitted.
        if other is not None and (viewer == "host" or self.admitted):
            other.send({"type": "peer_left", "role": role, "reason": "disconnected"})

    def _cancel_graces(self) -> None:
        for role in list(self._away):
            self._back(role)

    def _discard_if_idle(self) -> None:
        # A running clock keeps the room (and its timer) alive with nobody in it, so that the
        # visit still ends on time and the end is recorded.
        idle = self.empty and (not self.started or self._timer is None)
        if (self.ended or idle) and not self.discarded:
            self.discarded = True
            self._cancel_graces()
            self._on_idle(self)

    # ----- admission and the clock -----------------------------------------------------------

    async def admit(self, conn: Connection) -> None:
        async with self._lock:
            guest = self.slots["guest"]
            if guest is None:
                self._error(conn, "peer_absent", "There is no patient in the waiting room.")
                return
            if self.admitted:
                conn.send({"type": "admitted"})
                return
            self.admitted = True
            self._emit("admitted", "guest")
            guest.send({"type": "admitted"})
            conn.send({"type": "admitted", "ready": guest.ready})
            host_info = self._peer_info("host")
            assert host_info is not None
            guest.send(
                {"type": "peer_joined", **host_info, "admitted": True, "ready": True, "reconnected": False}
            )
            await self._maybe_start_clock()
            self._announce_recording()

    async def ready(self, conn: Connection) -> None:
        """The guest's patient pressed Join: from now on its media may flow (on this
        connection), and the clock starts if the host is there and the guest admitted."""
        async with self._lock:
            if conn.role != "guest" or conn.ready or self.slots["guest"] is not conn:
                return  # the host is always in the call; a second join changes nothing
            conn.ready = True
            self._emit("ready", "guest")
            host = self.slots["host"]
            if host is not None:
                host.send({"type": "peer_ready", "role": "guest"})
            await self._maybe_start_clock()
            self._announce_recording()

    async def _maybe_start_clock(self) -> None:
        host, guest = self.slots["host"], self.slots["guest"]
        # The visit starts when both are in the call: the host present and the admitted guest
        # has pressed Join (not at admission: the patient may still be on the pre-call check).
        if self.started or host is None or guest is None or not self.in_call:
            return
        self.state.started_at = self._clock()
        await self.policy.save_state(self.state)
        self._emit("clock_started", None, started_at=self.state.started_at, ends_at=self.ends_at)
        message = self.clock_message()
        assert message is not None
        host.send(message)
        guest.send(message)
        self._ensure_timer()

    def _ensure_timer(self) -> None:
        if self._timer is None and not self.ended:
            self._timer = asyncio.get_running_loop().create_task(self._run_timer())

    async def _run_timer(self) -> None:
        ends_at = self.ends_at
        assert ends_at is not None
        warn_at = ends_at - self.warning_s
        if self.warning_s > 0 and self._clock() < warn_at:
            await asyncio.sleep(warn_at - self._clock())
        if self.warning_s > 0 and not self._warned and self._clock() < ends_at:
            self._warned = True
            seconds_left = max(0, round(ends_at - self._clock()))
            for conn in self.slots.values():
                if conn is not None:
                    conn.send({"type": "warning", "seconds_left": seconds_left})
            self._emit("warning", None, seconds_left=seconds_left)
        delay = ends_at - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await self.close("time_limit")

    # ----- messages ------------------------------------------------------------------------

    async def handle(self, conn: Connection, message: dict[str, Any]) -> None:
        """Act on one validated client message (see signaling.protocol)."""
        kind = message["type"]
        role = conn.role
        assert role is not None
        if self.slots.get(role) is not conn:
            return  # replaced while this message was in flight
        if kind == "signal":
            other = self.slots[_OTHER[role]]
            if other is None or not self.admitted:
                self._error(conn, "peer_absent", "The other party is not in the visit.")
                return
            if not self.guest_ready:
                # No media negotiation before the patient pressed Join.
                self._error(conn, "not_joined", "The patient has not joined the call yet.")
                return
            other.send({"type": "signal", "data": message["data"]})
        elif kind == "ping":
            conn.send({"type": "pong"})
        elif kind == "quality":
            # Relayed only (not recorded): each side shows the worse of the two uplinks.
            other = self.slots[_OTHER[role]]
            if other is not None and self.in_call:
                out = {"type": "quality", "from": role, "uplink": message["uplink"]}
                out["audio_only"] = message.get("audio_only") is True
                other.send(out)
        elif kind == "chat":
            other = self.slots[_OTHER[role]]
            if other is None or not self.admitted:
                self._error(conn, "peer_absent", "The other party is not in the visit.")
                return
            now = self._clock()
            out = {"type": "chat", "from": role, "text": message["text"], "at": now}
            other.send(out)
            # Relayed even when it can no longer be recorded: the call goes on.
            if self._recordable(conn) is not None:
                self._emit("chat", role, text=message["text"])
        elif kind in ("admit", "end") and role != "host":
            self._error(conn, "forbidden", f"Only the host may send '{kind}'.")
        elif kind == "admit":
            await self.admit(conn)
        elif kind == "join":
            await self.ready(conn)
        elif kind == "end":
            await self.close("host_ended")
        elif kind == "leave":
            await self.leave(conn, "left")
        elif kind == "ice_state":
            seat = self._recordable(conn)
            key = (message["state"], message.get("pair_type"))
            if seat is None:
                return
            if not seat.take_ice_state(key, self._clock(), self.config.telemetry_interval_s):
                self.seats.dropped["throttled"] += 1
                return
            self._emit(
                "ice_state",
                role,
                state=message["state"],
                pair_type=message.get("pair_type"),
                rtt_ms=message.get("rtt_ms"),
            )
        elif kind == "ice_restart":
            if self._recordable(conn) is not None:
                self._emit("ice_restart", role)
        elif kind == "stats":
            seat = self._recordable(conn)
            if seat is None:
                return
            data = seat.take_stats(message["sample"], self._clock(), self.config)
            if data is None:
                self.seats.dropped["throttled"] += 1
                return
            self._emit("stats", role, **data)
        elif kind == "record_offer":
            await self._record_offer(conn, role, message["sdp"])
        elif kind == "record_candidate":
            await self._record_candidate(conn, role, message["candidate"])
        elif kind == "hello":
            self._error(conn, "duplicate_hello", "hello was already received.")

    # ----- recording -------------------------------------------------------------------------

    @property
    def recording_active(self) -> bool:
        """Both participants are seated, admitted, and both admissions allow recording.

        Each admission says whether the application has that participant's consent (and no
        refusal from the other side); the room records only when both say so, so that one
        side's consent never records a visit the other side declined.
        """
        if self.recording_dir is None or self.ended or not self.in_call:
            return False
        host, guest = self.slots["host"], self.slots["guest"]
        return all(c is not None and c.admission is not None and c.admission.recording for c in (host, guest))

    def _announce_recording(self) -> None:
        """Tell clients to open their recording legs: both when recording becomes possible
        (both in the call: the guest admitted and ready), then each (re)joining connection once
        it is. Recording never switches off mid-visit on its own."""
        if not self.recording_active:
            return
        self._recording_announced = True
        for c in self.slots.values():
            if c is not None and not c.recording_told:
                c.recording_told = True
                c.send({"type": "recording", "active": True})

    async def _record_offer(self, conn: Connection, role: Role, sdp: str) -> None:
        from signaling.recording import RecordingError, RecordingSession

        if role == "guest" and not self.admitted:
            self._error(conn, "not_admitted", "Recording starts once the patient is admitted.")
            return
        if role == "guest" and not conn.ready:
            self._error(conn, "not_joined", "Recording starts once the patient pressed Join.")
            return
        if not self._recording_announced or conn.admission is None or not conn.admission.recording:
            self._error(conn, "recording_off", "This visit is not recorded.")
            return
        if self._recorder is None:
            assert self.recording_dir is not None
            directory = self.recording_dir(self.room_id)
            # The server's side uses its own addresses only (never a default public STUN).
            if self.recording_pool is not None:
                self._recorder = self.recording_pool.session(directory, ice_servers=[], label=self.room_id)
            else:
                self._recorder = RecordingSession(directory, ice_servers=[], label=self.room_id)
        recorder = self._recorder
        try:
            answer = await recorder.add_participant_offer(role, sdp)
        except RecordingError as exc:
            self._error(conn, "recording_failed", f"The recording could not start: {exc}")
            return
        if self.slots.get(role) is not conn:
            return  # replaced meanwhile: the new connection will offer again
        conn.send({"type": "record_answer", "sdp": answer})
        self._emit("recording_started", role, restart=role in self._recorded_roles)
        self._recorded_roles.add(role)

    async def _record_candidate(self, conn: Connection, role: Role, candidate: dict[str, Any] | None) -> None:
        from signaling.recording import RecordingError

        if self._recorder is None:
            self._error(conn, "recording_off", "This visit is not recorded.")
            return
        try:
            await self._recorder.add_ice_candidate(role, candidate)
        except (RecordingError, ValueError, KeyError, IndexError) as exc:
            log.info("room %s: recording candidate of %s refused: %s", self.room_id, role, exc)

    async def _stop_recording(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        try:
            files = await recorder.close()
        except Exception:
            log.exception("room %s: closing the recorder failed", self.room_id)
            files = list(recorder.files)
        self._emit("recording_stopped", None, files=[f.as_dict() for f in files])

    # ----- ending ----------------------------------------------------------------------------

    async def close(self, reason: str) -> None:
        """End the visit for good: persist, tell both, close their sockets. Idempotent."""
        await self._finish(reason, ended_at=self._clock())

    async def _finish(self, reason: str, *, ended_at: float) -> None:
        if self.ended:
            return
        self.state.ended_at = ended_at
        self.state.end_reason = reason
        self._cancel_graces()
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        try:
            # The policy records the end after everything that led to it (joins, the clock).
            if self._delivered is not None:
                await self._delivered()
            await self.policy.save_state(self.state)
        except Exception:
            # The sockets are closed regardless: a visit must not outlive its end because the
            # database hiccupped. load_state would then reopen it, which is the safer failure.
            log.exception("could not persist the end of room %s", self.room_id)
        for role, conn in self.slots.items():
            if conn is not None:
                conn.send({"type": "ended", "reason": reason})
                conn.close(CLOSE_ENDED, reason)
                self.slots[role] = None
        # Before "ended": the application stores the files while the visit is still open.
        await self._stop_recording()
        self._emit("ended", None, reason=reason)
        self._discard_if_idle()

    async def shutdown(self) -> None:
        """Stop the timer without ending the visit (server shutdown; state is persisted)."""
        self.discarded = True
        self._cancel_graces()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.wait({timer})
        # The files are finished cleanly; after a restart the clients offer new legs.
        await self._stop_recording()
