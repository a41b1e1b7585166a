"""The end of a visit's room as one fact, and the sweep that closes rooms a dead server left open.

A room's end is one write (``end_room_sync``): the ``rooms`` row, the ``ended`` session event,
the admin session summary folded from it, and the visit's status (``booking.complete_sync``).
The signaling server persists the end through ``ConsultPolicy.save_state`` before it tells the
clients; the ``ended`` event that follows finds the end written and adds nothing. A crash before
that write leaves the room open and the visit confirmed; after it, everything is closed.

A room left open by a server that died (started, never ended, no live room in this process) is
closed by ``sweep_sync`` once its clock has run out, with reason ``server_restart``; a room that
was opened and joined but never started (the patient waited, the window passed) is closed with
``time_limit``. Until its clock runs out a restored visit continues: its clock is in ``rooms``.
The sweep runs at start-up, before the server listens, and every reaper interval
(``consult.calls.policy.room_sweeper``); each run closes at most ``limit`` rooms.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from typing import Any

import sqlite_utils

from consult import booking, sessionlog
from consult.calls import links as calllinks
from consult.core.db import DatabaseError

log = logging.getLogger(__name__)

SERVER_RESTART = "server_restart"
TIME_LIMIT = "time_limit"
SWEEP_LIMIT = 100
SWEEP_LOOKBACK_S = 7 * 86400
# Events that say nothing about whether anyone was still in the room.
_NOT_ALIVE = ("room_opened", "error")


def _last_sign_of_life(db: sqlite_utils.Database, visit_id: int, before: float) -> float | None:
    row = db.execute(
        "SELECT max(created) FROM session_events WHERE visit_id = ? AND created <= ? AND name NOT IN (?, ?)",
        [visit_id, before, *_NOT_ALIVE],
    ).fetchone()
    return None if row is None else row[0]


def end_room_sync(
    db: sqlite_utils.Database,
    visit_id: int,
    reason: str,
    ended_at: float,
    *,
    now: float,
    tz: str = sessionlog.DEFAULT_TZ,
) -> str | None:
    """End the visit's room: room row, ``ended`` event, summary and visit status, in this write.

    Idempotent and repairing: what is already written wins (the room row's end, else an
    ``ended`` event's), and only the missing parts are added. For ``server_restart`` the end is
    the room's last sign of life (its last event), not the moment the sweep noticed.
    Returns the end reason when anything changed, else None. Writer thread only.
    """
    room = db.execute(
        "SELECT started_at, ended_at, end_reason FROM rooms WHERE visit_id = ?", [visit_id]
    ).fetchone()
    event = db.execute(
        "SELECT created, data FROM session_events WHERE visit_id = ? AND name = 'ended' ORDER BY id LIMIT 1",
        [visit_id],
    ).fetchone()
    if room is not None and room["ended_at"] is not None:
        reason, ended_at = room["end_reason"] or reason, room["ended_at"]
    elif event is not None:
        try:
            reason = str(json.loads(event["data"]).get("reason") or reason)
        except (ValueError, AttributeError):
            pass
        ended_at = event["created"]
    elif reason == SERVER_RESTART:
        last = _last_sign_of_life(db, visit_id, ended_at)
        if last is not None:
            started = room["started_at"] if room is not None else None
            ended_at = max(last, started or last)
    changed = False
    if room is None or room["ended_at"] is None:
        db.execute(
            "INSERT INTO rooms (visit_id, started_at, ended_at, end_reason, updated)"
            " VALUES (?, NULL, ?, ?, ?)"
            " ON CONFLICT(visit_id) DO UPDATE SET ended_at = excluded.ended_at,"
            " end_reason = excluded.end_reason, updated = excluded.updated",
            [visit_id, ended_at, reason, now],
        )
        changed = True
    if event is None:
        data: dict[str, Any] = {"reason": reason}
        db.execute(
            "INSERT INTO session_events (visit_id, created, name, role, data)"
            " VALUES (?, ?, 'ended', NULL, ?)",
            [visit_id, ended_at, json.dumps(data)],
        )
        # The summary is a derived view: a bug there must not lose the end itself.
        db.execute("SAVEPOINT summary")
        try:
            sessionlog.apply_event_sync(db, visit_id, "ended", None, ended_at, data, tz=tz)
        except (DatabaseError, ValueError, TypeError, KeyError):
            log.exception("session summary failed for the end of visit %s", visit_id)
            db.execute("ROLLBACK TO summary")
        db.execute("RELEASE summary")
        changed = True
    if booking.complete_sync(db, visit_id, now):
        changed = True
    return reason if changed else None


def sweep_sync(
    db: sqlite_utils.Database,
    now: float,
    *,
    live: Collection[str],
    length_s: Callable[[int | None], float],
    tz: str = sessionlog.DEFAULT_TZ,
    limit: int = SWEEP_LIMIT,
    lookback_s: float = SWEEP_LOOKBACK_S,
    node: str | None = None,
) -> dict[str, int]:
    """Close the rooms nobody will end: ``{reason: how many}`` closed in this run.

    ``live``: public ids of the rooms this process holds (their own timers end them); a room
    whose lease another ``node`` holds and renews is that node's to end, and is left alone.
    ``length_s(doctor_minutes)``: a visit's length, as the policy admits it. At most ``limit``
    rooms per run, oldest first; running it again changes nothing.
    """
    closed: dict[str, int] = {}

    def close(visit_id: int, reason: str, ended_at: float) -> None:
        written = end_room_sync(db, visit_id, reason, ended_at, now=now, tz=tz)
        if written is not None:
            closed[written] = closed.get(written, 0) + 1

    # Started, never ended (the partial index rooms_open): the server that ran them died or
    # stopped, and nobody came back before the clock ran out.
    open_rooms = db.execute(
        "SELECT r.visit_id, r.started_at, v.public_id, d.visit_minutes, r.node, r.lease_until FROM rooms r"
        " JOIN visits v ON v.id = r.visit_id JOIN doctors d ON d.user_id = v.doctor_id"
        " WHERE r.ended_at IS NULL AND r.started_at IS NOT NULL ORDER BY r.started_at LIMIT ?",
        [limit * 4],
    ).fetchall()
    for row in open_rooms:
        clock_end = row["started_at"] + length_s(row["visit_minutes"])
        if sum(closed.values()) >= limit or row["public_id"] in live or clock_end > now:
            continue
        if row["node"] not in (None, node) and (row["lease_until"] or 0) > now:
            continue  # alive on another node: its own timer ends it
        close(row["visit_id"], SERVER_RESTART, clock_end)
    # Ended rooms whose visit stayed confirmed: written by a version that ended a room in two
    # writes and died between them. The room's own end is kept.
    for row in db.execute(
        "SELECT v.id FROM visits v JOIN rooms r ON r.visit_id = v.id WHERE v.status = 'confirmed'"
        " AND v.starts_at >= ? AND v.starts_at < ? AND r.ended_at IS NOT NULL ORDER BY v.starts_at LIMIT ?",
        [int(now - lookback_s), int(now), max(0, limit - sum(closed.values()))],
    ).fetchall():
        close(row["id"], TIME_LIMIT, now)
    # Joined by the patient but never started (nobody admitted them), and the time to join is
    # over: the visit ran out. Patients who never came are no-shows (mark_no_shows_sync).
    for row in db.execute(
        "SELECT s.visit_id, v.public_id, v.ends_at FROM session_summaries s"
        " JOIN visits v ON v.id = s.visit_id LEFT JOIN rooms r ON r.visit_id = s.visit_id"
        " WHERE s.outcome = 'in_progress' AND s.scheduled_start >= ? AND s.scheduled_start < ?"
        " AND s.first_joined_patient IS NOT NULL AND r.visit_id IS NULL AND v.status = 'confirmed'"
        " AND v.ends_at <= ? ORDER BY s.scheduled_start LIMIT ?",
        [
            int(now - lookback_s),
            int(now),
            now - calllinks.LATE_S,
            max(0, limit - sum(closed.values())) + len(live),
        ],
    ).fetchall():
        if sum(closed.values()) >= limit or row["public_id"] in live:
            continue
        close(row["visit_id"], TIME_LIMIT, float(row["ends_at"] + calllinks.LATE_S))
    return closed
