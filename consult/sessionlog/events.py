"""Folding room events into a visit's summary row and its quality samples, and closing no-shows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlite_utils

from consult.sessionlog import useragent
from consult.sessionlog.common import DEFAULT_TZ, END_REASONS, SAMPLE_FIELDS, local_day, number, side

# Upper bounds keep one hostile client from storing absurd numbers; all fit SQLite's small ints.
_SAMPLE_LIMITS = {
    "bitrate_kbps": 100_000,
    "loss_pct": 100,
    "jitter_ms": 60_000,
    "fps": 240,
    "width": 8192,
    "height": 8192,
    "freezes": 100_000,
    "rtt_ms": 60_000,
}
# camelCase names as they come out of getStats(), for clients that forward them unchanged.
_SAMPLE_ALIASES = {
    "framesPerSecond": "fps",
    "frameWidth": "width",
    "frameHeight": "height",
    "freezeCount": "freezes",
}
# Every key of a stats sample that normalize_sample reads (the signaling server keeps only these).
SAMPLE_KEYS = (*SAMPLE_FIELDS, *_SAMPLE_ALIASES)
MAX_SAMPLES_PER_VISIT = 4000  # both sides, one every 2-5 s: hours of call
_INSERT_SAMPLE = (
    "INSERT INTO quality_samples (visit_id, role, t, "  # noqa: S608 - fixed column names
    + ", ".join(SAMPLE_FIELDS)
    + ") VALUES (?, ?, ?, "
    + ", ".join("?" for _ in SAMPLE_FIELDS)
    + ")"
)
_STATE_COLUMNS = (
    "room_opened",
    "first_joined_patient",
    "first_joined_doctor",
    "started_at",
    "ended_at",
    "end_reason",
    "outcome",
    "connected_seconds",
    "used_turn",
    "reconnects",
    "ice_restarts",
    "patient_device",
    "doctor_device",
    "recording",
    "patient_present",
    "doctor_present",
    "patient_left_reason",
    "doctor_left_reason",
    "both_since",
    "ice_failed",
    "samples",
)
# The events a summary is folded from. Any other (a refused join's "error", chat, warnings) is
# kept in session_events only: it neither changes a summary nor creates one, so a join refused
# as too early leaves no "in progress" session behind.
FOLDED_EVENTS = frozenset(
    {
        "room_opened",
        "joined",
        "left",
        "clock_started",
        "ice_state",
        "reconnect",
        "ice_restart",
        "recording_started",
        "recording",
        "ended",
        "stats",
    }
)


def _ensure_summary(db: sqlite_utils.Database, visit_id: int, tz: str) -> dict[str, Any] | None:
    row = db.execute("SELECT * FROM session_summaries WHERE visit_id = ?", [visit_id]).fetchone()
    if row is not None:
        return dict(row)
    visit = db.execute(
        "SELECT id, department_id, doctor_id, patient_id, starts_at FROM visits WHERE id = ?", [visit_id]
    ).fetchone()
    if visit is None:
        return None
    db.execute(
        "INSERT INTO session_summaries (visit_id, department_id, doctor_id, patient_id, day,"
        " scheduled_start) VALUES (?, ?, ?, ?, ?, ?)",
        [visit[0], visit[1], visit[2], visit[3], local_day(visit[4], tz), visit[4]],
    )
    return dict(db.execute("SELECT * FROM session_summaries WHERE visit_id = ?", [visit_id]).fetchone())


def normalize_sample(sample: Any) -> dict[str, int] | None:
    """A client's stats sample as bounded integers; None when it carries nothing we chart."""
    if not isinstance(sample, Mapping):
        return None
    out: dict[str, int] = {}
    for key, raw in sample.items():
        name = _SAMPLE_ALIASES.get(key, key)
        if name not in _SAMPLE_LIMITS or name in out:
            continue
        value = number(raw)
        if value is None:
            continue
        out[name] = round(min(max(value, 0.0), _SAMPLE_LIMITS[name]))
    return out or None


def _close_connected(s: dict[str, Any], at: float) -> None:
    if s["both_since"] is not None:
        s["connected_seconds"] += max(0, round(at - s["both_since"]))
        s["both_since"] = None


def _finish(s: dict[str, Any], reason: str | None, at: float) -> None:
    _close_connected(s, at)
    s["ended_at"] = s["ended_at"] or at
    if s["first_joined_patient"] is None:
        end_reason = "no_show"
    elif reason == "time_limit" and not s["patient_present"] and s["patient_left_reason"] == "left":
        end_reason = "patient_left"
    elif reason == "time_limit" and (
        s["ice_failed"]
        or (not s["patient_present"] and s["patient_left_reason"] == "disconnected")
        or (not s["doctor_present"] and s["doctor_left_reason"] == "disconnected")
    ):
        end_reason = "connection_failed"
    else:
        end_reason = reason if reason in END_REASONS else None
    s["end_reason"] = end_reason
    if end_reason == "no_show":
        s["outcome"] = "no_show"
    elif end_reason in ("connection_failed", "server_restart") or s["started_at"] is None:
        # server_restart: the server died mid-visit and nobody came back; a failure of ours.
        s["outcome"] = "failed"
    else:
        s["outcome"] = "completed"
    s["patient_present"] = s["doctor_present"] = 0


def apply_event_sync(
    db: sqlite_utils.Database,
    visit_id: int,
    name: str,
    role: str | None,
    created: float,
    data: dict[str, Any],
    *,
    tz: str = DEFAULT_TZ,
) -> None:
    """Fold one room event into the visit's summary (and quality samples). Writer thread only.

    ``role`` may be a signaling seat (host/guest) or an application role (doctor/patient).
    Events for unknown visits are ignored: a log must never make the call's write fail. Events
    not in ``FOLDED_EVENTS`` are ignored too (they create no summary).
    """
    if name not in FOLDED_EVENTS:
        return
    s = _ensure_summary(db, visit_id, tz)
    if s is None:
        return
    before = dict(s)
    who = side(role)
    data = data if isinstance(data, dict) else {}
    if name == "room_opened":
        s["room_opened"] = s["room_opened"] or created
        if s["outcome"] in ("in_progress", "no_show") and s["ended_at"] is None:
            s["outcome"] = "in_progress"
    elif name == "joined" and who:
        if s[f"first_joined_{who}"] is None:
            s[f"first_joined_{who}"] = created
        s[f"{who}_device"] = useragent.label(data.get("user_agent"))[:120]
        s[f"{who}_present"] = 1
        if who == "patient" and s["outcome"] == "no_show":
            s["outcome"], s["end_reason"] = "in_progress", None  # late, but came while it was open
        if s["started_at"] is not None and s["ended_at"] is None and s["patient_present"]:
            if s["doctor_present"] and s["both_since"] is None:
                s["both_since"] = created
    elif name == "left" and who:
        s[f"{who}_present"] = 0
        s[f"{who}_left_reason"] = str(data.get("reason") or "left")[:20]
        _close_connected(s, created)
    elif name == "clock_started":
        started = number(data.get("started_at")) or created
        s["started_at"] = s["started_at"] or started
        s["patient_present"] = s["doctor_present"] = 1  # the clock starts only with both there
        s["both_since"] = s["both_since"] or started
    elif name == "ice_state":
        if data.get("pair_type") == "relay":
            s["used_turn"] = 1
        state = data.get("state")
        if state == "failed":
            s["ice_failed"] = 1
        elif state in ("connected", "completed"):
            s["ice_failed"] = 0
    elif name == "reconnect":
        s["reconnects"] += 1
    elif name == "ice_restart":
        s["ice_restarts"] += 1
    elif name in ("recording_started", "recording"):
        s["recording"] = 1
    elif name == "ended":
        _finish(s, data.get("reason"), created)
    elif name == "stats" and who and s["samples"] < MAX_SAMPLES_PER_VISIT:
        sample = normalize_sample(data.get("sample"))
        if sample is not None:
            base = s["started_at"] or s["room_opened"] or s["scheduled_start"]
            db.execute(
                _INSERT_SAMPLE,
                [visit_id, who, max(0, int(created - base)), *(sample.get(f) for f in SAMPLE_FIELDS)],
            )
            s["samples"] += 1
    changed = [c for c in _STATE_COLUMNS if s[c] != before[c]]
    if changed:
        db.execute(
            "UPDATE session_summaries SET "  # noqa: S608 - column names come from _STATE_COLUMNS
            + ", ".join(f"{c} = ?" for c in changed)
            + " WHERE visit_id = ?",
            [*(s[c] for c in changed), visit_id],
        )


def mark_no_shows_sync(
    db: sqlite_utils.Database, now: float, *, tz: str = DEFAULT_TZ, lookback_s: float = 7 * 86400
) -> int:
    """Close visits whose window passed without the patient joining; record cancelled ones.

    Idempotent, and bounded by ``lookback_s`` so that it can run every reaper interval.
    Returns how many summaries it wrote.
    """
    rows = db.execute(
        "SELECT v.id, v.status, v.ends_at, s.visit_id IS NOT NULL AS has_summary,"
        " s.first_joined_patient, s.outcome FROM visits v"
        " LEFT JOIN session_summaries s ON s.visit_id = v.id"
        " WHERE v.status IN ('confirmed', 'completed', 'no_show', 'cancelled')"
        " AND v.starts_at >= ? AND v.starts_at < ? AND v.ends_at <= ?",
        [int(now - lookback_s), int(now), now],
    ).fetchall()
    written = 0
    for visit_id, status, ends_at, has_summary, patient_joined, outcome in rows:
        if status == "cancelled":
            if not has_summary:
                _ensure_summary(db, visit_id, tz)
                db.execute(
                    "UPDATE session_summaries SET outcome = 'cancelled' WHERE visit_id = ?", [visit_id]
                )
                written += 1
            continue
        if patient_joined is not None or (has_summary and outcome != "in_progress"):
            continue
        s = _ensure_summary(db, visit_id, tz)
        if s is None:
            continue
        _finish(s, "no_show", min(now, float(ends_at)))
        db.execute(
            "UPDATE session_summaries SET ended_at = ?, end_reason = ?, outcome = ?, both_since = NULL,"
            " patient_present = 0, doctor_present = 0, connected_seconds = ? WHERE visit_id = ?",
            [s["ended_at"], s["end_reason"], s["outcome"], s["connected_seconds"], visit_id],
        )
        written += 1
    return written
