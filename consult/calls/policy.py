"""The consultation call: who may join which visit room, and where the room's clock and events go.

The `signaling` package runs the rooms and knows nothing about hospitals; this module is its
`RoomPolicy` over our database. A room's id is the visit's public id. The patient's hello token
is the signed call link (`consult.calls.links`); the doctor's is a short-lived host token that the
consult-room page mints for the signed-in doctor (`make_host_token`). Every room event is
appended to `session_events` (and folded into the admin session summary) in one write, within a
storage budget per visit and seat (below); a room's end is one write with the visit's status
(`consult.calls.closing`), and `room_sweeper` closes the rooms a dead server left open.

The budget: what a client sends must not grow the database without bound. Each seat of a visit
(host, guest, and '' for events of no seat: refused joins, the room opening) may store
`SEAT_BUDGET` (`ROOM_BUDGET` for '') in `session_events` and `quality_samples`, counted in
`session_budgets`, which a reconnect or a restart does not reset. Beyond it an event is not
stored (a join, leave or ICE change still updates the summary), `on_event` answers False, and the
signaling server stops recording that seat and tells its client once. The events that make a
visit (admission, clock, warning, end, recording files) happen once each and are always stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
from aiohttp import web

from consult import sessionlog
from consult.calls import closing, leases, recordings
from consult.calls import links as calllinks
from consult.core import keys, leader, live, metrics
from consult.core.config import Settings
from consult.core.db import Database, DatabaseError
from consult.core.i18n import _
from consult.core.seats import ROLE_OF_SEAT
from consult.core.security import mask_address
from signaling import Admission, PeerInfo, Refused, RoomEvent, RoomState, SignalingConfig, SignalingServer
from signaling.recording.pool import RecordingPool

# Room events prepared (or their boards nudged) per event-loop step: a batch of 256 from a
# burst of connections took 30-60 ms of CPU in one step, holding every call's signaling.
EVENTS_PER_STEP = 32

log = logging.getLogger(__name__)

HOST_TOKEN_TTL_S = 600
HOST_PREFIX = "host."
# The doctor may open the room before the patient's link opens, to read the reports.
DOCTOR_EARLY_S = 30 * 60
WS_PATH = "/ws/rooms/{room_id}"
# Visit and doctor ids of the rooms seen lately, for their events: more than one server holds open
# (a miss costs a database read for every event of the room; with 4,096, a clinic of 9,500 open rooms
# read its visits again for nearly every event). About 200 bytes an entry: 13 MiB at most for both.
_VISIT_IDS_MAX = 65_536
# Rooms whose visit ids a lease renewal looks up in one loop step (all 9,950 in one step took 8-13 ms).
_RENEW_STEP = 500


@dataclass(frozen=True)
class Budget:
    rows: int
    bytes: int


# Per visit and seat. A call sends a stats sample and an ICE state every 5 s per side, stored at
# most every 10 s (signaling.SignalingConfig.telemetry_interval_s): an hour is about 1,100 rows
# and 150 KiB per seat, so this is three hours and more, and a visit can never store more than
# about 2.1 MiB of log whatever its clients send.
SEAT_BUDGET = Budget(rows=4000, bytes=1 << 20)
ROOM_BUDGET = Budget(rows=500, bytes=64 << 10)
# What a row costs beyond its data: ids, times, name and role, and a quality sample's row.
EVENT_ROW_BYTES = 32
SAMPLE_ROW_BYTES = 48
# Once per visit, by the server's own doing: never refused.
ALWAYS_STORED = frozenset({"admitted", "clock_started", "warning", "ended", "recording_stopped"})
# Events that change a visit's state on its doctor's clinic board (consult.calls.board).
BOARD_EVENTS = frozenset(
    {"room_opened", "joined", "left", "replaced", "waiting", "admitted", "ready", "clock_started", "ended"}
)
# Folded into the summary even when over budget (they change no row count): presence, ICE.
_FOLD_OVER_BUDGET = sessionlog.FOLDED_EVENTS - {"stats"}


def _charge_sync(
    db: sqlite_utils.Database, visit_id: int, seat: str, rows: int, size: int, budget: Budget
) -> bool:
    """Count `rows` and `size` bytes against the seat's budget; False (and one more dropped)
    when they do not fit. Writer thread only."""
    row = db.execute(
        "SELECT rows, bytes FROM session_budgets WHERE visit_id = ? AND seat = ?", [visit_id, seat]
    ).fetchone()
    used_rows, used_bytes = (row[0], row[1]) if row is not None else (0, 0)
    if used_rows + rows > budget.rows or used_bytes + size > budget.bytes:
        db.execute(
            "INSERT INTO session_budgets (visit_id, seat, dropped) VALUES (?, ?, 1)"
            " ON CONFLICT(visit_id, seat) DO UPDATE SET dropped = session_budgets.dropped + 1",
            [visit_id, seat],
        )
        return False
    db.execute(
        "INSERT INTO session_budgets (visit_id, seat, rows, bytes) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(visit_id, seat) DO UPDATE SET rows = session_budgets.rows + excluded.rows,"
        " bytes = session_budgets.bytes + excluded.bytes",
        [visit_id, seat, rows, size],
    )
    return True


# -- host tokens ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _host_mac(settings: Settings, payload: bytes) -> bytes:
    return hmac.new(settings.session_key.encode(), b"room-host:" + payload, hashlib.sha256).digest()


def make_host_token(settings: Settings, public_id: str, user_id: int, now: float) -> str:
    """A token for the room page of a signed-in doctor: this visit, this user, ten minutes."""
    payload = f"{public_id}|{int(user_id)}|{int(now) + HOST_TOKEN_TTL_S}".encode()
    return f"{HOST_PREFIX}{_b64(payload)}.{_b64(_host_mac(settings, payload))}"


def verify_host_token(settings: Settings, token: str, now: float) -> tuple[str, int]:
    """`(public_id, user_id)` of a valid host token; `Refused` otherwise."""
    invalid = Refused("invalid_token", _("This page has expired. Reload the consult room."))
    body = token[len(HOST_PREFIX) :]
    if len(body) > 400 or body.count(".") != 1:
        raise invalid
    encoded, sig = body.split(".")
    try:
        payload, mac = _unb64(encoded), _unb64(sig)
        public_id, user_id, expires = payload.decode().split("|")
        uid, exp = int(user_id), int(expires)
    except (ValueError, TypeError):
        raise invalid from None
    if not hmac.compare_digest(mac, _host_mac(settings, payload)):
        raise invalid
    if now > exp:
        raise invalid
    return public_id, uid


# -- the policy -------------------------------------------------------------------------------


def visit_length_s(settings: Settings, doctor_minutes: int | None) -> float:
    if settings.visit_seconds_override > 0:
        return settings.visit_seconds_override
    if doctor_minutes:
        return float(doctor_minutes) * 60
    return settings.visit_minutes * 60


_VISIT_FOR_ROOM = (
    "SELECT v.id, v.public_id, v.status, v.starts_at, v.ends_at, v.call_nonce, v.patient_id,"
    " v.doctor_id, d.visit_minutes, pu.display_name AS patient_name, du.display_name AS doctor_name,"
    " du.active AS doctor_active"
    " FROM visits v JOIN doctors d ON d.user_id = v.doctor_id"
    " JOIN users pu ON pu.id = v.patient_id JOIN users du ON du.id = v.doctor_id"
    " WHERE v.public_id = ?"
)


class ConsultPolicy:
    """`signaling.RoomPolicy` over the Consult database."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.db: Database | None = None  # set when the app's database opens
        self.app: web.Application | None = None  # for metrics; set by setup_calls
        self._visit_ids: dict[str, int] = {}
        self._doctor_ids: dict[str, int] = {}  # whose clinic board a room's events change
        # The last client seen per seat: `joined` events carry its user agent into the log.
        self._peers: dict[tuple[str, str], PeerInfo] = {}
        self.seat_budget = SEAT_BUDGET
        self.room_budget = ROOM_BUDGET
        # This node's name in the rooms' leases (consult.calls.leases).
        self.node = leases.new_node_id()
        self.lease_s = leases.LEASE_S

    def _database(self) -> Database:
        if self.db is None:
            raise RuntimeError("ConsultPolicy used before the database opened")
        return self.db

    async def _visit(self, public_id: str) -> dict[str, Any] | None:
        row = await self._database().query_one(_VISIT_FOR_ROOM, [public_id])
        return None if row is None else dict(row)

    async def admit(self, room_id: str, token: str, peer: PeerInfo) -> Admission:
        now = self.clock()
        if token.startswith(HOST_PREFIX):
            public_id, user_id = verify_host_token(self.settings, token, now)
            role = "host"
        else:
            public_id, nonce = self._patient_token(token, now)
            user_id = None
            role = "guest"
        if public_id != room_id:
            raise Refused("invalid_token", _("This link is for another visit."))
        visit = await self._visit(room_id)
        if visit is None:
            raise Refused("invalid_token", _("This visit does not exist."))
        if role == "guest" and not hmac.compare_digest(visit["call_nonce"], nonce):
            raise Refused(
                "invalid_token",
                _(
                    "This call link was replaced: the visit was moved."
                    " Open the new link from your visit page."
                ),
            )
        if role == "host" and (visit["doctor_id"] != user_id or not visit["doctor_active"]):
            raise Refused("forbidden", _("Only this visit's doctor can open its consult room."))
        if visit["status"] == "completed":
            raise Refused("room_ended", _("This visit has ended."))
        if visit["status"] != "confirmed":
            raise Refused("visit_not_confirmed", _("This visit is not confirmed or was cancelled."))
        early = DOCTOR_EARLY_S if role == "host" else calllinks.EARLY_S
        if now < visit["starts_at"] - early:
            # Refused here, before the room is opened, so that an early doctor leaves no
            # session behind (a patient's link is refused above, by its own window).
            raise Refused(
                "too_early",
                _("The consult room opens %(minutes)d minutes before the visit starts.")
                % {"minutes": DOCTOR_EARLY_S // 60},
            )
        self._visit_ids[room_id] = visit["id"]
        if len(self._visit_ids) > _VISIT_IDS_MAX:
            self._visit_ids.pop(next(iter(self._visit_ids)))
        self._doctor_ids[room_id] = visit["doctor_id"]
        if len(self._doctor_ids) > _VISIT_IDS_MAX:
            self._doctor_ids.pop(next(iter(self._doctor_ids)))
        terms = await self._database().execute_fn(
            lambda db: recordings.terms_sync(db, visit["id"], self.settings.recording_policy)
        )
        side = ROLE_OF_SEAT[role]
        if not terms.may_join(side):
            # The pages ask before connecting; this is the server's own check.
            raise Refused(
                "recording_consent",
                _("This visit is recorded. It can take place only if you agree to the recording."),
            )
        await self._claim(visit["id"])
        self._peers[(room_id, role)] = peer
        return Admission(
            room_id=room_id,
            role=role,
            participant=visit["doctor_name"] if role == "host" else visit["patient_name"],
            not_before=visit["starts_at"] - early,
            not_after=visit["ends_at"] + calllinks.LATE_S,
            duration_s=visit_length_s(self.settings, visit["visit_minutes"]),
            warning_s=self.settings.warning_minutes * 60,
            recording=terms.records(side),
            # Only an opaque id reaches coturn's logs (TURN REST username), never a name.
            user_id=f"d{visit['doctor_id']}" if role == "host" else f"p{visit['patient_id']}",
        )

    async def _claim(self, visit_id: int) -> None:
        """Hold the room's lease before anyone is admitted; wait (at most a lease's length) while
        another node's lease lapses, as after that node died."""
        deadline = time.monotonic() + self.lease_s + 1.0
        while True:
            now = self.clock()
            holder = await self._database().execute_write_fn(
                lambda db, now=now: leases.claim_sync(db, visit_id, self.node, now, self.lease_s)
            )
            if holder == self.node:
                return
            if time.monotonic() >= deadline:
                raise Refused(
                    "room_elsewhere",
                    _("This visit's room is open on another server. Try again in a moment."),
                )
            await asyncio.sleep(0.25)

    async def renew_leases(self, live: Iterable[str]) -> int:
        """Extend this node's leases of the rooms it holds (every `leases.RENEW_S`).

        The ids are looked up `_RENEW_STEP` at a time, letting the loop run in between: with
        9,950 rooms, looking them all up in one step held the loop 8-13 ms every second, and
        the relays that arrived meanwhile waited (relay p99 5.1-5.7 ms at 19,900 participants).
        """
        ids, missing = await self._known_visit_ids(live)
        for room_id in missing:
            found = await self._visit_id(room_id)
            if found is not None:
                ids.append(found)
        if not ids:
            return 0
        until = self.clock() + self.lease_s
        return await self._database().execute_write_fn(
            lambda db: leases.renew_sync(db, self.node, ids, until)
        )

    async def _known_visit_ids(self, rooms: Iterable[str]) -> tuple[list[int], list[str]]:
        """The visit ids of `rooms` (a snapshot: it is walked across awaits) this node knows, and
        the rooms it does not, looked up `_RENEW_STEP` at a time with the loop let run in between."""
        known = self._visit_ids
        ids: list[int] = []
        missing: list[str] = []
        walk = iter(rooms)
        while step := list(itertools.islice(walk, _RENEW_STEP)):
            if ids or missing:  # not the first step
                await asyncio.sleep(0)
            for room_id in step:
                found = known.get(room_id)
                if found is None:
                    missing.append(room_id)
                else:
                    ids.append(found)
        return ids, missing

    def _patient_token(self, token: str, now: float) -> tuple[str, str]:
        try:
            parsed = calllinks.decode(self.settings, token, now)
        except calllinks.CallLinkNotYetValid as exc:
            raise Refused("too_early", exc.message) from None
        except calllinks.CallLinkExpired as exc:
            raise Refused("too_late", exc.message) from None
        except calllinks.CallLinkInvalid as exc:
            raise Refused("invalid_token", exc.message) from None
        if parsed.role != "patient":
            # The doctor's own call link leads to the consult room, which mints a host token.
            raise Refused("invalid_token", _("Open the consult room from your clinic page."))
        return parsed.public_id, parsed.nonce

    async def _visit_id(self, room_id: str) -> int | None:
        found = self._visit_ids.get(room_id)
        if found is None:
            row = await self._database().query_one("SELECT id FROM visits WHERE public_id = ?", [room_id])
            if row is None:
                return None
            found = self._visit_ids[room_id] = row[0]
            if len(self._visit_ids) > _VISIT_IDS_MAX:
                self._visit_ids.pop(next(iter(self._visit_ids)))
        return found

    async def load_state(self, room_id: str) -> RoomState | None:
        row = await self._database().query_one(
            "SELECT r.started_at, r.ended_at, r.end_reason FROM rooms r"
            " JOIN visits v ON v.id = r.visit_id WHERE v.public_id = ?",
            [room_id],
        )
        if row is None:
            return None
        return RoomState(room_id, row["started_at"], row["ended_at"], row["end_reason"])

    async def save_state(self, state: RoomState) -> None:
        visit_id = await self._visit_id(state.room_id)
        if visit_id is None:
            return
        now = self.clock()
        tz = self.settings.timezone
        if state.ended_at is not None:
            # The end is one fact: room row, "ended" event, summary and visit status together.
            ended_at, reason = state.ended_at, state.end_reason or closing.TIME_LIMIT
            await self._database().execute_write_fn(
                lambda db: closing.end_room_sync(db, visit_id, reason, ended_at, now=now, tz=tz)
            )
            return

        def write(db: sqlite_utils.Database) -> None:
            # Never reopens an ended room (the end is final).
            db.execute(
                "INSERT INTO rooms (visit_id, started_at, ended_at, end_reason, updated)"
                " VALUES (?, ?, NULL, NULL, ?) ON CONFLICT(visit_id) DO UPDATE SET"
                " started_at = excluded.started_at, updated = excluded.updated"
                " WHERE rooms.ended_at IS NULL",
                [visit_id, state.started_at, now],
            )

        await self._database().execute_write_fn(write)

    def _event_data(self, event: RoomEvent) -> dict[str, Any]:
        data = dict(event.data)
        if event.name == "joined" and event.role is not None:
            peer = self._peers.get((event.room_id, event.role))
            if peer is not None and peer.user_agent:
                data["user_agent"] = peer.user_agent[:400]
        if self.settings.mask_addresses and data.get("remote"):
            data["remote"] = mask_address(str(data["remote"]))
        return data

    async def _nudge_board(self, event: RoomEvent) -> None:
        """Open clinic boards of the room's doctor read the room's state again."""
        if self.app is None or event.name not in BOARD_EVENTS:
            return
        doctor_id = self._doctor_ids.get(event.room_id)
        if doctor_id is None:
            row = await self._database().query_one(
                "SELECT doctor_id FROM visits WHERE public_id = ?", [event.room_id]
            )
            if row is None:
                return
            doctor_id = row[0]
        live.publish(self.app, live.board_topic(doctor_id))

    async def on_event(self, event: RoomEvent) -> bool | None:
        """Store the event; False when its seat's budget is used up (see the module doc)."""
        return (await self.on_events([event]))[0]

    async def on_events(self, events: list[RoomEvent]) -> list[bool | None]:
        """Store events in order in one write (one transaction: while a clinic's sockets connect
        at once, one commit and one wake-up of the loop for a burst, not for each event); for
        each, what `on_event` would answer. Each event is written in its own savepoint, so one
        that fails is lost alone, as it would be on its own."""
        writes: list[Callable[[sqlite_utils.Database], bool] | None] = []
        stored_bytes: list[int] = []
        for i, event in enumerate(events):
            if i and i % EVENTS_PER_STEP == 0:
                await asyncio.sleep(0)  # see EVENTS_PER_STEP
            try:
                writes.append(await self._event_write(event, stored_bytes))
            except Exception:
                log.exception("room event %s in room %s not stored", event.name, event.room_id)
                writes.append(None)

        def write_all(db: sqlite_utils.Database) -> list[bool | None]:
            results: list[bool | None] = []
            for event, write in zip(events, writes, strict=True):
                if write is None:
                    results.append(None)
                    continue
                db.execute("SAVEPOINT room_event")
                try:
                    results.append(write(db))
                except (DatabaseError, ValueError, TypeError, KeyError, OSError):
                    log.exception("room event %s in room %s not stored", event.name, event.room_id)
                    db.execute("ROLLBACK TO room_event")
                    results.append(None)
                db.execute("RELEASE room_event")
            return results

        try:
            if any(write is not None for write in writes):
                stored = await self._database().execute_write_fn(write_all)
            else:
                stored = [None] * len(events)
        finally:
            for i, event in enumerate(events):
                if i and i % EVENTS_PER_STEP == 0:
                    await asyncio.sleep(0)
                await self._nudge_board(event)
        if stored_bytes and self.app is not None:
            metrics.count(self.app, "recording_bytes", sum(stored_bytes))
        dropped = stored.count(False)
        if dropped and self.app is not None:
            metrics.count(self.app, "room_events_dropped", dropped)
        return [False if result is False else None for result in stored]

    async def _event_write(
        self, event: RoomEvent, stored_bytes: list[int]
    ) -> Callable[[sqlite_utils.Database], bool] | None:
        """The writer-thread function storing `event` (True: stored, False: over budget), or None
        when the room is no visit's."""
        visit_id = await self._visit_id(event.room_id)
        if visit_id is None:
            return None
        data = self._event_data(event)
        files: list[dict[str, Any]] = []
        data_dir = self.settings.files_dir
        if event.name == "recording_stopped":
            files = list(data.get("files") or [])
            # The log keeps file names, not the server's absolute paths.
            data["files"] = [
                {k: v for k, v in f.items() if k != "path"} | {"name": Path(str(f.get("path"))).name}
                for f in files
            ]
        encoded = json.dumps(data, ensure_ascii=False, default=str)
        tz = self.settings.timezone
        if event.name == "ended":
            self._peers.pop((event.room_id, "host"), None)
            self._peers.pop((event.room_id, "guest"), None)
        seat = event.role if event.role in ("host", "guest") else ""
        budget = self.seat_budget if seat else self.room_budget
        rows = 2 if event.name == "stats" else 1
        size = len(encoded.encode()) + len(event.name) + len(seat) + EVENT_ROW_BYTES
        size += SAMPLE_ROW_BYTES if event.name == "stats" else 0

        def fold(db: sqlite_utils.Database) -> None:
            # The summary is a derived view: a bug there must not lose the event itself.
            db.execute("SAVEPOINT summary")
            try:
                sessionlog.apply_event_sync(db, visit_id, event.name, event.role, event.created, data, tz=tz)
            except (DatabaseError, ValueError, TypeError, KeyError):
                log.exception("session summary failed for %s in visit %s", event.name, visit_id)
                db.execute("ROLLBACK TO summary")
            db.execute("RELEASE summary")

        def write(db: sqlite_utils.Database) -> bool:
            if event.name == "ended":
                # Normally written already by save_state; this completes what a failed write left.
                reason = str(data.get("reason") or closing.TIME_LIMIT)
                closing.end_room_sync(db, visit_id, reason, event.created, now=event.created, tz=tz)
                return True
            if event.name not in ALWAYS_STORED and not _charge_sync(db, visit_id, seat, rows, size, budget):
                if event.name in _FOLD_OVER_BUDGET:
                    fold(db)
                return False
            db.execute(
                "INSERT INTO session_events (visit_id, created, name, role, data) VALUES (?, ?, ?, ?, ?)",
                [visit_id, event.created, event.name, event.role, encoded],
            )
            if files:
                stored_bytes.append(recordings.store_files_sync(db, data_dir, visit_id, files, event.created))
            fold(db)
            return True

        return write


# -- wiring -----------------------------------------------------------------------------------

SIGNALING = web.AppKey("signaling", SignalingServer)
POLICY = web.AppKey("call_policy", ConsultPolicy)


def signaling_config(settings: Settings) -> SignalingConfig:
    return SignalingConfig(
        turn_urls=tuple(settings.turn_urls),
        stun_urls=tuple(settings.stun_urls),
        turn_secret=settings.turn_secret if settings.turn_urls else "",
        ice_transport_policy=settings.ice_transport_policy,
        stats_fields=sessionlog.SAMPLE_KEYS,
    )


def setup_calls(app: web.Application) -> None:
    """Mount `/ws/rooms/{room_id}` with our policy; call after the database context is set up."""
    settings = app[keys.SETTINGS]
    policy = ConsultPolicy(settings)
    policy.app = app
    data_dir = settings.files_dir
    # Recording legs run in worker processes (started on the first leg), not on this loop.
    pool = RecordingPool(settings.recording_workers or None)
    server = SignalingServer(
        policy,
        signaling_config(settings),
        recording_dir=lambda room_id: recordings.room_dir(data_dir, room_id),
        recording_pool=pool,
    )
    app[POLICY] = policy
    app[SIGNALING] = server

    async def attach_database(app: web.Application) -> AsyncIterator[None]:
        policy.db = app[keys.DB]
        # Files of visits recorded when the server died (or whose write failed): each repaired
        # once and given its row (complete = 0) before any room opens. Listing is a quick read;
        # the remux and hashing run in a thread, off the database's threads.
        try:
            # A shared directory: files another node is still recording into are not this
            # start's to repair.
            grace = recordings.LIVE_GRACE_S if settings.shared_dir else 0.0
            interrupted = await policy.db.execute_fn(
                lambda db: recordings.interrupted_sync(db, data_dir, live_grace_s=grace)
            )
            if interrupted:
                found = await asyncio.to_thread(recordings.recover_files, interrupted, time.time())
                stored = await policy.db.execute_write_fn(
                    lambda db: recordings.store_interrupted_sync(db, found)
                )
                if stored:
                    log.warning("recordings interrupted by a crash, repaired: %s", ", ".join(stored))
        except Exception:
            log.exception("could not recover interrupted recordings")
        yield

    # Before the server's own context: its teardown flushes events into the still-open database.
    app.cleanup_ctx.append(attach_database)
    server.setup(app, WS_PATH)

    async def start_recording_workers(app: web.Application) -> None:
        # When the hospital records, the workers start with the server (in the background: a
        # visit's first leg need not wait for them to import aiortc); else on the first leg
        # (a department or doctor that records).
        if settings.recording_policy != "off":
            pool.start_soon()

    async def stop_recording_workers(app: web.Application) -> None:
        # After the server's shutdown closed every room (and so every recording leg).
        await pool.close()

    app.on_startup.append(start_recording_workers)
    app.on_cleanup.append(stop_recording_workers)


async def room_sweeper(app: web.Application) -> AsyncIterator[None]:
    """Close rooms nobody will end (``consult.calls.closing``): once at start-up, before the
    server listens, then every reaper interval until the app stops. Started by ``create_app``."""
    settings = app[keys.SETTINGS]
    server = app[SIGNALING]
    policy = app[POLICY]

    def length_s(doctor_minutes: int | None) -> float:
        return visit_length_s(settings, doctor_minutes)

    async def sweep() -> None:
        try:
            live = server.live_rooms()
            now = policy.clock()
            closed = await app[keys.DB].execute_write_fn(
                lambda db: closing.sweep_sync(
                    db, now, live=live, length_s=length_s, tz=settings.timezone, node=policy.node
                )
            )
            if closed:
                log.warning("closed rooms left open: %s", closed)
        except Exception:
            log.exception("closing rooms left open failed")

    async def run() -> None:
        while True:
            await asyncio.sleep(settings.reaper_interval_seconds)
            if leader.leads(app):
                await sweep()

    async def renew() -> None:
        while True:
            await asyncio.sleep(leases.RENEW_S)
            try:
                await policy.renew_leases(server.live_room_ids())
            except Exception:
                log.exception("renewing the rooms' leases failed")

    await sweep()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(run()), loop.create_task(renew())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A graceful stop (a rolling restart): the rooms' next node need not wait for the leases.
        try:
            released = await app[keys.DB].execute_write_fn(lambda db: leases.release_sync(db, policy.node))
            if released:
                log.info("gave up the leases of %d rooms", released)
        except Exception:
            log.exception("giving up the rooms' leases failed")
