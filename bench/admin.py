"""Admin session list and CSV export against a real server with 100,000 sessions.

    python bench/admin.py                    # 100,000 sessions
    python bench/admin.py --sessions 5000    # a quick run

Creates a throw-away data directory (``consult init``), writes departments, doctors, patients,
visits and their session summaries straight into SQLite (executemany), starts
``python -m consult serve --no-tls`` on 127.0.0.1, signs in as an admin over HTTP and times:
the first list page, deep pages reached by following the "older" cursor, filtered queries
(doctor, department, outcome, end reason, date range, search), and a full CSV export.
Only loopback traffic. The last stdout line is one JSON object:
``{"list_p50_ms": ..., "list_p99_ms": ..., "csv_rows_per_s": ...}``; the target is p99 < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
from common import wait_ready  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
TZ = "Asia/Shanghai"
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')
OLDER_RE = re.compile(r'<a href="([^"]+)" data-testid="older">')
ROW_RE = re.compile(r'<tr data-visit="')
ADMIN, ADMIN_PASSWORD = "benchadmin", "bench-admin-password"
OUTCOMES = (
    ("completed", "time_limit", 60),
    ("completed", "host_ended", 15),
    ("completed", "patient_left", 5),
    ("failed", "connection_failed", 5),
    ("no_show", "no_show", 10),
    ("cancelled", None, 5),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(db_path: Path, sessions: int, doctors: int, departments: int, patients: int, seed: int) -> dict:
    rng = random.Random(seed)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode = WAL")
    now = time.time()
    tz = ZoneInfo(TZ)
    with conn:
        conn.executemany(
            "INSERT INTO departments (id, code, name_zh, name_en) VALUES (?, ?, ?, ?)",
            [(d, f"dep{d}", f"科室{d}", f"Department {d}") for d in range(1, departments + 1)],
        )
        first_user = (conn.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0]) + 1
        doctor_ids = list(range(first_user, first_user + doctors))
        patient_ids = list(range(first_user + doctors, first_user + doctors + patients))
        conn.executemany(
            "INSERT INTO users (id, role, username, phone, display_name, password_hash, created,"
            " password_changed) VALUES (?, ?, ?, ?, ?, '!', ?, ?)",
            [(u, "doctor", f"doc{u}", None, f"Doctor {u}", now, now) for u in doctor_ids]
            + [(u, "patient", None, f"139{u:08d}", f"Patient {u}", now, now) for u in patient_ids],
        )
        conn.executemany("INSERT INTO doctors (user_id) VALUES (?)", [(u,) for u in doctor_ids])
        conn.executemany(
            "INSERT INTO doctor_departments (doctor_id, department_id) VALUES (?, ?)",
            [(u, 1 + i % departments) for i, u in enumerate(doctor_ids)],
        )
        # Each doctor's visits sit in distinct slots (the one-visit-per-slot index), spread
        # evenly back from now so that the date filters and the overview have something to find.
        per_doctor = -(-sessions // doctors)
        step = max(900, int(365 * 86400 / per_doctor))
        visits, summaries = [], []
        weights = [w for *_x, w in OUTCOMES]
        for i in range(sessions):
            vid = i + 1
            doc_index = i % doctors
            doctor = doctor_ids[doc_index]
            starts = int(now) - (i // doctors + 1) * step - doc_index * 60
            patient = rng.choice(patient_ids)
            outcome, end_reason, _w = rng.choices(OUTCOMES, weights)[0]
            status = {"no_show": "no_show", "cancelled": "cancelled"}.get(outcome, "completed")
            visits.append(
                (
                    vid,
                    f"bench{vid:010d}",
                    patient,
                    doctor,
                    1 + doc_index % departments,
                    starts,
                    starts + 900,
                    status,
                    5000,
                    "CNY",
                    now,
                    now,
                    "nonce",
                )
            )
            connected = rng.randint(300, 900) if outcome == "completed" else 0
            started = starts + rng.randint(0, 120) if outcome in ("completed", "failed") else None
            summaries.append(
                (
                    vid,
                    1 + doc_index % departments,
                    doctor,
                    patient,
                    datetime.fromtimestamp(starts, UTC).astimezone(tz).date().isoformat(),
                    starts,
                    starts - 30 if started else None,
                    started,
                    started,
                    started + connected if started else None,
                    end_reason,
                    outcome,
                    connected,
                    int(rng.random() < 0.2),
                    rng.choice((0, 0, 0, 1, 2)),
                    rng.choice((0, 0, 1)),
                    "mobile · Android 14 · WeChat 8.0",
                    "desktop · Windows 10/11 · Chrome 120",
                )
            )
        conn.executemany(
            "INSERT INTO visits (id, public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
            " status, fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            visits,
        )
        conn.executemany(
            "INSERT INTO session_summaries (visit_id, department_id, doctor_id, patient_id, day,"
            " scheduled_start, room_opened, first_joined_patient, started_at, ended_at, end_reason,"
            " outcome, connected_seconds, used_turn, reconnects, ice_restarts, patient_device,"
            " doctor_device) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s[0],
                    s[1],
                    s[2],
                    s[3],
                    s[4],
                    s[5],
                    s[6],
                    s[7],
                    s[8],
                    s[9],
                    s[10],
                    s[11],
                    s[12],
                    s[13],
                    s[14],
                    s[15],
                    s[16],
                    s[17],
                )
                for s in summaries
            ],
        )
    conn.execute("ANALYZE")
    conn.close()
    return {"doctor_ids": doctor_ids, "patient_ids": patient_ids, "oldest": min(v[5] for v in visits)}


async def sign_in(session: aiohttp.ClientSession, base: str) -> None:
    async with session.get(base + "/login") as r:
        token = CSRF_RE.search(await r.text())
    assert token, "no CSRF token on /login"
    async with session.post(
        base + "/login",
        data={"identifier": ADMIN, "password": ADMIN_PASSWORD, "csrf_token": token.group(1)},
        allow_redirects=False,
    ) as r:
        if r.status != 303:
            raise SystemExit(f"admin sign-in failed: {r.status}")


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    start = time.perf_counter()
    async with session.get(url) as r:
        body = await r.text()
        if r.status != 200:
            raise SystemExit(f"GET {url}: {r.status}")
    return (time.perf_counter() - start) * 1000, body


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(base: str, built: dict, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed + 1)
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        await sign_in(session, base)
        lists = base + "/admin/sessions"
        for _ in range(3):  # warm the page cache and the template
            await timed_get(session, lists)
        timings: dict[str, list[float]] = {"first": [], "deep": [], "filtered": []}
        for _ in range(args.repeat):
            ms, _body = await timed_get(session, lists)
            timings["first"].append(ms)
        # Deep pages: follow the cursor, as an admin clicking "older" would.
        url: str | None = lists
        depth = 0
        while url and depth < args.deep_pages:
            ms, body = await timed_get(session, url)
            timings["deep"].append(ms)
            m = OLDER_RE.search(body)
            url = base + m.group(1).replace("&amp;", "&") if m else None
            depth += 1
        # Far back in time: a cursor near the oldest session.
        for _ in range(args.repeat):
            cursor = f"{built['oldest'] + rng.randint(0, 86400 * 30)}.999999999"
            ms, _body = await timed_get(session, f"{lists}?cursor={cursor}")
            timings["deep"].append(ms)
        old_day = datetime.fromtimestamp(built["oldest"] + 86400 * 100, UTC).date()
        filters = [
            "doctor={}".format(rng.choice(built["doctor_ids"])),
            "department=3",
            "outcome=failed",
            "end_reason=patient_left",
            "outcome=no_show&department=2",
            f"from={old_day}&to={old_day + timedelta(days=7)}",
            "q=Patient+{}".format(rng.choice(built["patient_ids"])),
            "q=139{:08d}".format(rng.choice(built["patient_ids"])),
            "q=bench0000012345",
        ]
        for _ in range(max(1, args.repeat // len(filters))):
            for f in filters:
                ms, body = await timed_get(session, f"{lists}?{f}")
                timings["filtered"].append(ms)
                m = OLDER_RE.search(body)
                if m:  # and the second page of the same filter
                    ms, _body = await timed_get(session, base + m.group(1).replace("&amp;", "&"))
                    timings["filtered"].append(ms)
        overview_ms, _body = await timed_get(session, base + "/admin/sessions/overview")
        # CSV export of everything.
        start = time.perf_counter()
        rows = -1  # the header
        async with session.get(base + "/admin/sessions.csv") as r:
            assert r.status == 200, r.status
            async for _line in r.content:
                rows += 1
        csv_s = time.perf_counter() - start
    every = timings["first"] + timings["deep"] + timings["filtered"]
    return {
        "timings": timings,
        "all": every,
        "overview_ms": overview_ms,
        "csv_rows": rows,
        "csv_s": csv_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=100_000, help="synthetic sessions (default 100,000)")
    p.add_argument("--doctors", type=int, default=60)
    p.add_argument("--departments", type=int, default=8)
    p.add_argument("--patients", type=int, default=30_000)
    p.add_argument("--repeat", type=int, default=40, help="samples per measurement (default 40)")
    p.add_argument("--deep-pages", type=int, default=60, help="pages to follow by cursor (default 60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    args = p.parse_args(argv)

    data_dir = Path(tempfile.mkdtemp(prefix="consult-bench-admin-"))
    env = {
        **os.environ,
        "CONSULT_ARGON2_TIME_COST": "1",
        "CONSULT_ARGON2_MEMORY_KIB": "1024",
        "CONSULT_DEFAULT_LOCALE": "en",
        "PYTHONPATH": str(ROOT),
    }
    consult = [sys.executable, "-m", "consult", "--data-dir", str(data_dir)]
    proc: subprocess.Popen | None = None
    try:
        subprocess.run([*consult, "init"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(
            [
                *consult,
                "user",
                "add",
                "--role",
                "admin",
                "--username",
                ADMIN,
                "--name",
                "Bench Admin",
                "--password",
                ADMIN_PASSWORD,
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        t0 = time.perf_counter()
        built = build(
            data_dir / "consult.db", args.sessions, args.doctors, args.departments, args.patients, args.seed
        )
        build_s = time.perf_counter() - t0
        print(f"built {args.sessions} sessions in {build_s:.1f} s", flush=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [*consult, "serve", "--no-tls", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "CONSULT_PUBLIC_URL": base},  # production mode: serve requires it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        asyncio.run(wait_ready(base, proc))
        result = asyncio.run(measure(base, built, args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"data kept in {data_dir}")
    for name, values in result["timings"].items():
        print(
            f"{name:9} n={len(values):3} p50={statistics.median(values):6.1f} ms"
            f" p99={pct(values, 99):6.1f} ms max={max(values):6.1f} ms"
        )
    print(f"overview (30 days) {result['overview_ms']:.1f} ms")
    print(f"csv: {result['csv_rows']} rows in {result['csv_s']:.2f} s")
    out = {
        "list_p50_ms": round(statistics.median(result["all"]), 1),
        "list_p99_ms": round(pct(result["all"], 99), 1),
        "csv_rows_per_s": round(result["csv_rows"] / result["csv_s"]),
        "sessions": args.sessions,
        "csv_rows": result["csv_rows"],
        "overview_ms": round(result["overview_ms"], 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
