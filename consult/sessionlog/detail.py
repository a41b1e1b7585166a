"""One session: its summary, the timeline of its events and its quality samples."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlite_utils

from consult.sessionlog import useragent
from consult.sessionlog.common import SAMPLE_FIELDS, mask_address, number, side

MAX_TIMELINE = 3000


def session_detail_sync(db: sqlite_utils.Database, public_id: str) -> dict[str, Any] | None:
    visit = db.execute(
        "SELECT v.id, v.public_id, v.patient_id, v.doctor_id, v.starts_at, v.ends_at, v.status,"
        " p.display_name AS patient_name, p.phone AS patient_phone, d.display_name AS doctor_name,"
        " dep.name_en AS department_name_en, dep.name_zh AS department_name_zh"
        " FROM visits v JOIN users p ON p.id = v.patient_id JOIN users d ON d.id = v.doctor_id"
        " JOIN departments dep ON dep.id = v.department_id WHERE v.public_id = ?",
        [public_id],
    ).fetchone()
    if visit is None:
        return None
    visit = dict(visit)
    summary = db.execute("SELECT * FROM session_summaries WHERE visit_id = ?", [visit["id"]]).fetchone()
    events: list[dict[str, Any]] = []
    stats_events = 0
    # Stats are charted below, not listed: a 15-minute call sends hundreds of them.
    stats_events = db.execute(
        "SELECT count(*) FROM session_events WHERE visit_id = ? AND name = 'stats'", [visit["id"]]
    ).fetchone()[0]
    for r in db.execute(
        "SELECT created, name, role, data FROM session_events WHERE visit_id = ? AND name != 'stats'"
        " ORDER BY created, id LIMIT ?",
        [visit["id"], MAX_TIMELINE],
    ):
        try:
            data = json.loads(r["data"] or "{}")
        except (TypeError, ValueError):
            data = {}
        events.append(
            {
                "created": r["created"],
                "name": r["name"],
                "role": r["role"],
                "side": side(r["role"]),
                "data": data if isinstance(data, dict) else {},
            }
        )
    samples: dict[str, list[dict[str, Any]]] = {"patient": [], "doctor": []}
    for r in db.execute(
        "SELECT role, t, " + ", ".join(SAMPLE_FIELDS) + " FROM quality_samples"  # noqa: S608
        " WHERE visit_id = ? ORDER BY role, t",
        [visit["id"]],
    ):
        samples[r["role"]].append(dict(r))
    return {
        "visit": visit,
        "summary": dict(summary) if summary else None,
        "events": events,
        "stats_events": stats_events,
        "samples": samples,
    }


def describe_event(event: Mapping[str, Any], *, mask: bool) -> dict[str, str]:
    """What the timeline shows of an event's data: device and address for joins, etc.

    Chat text is patient data said in the call; the timeline records that a message was sent,
    not what it said.
    """
    data = event.get("data") or {}
    out: dict[str, str] = {}
    if event["name"] in ("joined", "replaced"):
        if data.get("user_agent"):
            out["device"] = useragent.label(str(data["user_agent"]))
        remote = data.get("remote")
        if remote:
            out["address"] = str(mask_address(str(remote)) if mask else remote)
    elif event["name"] == "ice_state":
        out["state"] = str(data.get("state") or "")
        if data.get("pair_type"):
            out["pair"] = str(data["pair_type"])
        if number(data.get("rtt_ms")) is not None:
            out["rtt"] = f"{number(data['rtt_ms']):.0f} ms"
    elif event["name"] in ("left", "ended"):
        out["reason"] = str(data.get("reason") or "")
    elif event["name"] == "warning":
        out["seconds_left"] = str(data.get("seconds_left") or "")
    elif event["name"] == "clock_started" and number(data.get("ends_at")) and number(data.get("started_at")):
        out["minutes"] = f"{(data['ends_at'] - data['started_at']) / 60:.0f}"
    elif event["name"] == "error":
        out["code"] = str(data.get("code") or "")
    elif event["name"] == "chat":
        out["chars"] = str(len(str(data.get("text") or "")))
    return {k: v for k, v in out.items() if v}
