"""The doctor's clinic board: today's visits in time order, each with its live state.

A visit's state comes from two places: the database (booked, finished, no-show; its reports and
how many are new since the doctor last looked) and the signaling server's live rooms (the
patient in the waiting room, both in the call). The board page and its event stream read
``snapshot``; the policy, the report uploads, cancellations and moves nudge the doctor's topic
(``consult.core.live``) so that open boards read it again.

Admitting from the board: the board's admit button posts (with CSRF) and gets a short-lived
ticket in the consult room's address (``make_admit_ticket``); the room, opened with a valid
ticket, admits the waiting patient through the room's own admit message. A link alone (a GET
from another site) carries no ticket and admits nobody.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import sqlite_utils

from consult.booking import late
from consult.core.config import Settings
from signaling import SignalingServer

# The order of a clinic: who can be seen next comes first among equals.
BOOKED, WAITING, IN_CALL, FINISHED, NO_SHOW = "booked", "waiting", "in_call", "finished", "no_show"
OPEN_STATES = (WAITING, IN_CALL, BOOKED)
ADMIT_TICKET_TTL_S = 120


def today_sync(db: sqlite_utils.Database, doctor_id: int, now: float, tz: str) -> dict[str, Any]:
    """The doctor's visits today (confirmed, completed, missed) with report counts, and how late
    the doctor said they are running."""
    _day, start, end = late.day_bounds(now, tz)
    rows = db.execute(
        "SELECT v.id, v.public_id, v.starts_at, v.ends_at, v.status, v.patient_id,"
        " u.display_name AS patient_name,"
        " (SELECT count(*) FROM reports r WHERE r.visit_id = v.id) AS reports,"
        " (SELECT count(*) FROM reports r WHERE r.visit_id = v.id"
        "  AND r.created > coalesce(l.looked_at, 0)) AS new_reports,"
        " rm.started_at, rm.ended_at"
        " FROM visits v JOIN users u ON u.id = v.patient_id"
        " LEFT JOIN report_looks l ON l.visit_id = v.id"
        " LEFT JOIN rooms rm ON rm.visit_id = v.id"
        " WHERE v.doctor_id = ? AND v.status IN ('confirmed', 'completed', 'no_show')"
        " AND v.starts_at >= ? AND v.starts_at < ? ORDER BY v.starts_at, v.id LIMIT 200",
        [doctor_id, start, end],
    ).fetchall()
    return {"visits": [dict(r) for r in rows], "late": late.running_late_sync(db, doctor_id, now, tz)}


def live_state(server: SignalingServer | None, visit: dict[str, Any]) -> str:
    """One visit's state now: the database says finished or missed; the live room says who is
    in it; otherwise the visit is booked."""
    if visit["status"] == "completed" or visit.get("ended_at") is not None:
        return FINISHED
    if visit["status"] == "no_show":
        return NO_SHOW
    room = server.rooms.get(visit["public_id"]) if server is not None else None
    if room is None or room.ended:
        return BOOKED
    if room.in_call or (room.started and room.slots["guest"] is not None):
        return IN_CALL
    if room.slots["guest"] is not None:
        return WAITING
    return BOOKED


def with_states(server: SignalingServer | None, found: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**v, "state": live_state(server, v)} for v in found["visits"]]


def next_visit(visits: list[dict[str, Any]], after: str | None) -> dict[str, Any] | None:
    """Whom to see next: the first patient waiting, else the first visit still booked (in time
    order), never the visit just finished."""
    for wanted in (WAITING, BOOKED):
        for v in visits:
            if v["state"] == wanted and v["public_id"] != after:
                return v
    return None


# -- admitting from the board ----------------------------------------------------------------


def _admit_mac(settings: Settings, public_id: str, doctor_id: int, expires: int) -> str:
    msg = f"admit|{public_id}|{doctor_id}|{expires}".encode()
    digest = hmac.new(settings.session_key.encode(), msg, hashlib.sha256).digest()[:18]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_admit_ticket(settings: Settings, public_id: str, doctor_id: int, now: float) -> str:
    expires = int(now) + ADMIT_TICKET_TTL_S
    return f"{expires}.{_admit_mac(settings, public_id, doctor_id, expires)}"


def admit_ticket_valid(settings: Settings, ticket: str, public_id: str, doctor_id: int, now: float) -> bool:
    expires_s, _sep, mac = ticket.partition(".")
    if not expires_s.isdigit() or len(expires_s) > 12 or int(expires_s) < now:
        return False
    return hmac.compare_digest(mac, _admit_mac(settings, public_id, doctor_id, int(expires_s)))
