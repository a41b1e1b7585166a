"""Admin session list and CSV export against a real server with 1,000,000 sessions, 8 admins at once.

    python bench/admin.py                                   # 1,000,000 sessions, 8 admins
    python bench/admin.py --sessions 50000 --requests 20    # a quick run

Creates a throw-away data directory (``consult init``), writes departments, doctors, patients,
visits and their session summaries straight into SQLite (executemany, in chunks), starts
``python -m consult serve --no-tls`` on 127.0.0.1 (production mode, the default zh_CN locale) and
signs in ``--clients`` admins over HTTP, each with its own session. They browse at once, with no
warm-up: each loads ``--requests`` list pages, a random mix of the first page, "older" pages
following the cursor from wherever it is, jumps far back in time, and filters (a doctor, a
department, an outcome, an end reason, a week, a patient's name or number, a visit id) with their
further pages. Then one overview page and a full CSV export. Besides the split by kind of page
(first, older, far, filtered), the latencies are printed by what the page answers: its filter's
kind (``q=name``, ``q=phone``, ``doctor+month``...), its "older" pages included, worst p99 first.

``--reuse DIR`` measures a data directory kept by ``--keep``: ``consult serve`` first applies the
migrations the directory lacks, as an upgrade would (0021_user_search builds the patient-search
index over its 30,000 accounts in about a second) before it listens, so no figure includes it.

The benchmark does NOT run ANALYZE: the product keeps its planner statistics itself (PRAGMA
optimize, bounded, at start-up and every ``db_optimize_hours``); its start-up run on this fresh
database happens while the admins browse, as it would after an upgrade.

The last stdout line is one JSON object: ``sessions``, ``clients``, ``list_p50_ms``/``list_p99_ms``
(every list request of every admin, from request to body read), ``list_max_ms``, ``list_per_s``,
``server_cpu_ms_per_list`` (the server process's CPU, every thread, per list request while the
admins browse: the figure that a loaded machine disturbs least), ``overview_ms``,
``csv_rows_per_s``, and the load averages before and after (the client runs on the same machine).
Target: list p99 < 50 ms at 1,000,000 sessions with 8 concurrent clients.
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
from common import free_port, loadavg, pct, sign_in, wait_ready  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
TZ = "Asia/Shanghai"
OLDER_RE = re.compile(r'<a href="([^"]+)" data-testid="older">')
ROW_RE = re.compile(r'<tr data-visit="')
ADMIN, ADMIN_PASSWORD = "benchadmin", "bench-admin-password"
CHUNK = 50_000
OUTCOMES = (
    ("completed", "time_limit", 60),
    ("completed", "host_ended", 15),
    ("completed", "patient_left", 5),
    ("failed", "connection_failed", 5),
    ("no_show", "no_show", 10),
    ("cancelled", None, 5),
)


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
        weights = [w for *_x, w in OUTCOMES]
        oldest = int(now)
        for lo in range(0, sessions, CHUNK):  # in chunks: a million rows never sit in memory at once
            visits, summaries = [], []
            for i in range(lo, min(sessions, lo + CHUNK)):
                vid = i + 1
                doc_index = i % doctors
                doctor = doctor_ids[doc_index]
                department = 1 + doc_index % departments
                starts = int(now) - (i // doctors + 1) * step - doc_index * 60
                oldest = min(oldest, starts)
                patient = rng.choice(patient_ids)
                outcome, end_reason, _w = rng.choices(OUTCOMES, weights)[0]
                status = {"no_show": "no_show", "cancelled": "cancelled"}.get(outcome, "completed")
                row = (vid, f"bench{vid:010d}", patient, doctor, department, starts, starts + 900)
                visits.append((*row, status, 5000, "CNY", now, now, "nonce"))
                connected = rng.randint(300, 900) if outcome == "completed" else 0
                started = starts + rng.randint(0, 120) if outcome in ("completed", "failed") else None
                summaries.append(
                    (
                        vid,
                        department,
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
                "INSERT INTO visits (id, public_id, patient_id, doctor_id, department_id, starts_at,"
                " ends_at, status, fee_minor, currency, created, updated, call_nonce)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                visits,
            )
            conn.executemany(
                "INSERT INTO session_summaries (visit_id, department_id, doctor_id, patient_id, day,"
                " scheduled_start, room_opened, first_joined_patient, started_at, ended_at, end_reason,"
                " outcome, connected_seconds, used_turn, reconnects, ice_restarts, patient_device,"
                " doctor_device) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                summaries,
            )
    # No ANALYZE here: the product keeps its own planner statistics (PRAGMA optimize at start-up
    # and every db_optimize_hours); what it does not do, the benchmark must not do for it.
    conn.close()
    return {"doctor_ids": doctor_ids, "patient_ids": patient_ids, "oldest": oldest}


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    start = time.perf_counter()
    async with session.get(url) as r:
        body = await r.text()
        if r.status != 200:
            raise SystemExit(f"GET {url}: {r.status}")
    return (time.perf_counter() - start) * 1000, body


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def next_page(base: str, body: str) -> str | None:
    m = OLDER_RE.search(body)
    return base + m.group(1).replace("&amp;", "&") if m else None


def a_filter(rng: random.Random, built: dict, args: argparse.Namespace) -> tuple[str, str]:
    """One admin's question: a doctor, a department, an outcome, a week, a patient, a visit...
    As (its kind, for the per-filter split, and the query string)."""
    day = datetime.fromtimestamp(built["oldest"] + rng.randint(0, 360) * 86400, UTC).date()
    kind, make = rng.choice(
        [
            ("doctor", lambda: f"doctor={rng.choice(built['doctor_ids'])}"),
            ("department", lambda: f"department={rng.randint(1, args.departments)}"),
            ("outcome", lambda: f"outcome={rng.choice(('failed', 'no_show', 'completed'))}"),
            (
                "end_reason",
                lambda: f"end_reason={rng.choice(('patient_left', 'host_ended', 'connection_failed'))}",
            ),
            ("no_show+dep", lambda: f"outcome=no_show&department={rng.randint(1, args.departments)}"),
            ("week", lambda: f"from={day}&to={day + timedelta(days=7)}"),
            (
                "doctor+month",
                lambda: f"doctor={rng.choice(built['doctor_ids'])}&from={day}&to={day + timedelta(days=30)}",
            ),
            ("q=name", lambda: "q=Patient+{}".format(rng.choice(built["patient_ids"]))),
            ("q=phone", lambda: "q=139{:08d}".format(rng.choice(built["patient_ids"]))),
            ("q=visit", lambda: f"q=bench{rng.randint(1, args.sessions):010d}"),
        ]
    )
    return kind, make()


async def admin_client(
    n: int,
    session: aiohttp.ClientSession,
    base: str,
    built: dict,
    args: argparse.Namespace,
    timings: dict,
    by_filter: dict,
) -> None:
    """One admin at a desk: the first page, clicks "older" a few pages deep, jumps far back,
    filters and pages through a filter's results; a random mix, no request repeated warm."""
    rng = random.Random(args.seed * 1000 + n)
    lists = base + "/admin/sessions"
    url: str | None = None  # the page the admin is reading, for "older"
    question = "first"  # what the page being read answers: its filter's kind, for the split
    for _ in range(args.requests):
        kind = rng.choices(("first", "older", "far", "filtered"), (2, 4, 1, 4))[0]
        if kind == "older" and url is None:
            kind = "first"
        if kind == "first":
            target, question = lists, "first"
        elif kind == "older":
            target = url
        elif kind == "far":
            target = f"{lists}?cursor={built['oldest'] + rng.randint(0, 86400 * 300)}.999999999"
            question = "far"
        else:
            question, query = a_filter(rng, built, args)
            target = f"{lists}?{query}"
        ms, body = await timed_get(session, target)
        timings[kind].append(ms)
        by_filter.setdefault(question, []).append(ms)  # "older" pages count for what they page through
        url = next_page(base, body)


async def measure(base: str, built: dict, args: argparse.Namespace, server_pid: int) -> dict:
    timings: dict[str, list[float]] = {"first": [], "older": [], "far": [], "filtered": []}
    by_filter: dict[str, list[float]] = {}
    sessions = [aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) for _ in range(args.clients)]
    try:
        for session in sessions:  # one after another: sign-in is not what is measured
            await sign_in(session, base, ADMIN, ADMIN_PASSWORD)
        started, cpu_before = time.perf_counter(), process_cpu_s(server_pid)
        await asyncio.gather(
            *(admin_client(n, s, base, built, args, timings, by_filter) for n, s in enumerate(sessions))
        )
        wall = time.perf_counter() - started
        server_cpu = process_cpu_s(server_pid) - cpu_before
    finally:
        for session in sessions:
            await session.close()
    no_limit = aiohttp.ClientTimeout(total=None)  # a million-row CSV takes minutes on a loaded machine
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=no_limit) as session:
        await sign_in(session, base, ADMIN, ADMIN_PASSWORD)
        overview_ms, _body = await timed_get(session, base + "/admin/sessions/overview")
        start = time.perf_counter()
        rows = -1  # the header
        async with session.get(base + "/admin/sessions.csv") as r:
            assert r.status == 200, r.status
            async for _line in r.content:
                rows += 1
        csv_s = time.perf_counter() - start
    every = [ms for values in timings.values() for ms in values]
    return {
        "timings": timings,
        "by_filter": by_filter,
        "all": every,
        "wall_s": wall,
        "server_cpu_s": server_cpu,
        "overview_ms": overview_ms,
        "csv_rows": rows,
        "csv_s": csv_s,
    }


def create(consult: list[str], env: dict, data_dir: Path, args: argparse.Namespace) -> dict:
    """A fresh data directory with the admin and the synthetic sessions."""
    subprocess.run([*consult, "init"], check=True, env=env, stdout=subprocess.DEVNULL)
    add_admin = ["user", "add", "--role", "admin", "--username", ADMIN, "--name", "Bench Admin"]
    subprocess.run(
        [*consult, *add_admin, "--password", ADMIN_PASSWORD], check=True, env=env, stdout=subprocess.DEVNULL
    )
    t0 = time.perf_counter()
    built = build(
        data_dir / "consult.db", args.sessions, args.doctors, args.departments, args.patients, args.seed
    )
    print(f"built {args.sessions} sessions in {time.perf_counter() - t0:.1f} s", flush=True)
    return built


def existing(db_path: Path) -> dict:
    """What `build` returned, read back from a data directory kept by an earlier --keep run."""
    conn = sqlite3.connect(db_path)
    try:
        doctors = [r[0] for r in conn.execute("SELECT user_id FROM doctors")]
        patients = [r[0] for r in conn.execute("SELECT id FROM users WHERE role = 'patient'")]
        oldest, sessions = conn.execute(
            "SELECT min(scheduled_start), count(*) FROM session_summaries"
        ).fetchone()
    finally:
        conn.close()
    return {"doctor_ids": doctors, "patient_ids": patients, "oldest": oldest, "sessions": sessions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1_000_000, help="synthetic sessions (default 1,000,000)")
    p.add_argument("--doctors", type=int, default=60)
    p.add_argument("--departments", type=int, default=8)
    p.add_argument("--patients", type=int, default=30_000)
    p.add_argument("--clients", type=int, default=8, help="admins browsing at once (default 8)")
    p.add_argument("--requests", type=int, default=60, help="list pages each admin loads (default 60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    p.add_argument(
        "--reuse",
        metavar="DIR",
        help="measure a data directory kept by an earlier --keep run instead of building one (its"
        " planner statistics are then those the product left there, as on a server that has run)",
    )
    args = p.parse_args(argv)

    load_before = loadavg()
    data_dir = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="consult-bench-admin-"))
    env = {
        **os.environ,
        "CONSULT_ARGON2_TIME_COST": "1",
        "CONSULT_ARGON2_MEMORY_KIB": "1024",
        "PYTHONPATH": str(ROOT),
    }
    consult = [sys.executable, "-m", "consult", "--data-dir", str(data_dir)]
    proc: subprocess.Popen | None = None
    try:
        if args.reuse:
            built = existing(data_dir / "consult.db")
            args.sessions = built["sessions"]
        else:
            built = create(consult, env, data_dir, args)
        port = free_port("127.0.0.1")
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [*consult, "serve", "--no-tls", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "CONSULT_PUBLIC_URL": base},  # production mode: serve requires it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        asyncio.run(wait_ready(base, proc))
        result = asyncio.run(measure(base, built, args, proc.pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep and not args.reuse:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"data kept in {data_dir}")
    for name, values in result["timings"].items():
        if values:
            print(
                f"{name:9} n={len(values):4} p50={statistics.median(values):6.1f} ms"
                f" p99={pct(values, 99):6.1f} ms max={max(values):6.1f} ms"
            )
    print("by what the page answers (its filter; later pages of it included):")
    for name, values in sorted(result["by_filter"].items(), key=lambda kv: -pct(kv[1], 99)):
        print(
            f"  {name:13} n={len(values):4} p50={statistics.median(values):6.1f} ms"
            f" p99={pct(values, 99):6.1f} ms max={max(values):6.1f} ms"
        )
    print(f"overview (30 days) {result['overview_ms']:.1f} ms")
    print(f"csv: {result['csv_rows']} rows in {result['csv_s']:.2f} s")
    out = {
        "sessions": args.sessions,
        "clients": args.clients,
        "list_requests": len(result["all"]),
        "list_p50_ms": round(statistics.median(result["all"]), 1),
        "list_p99_ms": round(pct(result["all"], 99), 1),
        "list_max_ms": round(max(result["all"]), 1),
        "list_per_s": round(len(result["all"]) / result["wall_s"], 1),
        "server_cpu_ms_per_list": round(result["server_cpu_s"] * 1000 / len(result["all"]), 2),
        "overview_ms": round(result["overview_ms"], 1),
        "csv_rows": result["csv_rows"],
        "csv_rows_per_s": round(result["csv_rows"] / result["csv_s"]),
        "load_before": load_before,
        "load_after": loadavg(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
