"""Session summaries folded from room events, no-shows, keyset pagination, CSV cells, user agents."""

from __future__ import annotations

import math
import time
from datetime import date

import pytest

from consult import sessionlog
from consult.sessionlog import useragent
from tests import db_helpers
from tests.sessionlog_helpers import (
    CHROME_ANDROID,
    FIREFOX_WINDOWS,
    WECHAT_IOS,
    add_visit,
    full_call,
    make_world,
    read,
    record,
    write,
)


@pytest.fixture
def world(settings, make_user):
    return make_world(settings, make_user)


def summary(world, visit_id: int) -> dict:
    return read(world.settings, "SELECT * FROM session_summaries WHERE visit_id = ?", [visit_id])[0]


def test_full_call_produces_summary_and_samples(world):
    t0 = time.time() - 3600
    visit_id, _ = write(world.settings, lambda db: add_visit(db, world, int(t0)))
    write(world.settings, lambda db: record(db, visit_id, full_call(t0)))
    s = summary(world, visit_id)
    assert s["room_opened"] == t0
    assert s["first_joined_patient"] == t0 + 1
    assert s["first_joined_doctor"] == t0 + 30
    assert s["started_at"] == t0 + 60
    assert s["ended_at"] == t0 + 60 + 15 * 60
    assert (s["outcome"], s["end_reason"]) == ("completed", "time_limit")
    assert s["connected_seconds"] == 15 * 60
    assert s["used_turn"] == 1
    assert (s["reconnects"], s["ice_restarts"], s["recording"]) == (0, 0, 0)
    assert s["patient_device"] == "mobile · iOS 17.2 · WeChat 8.0"
    assert s["doctor_device"] == "desktop · Windows 10/11 · Firefox 121"
    assert s["day"] == sessionlog.local_day(t0, sessionlog.DEFAULT_TZ)
    samples = read(
        world.settings, "SELECT * FROM quality_samples WHERE visit_id = ? ORDER BY role, t", [visit_id]
    )
    assert len(samples) == 6
    doctor, patient = samples[0], samples[3]
    assert doctor["role"] == "doctor" and doctor["fps"] == 30 and doctor["loss_pct"] is None
    assert patient == {
        "visit_id": visit_id,
        "role": "patient",
        "t": 5,
        "bitrate_kbps": 801,
        "loss_pct": 0,
        "jitter_ms": 13,
        "fps": 24,
        "width": 640,
        "height": 480,
        "freezes": 0,
        "rtt_ms": 48,
    }


def test_reconnects_and_interruptions_count_only_connected_time(world):
    t0 = time.time() - 3600
    visit_id, _ = write(world.settings, lambda db: add_visit(db, world, int(t0)))
    events = [
        ("room_opened", None, t0, {}),
        ("joined", "host", t0, {"user_agent": FIREFOX_WINDOWS}),
        ("joined", "guest", t0 + 10, {"user_agent": CHROME_ANDROID}),
        ("admitted", "guest", t0 + 20, {}),
        ("clock_started", None, t0 + 20, {"started_at": t0 + 20, "ends_at": t0 + 920}),
        ("left", "guest", t0 + 120, {"reason": "disconnected"}),
        ("reconnect", "guest", t0 + 180, {}),
        ("joined", "guest", t0 + 180, {"user_agent": CHROME_ANDROID}),
        ("ice_restart", "host", t0 + 190, {}),
        ("ended", None, t0 + 300, {"reason": "host_ended"}),
    ]
    write(world.settings, lambda db: record(db, visit_id, events))
    s = summary(world, visit_id)
    assert s["connected_seconds"] == 100 + 120
    assert (s["reconnects"], s["ice_restarts"]) == (1, 1)
    assert (s["outcome"], s["end_reason"]) == ("completed", "host_ended")
    assert s["used_turn"] == 0
    assert s["patient_device"] == "mobile · Android 14 · Chrome 120"


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ([("left", "guest", 200, {"reason": "left"})], ("completed", "patient_left")),
        ([("left", "guest", 200, {"reason": "disconnected"})], ("failed", "connection_failed")),
        ([("ice_state", "guest", 200, {"state": "failed"})], ("failed", "connection_failed")),
        ([], ("completed", "time_limit")),
    ],
)
def test_end_reason_derived_from_how_the_visit_ran_out(world, tail, expected):
    t0 = time.time() - 3600
    visit_id, _ = write(world.settings, lambda db: add_visit(db, world, int(t0)))
    events = [
        ("joined", "host", t0, {}),
        ("joined", "guest", t0 + 1, {}),
        ("clock_started", None, t0 + 2, {"started_at": t0 + 2, "ends_at": t0 + 900}),
        *[(n, r, t0 + dt, d) for n, r, dt, d in tail],
        ("ended", None, t0 + 900, {"reason": "time_limit"}),
    ]
    write(world.settings, lambda db: record(db, visit_id, events))
    s = summary(world, visit_id)
    assert (s["outcome"], s["end_reason"]) == expected


def test_hostile_stats_are_bounded_and_events_for_unknown_visits_ignored(world):
    t0 = time.time() - 60
    visit_id, _ = write(world.settings, lambda db: add_visit(db, world, int(t0)))

    def fn(db):
        sessionlog.apply_event_sync(db, 999_999, "joined", "guest", t0, {})
        sessionlog.apply_event_sync(
            db,
            visit_id,
            "stats",
            "guest",
            t0,
            {"sample": {"bitrate_kbps": 1e300, "loss_pct": -5, "fps": "30", "rtt_ms": float("nan"), "x": 1}},
        )
        sessionlog.apply_event_sync(db, visit_id, "stats", "guest", t0, {"sample": "nonsense"})
        sessionlog.apply_event_sync(db, visit_id, "stats", None, t0, {"sample": {"fps": 1}})

    write(world.settings, fn)
    rows = read(world.settings, "SELECT * FROM quality_samples")
    assert len(rows) == 1
    assert rows[0]["bitrate_kbps"] == 100_000 and rows[0]["loss_pct"] == 0
    assert rows[0]["fps"] is None and rows[0]["rtt_ms"] is None
    assert read(world.settings, "SELECT count(*) AS n FROM session_summaries")[0]["n"] == 1


def test_no_show_marking(world):
    now = time.time()
    ids = write(
        world.settings,
        lambda db: {
            "nobody": add_visit(db, world, int(now - 3600))[0],
            "doctor_only": add_visit(db, world, int(now - 7200))[0],
            "cancelled": add_visit(db, world, int(now - 10800), status="cancelled")[0],
            "running": add_visit(db, world, int(now - 300))[0],
            "future": add_visit(db, world, int(now + 3600))[0],
            "attended": add_visit(db, world, int(now - 14400))[0],
        },
    )
    write(
        world.settings,
        lambda db: (
            record(db, ids["doctor_only"], [("joined", "host", now - 7100, {})])
            or record(db, ids["attended"], full_call(now - 14400))
        ),
    )
    n = write(world.settings, lambda db: sessionlog.mark_no_shows_sync(db, now))
    assert n == 3
    assert write(world.settings, lambda db: sessionlog.mark_no_shows_sync(db, now)) == 0  # idempotent
    outcomes = {
        r["visit_id"]: (r["outcome"], r["end_reason"])
        for r in read(world.settings, "SELECT visit_id, outcome, end_reason FROM session_summaries")
    }
    assert outcomes[ids["nobody"]] == ("no_show", "no_show")
    assert outcomes[ids["doctor_only"]] == ("no_show", "no_show")
    assert outcomes[ids["cancelled"]] == ("cancelled", None)
    assert outcomes[ids["attended"]] == ("completed", "time_limit")
    assert ids["running"] not in outcomes and ids["future"] not in outcomes


def seed_many(world, n: int, *, same_start_every: int = 7) -> list[int]:
    """``n`` summaries, with runs of identical start times to exercise the tie-breaker."""
    base = int(time.time()) - 86400 * 10

    def fn(db) -> list[int]:
        out = []
        for i in range(n):
            # Status no_show: the one-visit-per-slot index does not apply, so starts can tie.
            visit_id, _ = add_visit(db, world, base + (i // same_start_every) * 900, status="no_show")
            db.execute(
                "INSERT INTO session_summaries (visit_id, department_id, doctor_id, patient_id, day,"
                " scheduled_start, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    visit_id,
                    world.department_id,
                    world.doctor_id,
                    world.patient_id,
                    sessionlog.local_day(base + (i // same_start_every) * 900, sessionlog.DEFAULT_TZ),
                    base + (i // same_start_every) * 900,
                    "completed" if i % 3 else "no_show",
                ],
            )
            out.append(visit_id)
        return out

    return write(world.settings, fn)


@pytest.mark.parametrize("outcome", [None, "no_show"])
def test_keyset_pagination_returns_each_session_once(world, outcome):
    ids = seed_many(world, 130)
    f = sessionlog.Filters(outcome=outcome)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        rows, cursor = db_helpers.read(
            world.settings, lambda db, c=cursor: sessionlog.list_sessions_sync(db, f, c, limit=20)
        )
        pages += 1
        seen += [r["visit_id"] for r in rows]
        keys = [(r["scheduled_start"], r["visit_id"]) for r in rows]
        assert keys == sorted(keys, reverse=True)
        if cursor is None:
            break
    expected = [i for n, i in enumerate(ids) if outcome is None or n % 3 == 0]
    assert len(seen) == len(set(seen))
    assert set(seen) == set(expected)
    assert pages == math.ceil(len(expected) / 20)


@pytest.mark.parametrize(
    ("filters", "sessions"),
    [
        ({}, 130),
        ({"outcome": "no_show"}, 44),
        ({"q": "Li Lei"}, 130),
        ({"q": "nobody at all"}, 0),
        ({"date_from": date(2024, 1, 1), "date_to": date(2024, 1, 31)}, 0),
    ],
)
def test_the_list_page_reads_what_the_full_list_reads(world, filters, sessions):
    """list_page_sync (the page: a few columns, tuples) and list_sessions_sync (CSV: every column)
    share one keyset query: the same sessions, in the same order, with the same cursors."""
    seed_many(world, 130, same_start_every=3)
    f = sessionlog.Filters(**filters)

    def walk(db) -> int:
        cursor_full = cursor_page = None
        seen = 0
        while True:
            full, cursor_full = sessionlog.list_sessions_sync(db, f, cursor_full, limit=20)
            page, cursor_page = sessionlog.list_page_sync(db, f, cursor_page, limit=20)
            assert [r._asdict() for r in page] == [
                {k: r[k] for k in sessionlog.PageRow._fields} for r in full
            ]
            assert cursor_page == cursor_full
            seen += len(page)
            if cursor_full is None:
                return seen

    assert db_helpers.read(world.settings, walk) == sessions


@pytest.mark.sqlite_only("SQLite's query planner (EXPLAIN QUERY PLAN)")
def test_list_uses_an_index_for_order_and_filters(world):
    seed_many(world, 10)

    def check(db) -> None:
        for f in (
            sessionlog.Filters(),
            sessionlog.Filters(doctor_id=world.doctor_id),
            sessionlog.Filters(outcome="failed"),
            sessionlog.Filters(date_from=date(2024, 1, 1), date_to=date(2024, 1, 31)),
        ):
            where, params = sessionlog.queries._where(db, f, sessionlog.DEFAULT_TZ)
            where.append("(s.scheduled_start, s.visit_id) < (?, ?)")
            sql = (
                "EXPLAIN QUERY PLAN SELECT s.visit_id FROM session_summaries s"  # noqa: S608
                + (" WHERE " + " AND ".join(where))
                + " ORDER BY s.scheduled_start DESC, s.visit_id DESC LIMIT 51"
            )
            plan = " | ".join(r[3] for r in db.execute(sql, [*params, 2**40, 2**40]).fetchall())
            assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
            assert "TEMP B-TREE" not in plan, plan

    db_helpers.read(world.settings, check)


def test_search_by_name_phone_and_visit_number(world, make_user, settings):
    other = make_user("patient", login="13900000009", name="Han Meimei")
    ids = seed_many(world, 3)
    v_other, public_other = write(
        world.settings, lambda db: add_visit(db, world, int(time.time()), patient_id=other)
    )
    write(
        world.settings,
        lambda db: sessionlog.apply_event_sync(db, v_other, "room_opened", None, time.time(), {}),
    )

    def found(q: str) -> set[int]:
        return {
            r["visit_id"]
            for r in db_helpers.read(
                world.settings, lambda db: sessionlog.list_sessions_sync(db, sessionlog.Filters(q=q))[0]
            )
        }

    assert found("Meimei") == {v_other}
    assert found("0000000") == {v_other}
    assert found(public_other) == {v_other}
    assert found(str(ids[1])) == {ids[1]}
    assert found("Li Lei") == set(ids)
    assert found("%") == set()
    assert found("nobody at all") == set()


def test_filters_parse_leniently_and_round_trip():
    f = sessionlog.Filters.from_query(
        {
            "from": "2024-02-30",
            "to": "2024-03-01",
            "outcome": "completed",
            "end_reason": "bogus",
            "doctor": "x",
        }
    )
    assert f.date_from is None and f.date_to == date(2024, 3, 1)
    assert f.outcome == "completed" and f.end_reason is None and f.doctor_id is None
    assert set(f.errors) == {"from", "end_reason", "doctor"}
    assert sessionlog.Filters.from_query(f.to_query()) == f
    assert sessionlog.decode_cursor("123.45") == (123, 45)
    assert sessionlog.decode_cursor("1;DROP") is None


@pytest.mark.parametrize(
    ("cell", "safe"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1234", "'+1234"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("Li Lei", "Li Lei"),
        (5, 5),
    ],
)
def test_csv_cells_cannot_become_formulas(cell, safe):
    assert sessionlog.csv_safe(cell) == safe


@pytest.mark.parametrize(
    ("ua", "label"),
    [
        (WECHAT_IOS, "mobile · iOS 17.2 · WeChat 8.0"),
        (CHROME_ANDROID, "mobile · Android 14 · Chrome 120"),
        (FIREFOX_WINDOWS, "desktop · Windows 10/11 · Firefox 121"),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
            " Version/17.2 Safari/605.1.15",
            "desktop · macOS 10.15 · Safari 17.2",
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
            " Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91",
            "desktop · Windows 10/11 · Edge 120",
        ),
        (
            "Mozilla/5.0 (Linux; Android 10; HarmonyOS; ELS-AN00) AppleWebKit/537.36 (KHTML, like Gecko)"
            " Chrome/99.0 HuaweiBrowser/14.0.1.300 Mobile Safari/537.36",
            "mobile · HarmonyOS · Huawei Browser 14.0",
        ),
        (
            "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko)"
            " Version/16.6 Mobile/15E148 Safari/604.1",
            "tablet · iPadOS 16.6 · Safari 16.6",
        ),
        ("Python/3.11 aiohttp/3.9.1", "Python 3.11"),
        (None, "unknown"),
        ("", "unknown"),
    ],
)
def test_user_agent_labels(ua, label):
    assert useragent.label(ua) == label
