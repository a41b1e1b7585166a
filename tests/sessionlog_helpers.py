"""Set-up for the session-log and audit tests: visits and events written straight into the database."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from consult import sessionlog
from consult.core.config import Settings
from tests import db_helpers

CHROME_ANDROID = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.6099.144 Mobile Safari/537.36"
)
WECHAT_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Mobile/15E148 MicroMessenger/8.0.47(0x18002f2c) NetType/WIFI Language/zh_CN"
)
FIREFOX_WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"


@dataclass
class World:
    settings: Settings  # where the world lives: `write(world.settings, fn)`, either engine
    department_id: int
    doctor_id: int
    patient_id: int


def write(target: Any, fn) -> Any:
    """``fn(handle)`` in one write transaction of the test's database (`tests.db_helpers`)."""
    return db_helpers.write(target, fn)


def read(target: Any, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    return db_helpers.rows(target, sql, params)


def make_world(settings, make_user, *, patient_name: str = "Li Lei", phone: str = "13812345678") -> World:
    doctor_id = make_user("doctor", login="drwang", name="Dr Wang")
    patient_id = make_user("patient", login=phone, name=patient_name)

    def fn(db) -> int:
        dep = db_helpers.insert(
            db, "INSERT INTO departments (code, name_zh, name_en) VALUES ('cardio', '心内科', 'Cardiology')"
        )
        db.execute("INSERT INTO doctors (user_id) VALUES (?)", [doctor_id])
        db.execute(
            "INSERT INTO doctor_departments (doctor_id, department_id) VALUES (?, ?)", [doctor_id, dep]
        )
        return dep

    dep = write(settings, fn)
    return World(settings, dep, doctor_id, patient_id)


def add_visit(
    db: Any,
    world: World,
    starts_at: int,
    *,
    status: str = "confirmed",
    patient_id: int | None = None,
    minutes: int = 15,
) -> tuple[int, str]:
    public_id = secrets.token_urlsafe(12)
    now = time.time()
    visit_id = db_helpers.insert(
        db,
        "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
        " fee_minor, currency, created, updated, call_nonce)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 5000, 'CNY', ?, ?, ?)",
        [
            public_id,
            patient_id or world.patient_id,
            world.doctor_id,
            world.department_id,
            starts_at,
            starts_at + minutes * 60,
            status,
            now,
            now,
            secrets.token_hex(8),
        ],
    )
    return visit_id, public_id


def record(db: Any, visit_id: int, events: list[tuple[str, str | None, float, dict]]) -> None:
    """Store events as the call module does, and fold each into the summary."""
    for name, role, created, data in events:
        db.execute(
            "INSERT INTO session_events (visit_id, created, name, role, data) VALUES (?, ?, ?, ?, ?)",
            [visit_id, created, name, role, json.dumps(data)],
        )
        sessionlog.apply_event_sync(db, visit_id, name, role, created, data)


def full_call(t0: float, *, minutes: int = 15) -> list[tuple[str, str | None, float, dict]]:
    """A visit that runs to its time limit, TURN-relayed, with stats from both sides."""
    end = t0 + 60 + minutes * 60
    events: list[tuple[str, str | None, float, dict]] = [
        ("room_opened", None, t0, {}),
        (
            "joined",
            "guest",
            t0 + 1,
            {"participant": "Li Lei", "remote": "203.0.113.7", "user_agent": WECHAT_IOS},
        ),
        ("waiting", "guest", t0 + 1, {}),
        (
            "joined",
            "host",
            t0 + 30,
            {"participant": "Dr Wang", "remote": "10.1.2.3", "user_agent": FIREFOX_WINDOWS},
        ),
        ("admitted", "guest", t0 + 59, {}),
        ("clock_started", None, t0 + 60, {"started_at": t0 + 60, "ends_at": end}),
        ("ice_state", "guest", t0 + 62, {"state": "connected", "pair_type": "relay", "rtt_ms": 48}),
        ("ice_state", "host", t0 + 62, {"state": "connected", "pair_type": "host", "rtt_ms": 3}),
    ]
    for i in range(1, 4):
        events.append(
            (
                "stats",
                "guest",
                t0 + 60 + 5 * i,
                {
                    "sample": {
                        "bitrate_kbps": 800 + i,
                        "loss_pct": 0.4,
                        "jitter_ms": 12.6,
                        "fps": 24,
                        "width": 640,
                        "height": 480,
                        "freezes": 0,
                        "rtt_ms": 48,
                    }
                },
            )
        )
        events.append(
            ("stats", "host", t0 + 60 + 5 * i, {"sample": {"framesPerSecond": 30, "bitrate_kbps": 1500}})
        )
    events += [
        ("warning", None, end - 120, {"seconds_left": 120}),
        ("ended", None, end, {"reason": "time_limit"}),
        ("left", "guest", end + 0.1, {"reason": "disconnected"}),
        ("left", "host", end + 0.1, {"reason": "disconnected"}),
    ]
    return events
