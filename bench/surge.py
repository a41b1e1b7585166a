"""A slot-release surge: thousands of patients race for one popular doctor's week at 8:00.

    python bench/surge.py                          # 5,000 patients, 300 slots, arrivals within 10 s
    python bench/surge.py --patients 1000 --slots 100 --window 5   # a quick run

What it does, against a real ``python -m consult serve`` process (production mode, SQLite, plain
HTTP on 127.0.0.1 as behind a reverse proxy: every patient's requests carry its own
X-Forwarded-For address and 127.0.0.1 is a trusted proxy, so per-address limits apply per patient
as they would behind nginx):

1. ``consult init``; one department and ONE doctor whose week holds ``--slots`` free 15-minute
   slots, written straight into SQLite; ``--patients`` patient accounts (one argon2 hash shared).
2. Every patient signs in over HTTP before the release (not timed).
3. The release: patient i arrives at a random moment in the first ``--window`` seconds, skewed
   towards the start (t = window x u^2, as people refreshing at 8:00:00). It loads the doctor's
   slot page, then books: it tries its preferred slots in turn. Preferences collide: every patient
   ranks slots by one shared popularity (earlier days and mornings first) plus a little personal
   noise. The slot page shows one day (the first with a free time); before trying a time on a
   day it has not looked at, the patient taps that day in the strip (GET of the day's panel, as
   the page's script does); a refused hold answers with a short page of the tried day's fresh
   times (and, when that day is full, the first day that still has one, or "No free times in the
   next two weeks"). The patient reads each page as a person would: it skips every time shown
   taken and every day the strip shows full, and tries the next time it prefers. It stops after a
   booking, after ``--tries`` hold attempts, when it knows every slot is taken, or when a page
   says no time is left.

Figures (last stdout line, one JSON object):
- ``booked``: patients whose hold was acknowledged (303 to their visit); ``refused``: hold
  attempts answered with a clear "taken" (409 with the day's times); ``errors``: every other answer
  (5xx, connection errors, timeouts, unexpected statuses), hold or page.
- ``double_bookings``: counted FROM THE DATABASE afterwards (two active visits of the doctor that
  overlap in time), not from replies. ``acked_missing``: acknowledged holds not in the database.
- ``p50_ms``/``p99_ms``: latency of every hold POST (successes and refusals, from request sent to
  response read), over the whole surge; ``page_p99_ms``: the slot page and day panel loads.
- ``slots_left``: free slots in the database at the end; ``starved``: patients who used all their
  tries and went home without a booking although slots were still free at the end (unfair
  retries) — both should be 0 whenever patients outnumber slots.
- ``server_cpu_s``: the server's CPU time (every thread) over the surge, steadier than the
  latencies when other work shares the machine; ``requests``: the requests sent, by kind (page,
  day panel, hold); ``server_cpu_ms_per_request``: the two divided. One server process serves
  the surge on one event loop: requests x CPU each, against ``--window``, says whether it can
  keep up (p99 < 1 s needs the total well under the window).
- ``load_before``/``load_after``: the machine's 1-minute load average (the client runs on the
  same machine and competes with the server for CPU).
Targets: 0 double bookings, 0 errors, p99 < 1 s. Exit status 1 if any double booking, error or
acknowledged-but-missing booking was found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
from common import (  # bench/ is on sys.path when run as a script
    CSRF_RE,
    PATIENT_PASSWORD,
    ROOT,
    ConsultServer,
    add_patients,
    cpu_seconds,
    loadavg,
    pct,
    sign_in,
)

TZ = "Asia/Shanghai"
SLOT_MIN = 15
DAYS = 5  # a working week opens at once
SLOT_RE = re.compile(r'data-testid="slot-(\d+)"([^>]*)>')
PANEL_RE = re.compile(r'data-day-panel="([0-9-]+)"')
FULL_DAY_RE = re.compile(r'<span class="day disabled" data-testid="day-([0-9-]+)"')  # the strip's "Full"
NONE_LEFT = 'data-testid="no-slots"'  # "No free times in the next two weeks."


def build(db_path: Path, slots: int, patients: int) -> dict:
    """One department, one doctor with `slots` slots over DAYS days, `patients` patients."""
    per_day = -(-slots // DAYS)
    tz = ZoneInfo(TZ)
    first_day = datetime.now(tz).date() + timedelta(days=2)
    start = datetime.strptime("08:00", "%H:%M")
    end = (start + timedelta(minutes=SLOT_MIN * per_day)).strftime("%H:%M")
    now = time.time()
    conn = sqlite3.connect(db_path)
    with conn:
        dep = conn.execute(
            "INSERT INTO departments (code, name_zh, name_en) VALUES ('surge', '热门科', 'Popular')"
        ).lastrowid
        doc = conn.execute(
            "INSERT INTO users (role, username, display_name, password_hash, created, password_changed)"
            " VALUES ('doctor', 'surge.doc', '热门医生', '!', ?, ?)",
            [now, now],
        ).lastrowid
        conn.execute(
            "INSERT INTO doctors (user_id, fee_minor, visit_minutes) VALUES (?, 5000, ?)", [doc, SLOT_MIN]
        )
        conn.execute("INSERT INTO doctor_departments (doctor_id, department_id) VALUES (?, ?)", [doc, dep])
        # A weekly template for exactly the days of the released week, so that `slots` slots are free.
        weekdays = sorted({(first_day + timedelta(days=d)).weekday() for d in range(DAYS)})
        conn.executemany(
            "INSERT INTO schedule_templates (doctor_id, weekday, start_local, end_local) VALUES (?,?,?,?)",
            [(doc, wd, "08:00", end) for wd in weekdays],
        )
    conn.close()
    phones = add_patients(db_path, patients)
    released = []
    for d in range(DAYS):
        day_start = datetime.combine(first_day + timedelta(days=d), start.time(), tzinfo=tz)
        released += [int((day_start + timedelta(minutes=SLOT_MIN * k)).timestamp()) for k in range(per_day)]
    day_of = {t: datetime.fromtimestamp(t, tz).date().isoformat() for t in released[:slots]}
    slots_of_day: dict[str, list[int]] = {}
    for t, day in day_of.items():
        slots_of_day.setdefault(day, []).append(t)
    return {
        "department": dep,
        "doctor": doc,
        "phones": phones,
        "released": released[:slots],
        "day_of": day_of,
        "slots_of_day": slots_of_day,
    }


def preferences(released: list[int], rng: random.Random) -> list[int]:
    """Shared popularity (earlier day, earlier in the day) plus personal noise: orders collide."""
    first = released[0]
    ranked = []
    for s in released:
        day, minute = divmod((s - first) // 60, 1440)
        popularity = day * 2.0 + minute / 240.0
        ranked.append((popularity + rng.expovariate(1.0), s))
    return [s for _, s in sorted(ranked)]


class Stats:
    def __init__(self) -> None:
        self.hold_ms: list[float] = []
        self.page_ms: list[float] = []
        self.booked: dict[str, str] = {}  # phone -> visit path
        self.refused = 0
        self.errors: list[str] = []
        self.gave_up = 0  # used every try without a booking
        self.server_cpu_s = 0.0
        self.requests = {"page": 0, "day": 0, "hold": 0}  # requests sent, by kind


class Patient:
    def __init__(self, phone: str, address: str, base: str, connector: aiohttp.BaseConnector) -> None:
        self.phone = phone
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=connector,
            connector_owner=False,
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            headers={"X-Forwarded-For": address},
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.csrf = ""

    async def sign_in(self) -> None:
        await sign_in(self.session, self.base, self.phone, PATIENT_PASSWORD)

    async def _get(self, url: str, stats: Stats, what: str) -> str | None:
        stats.requests[what] += 1
        t0 = time.perf_counter()
        try:
            async with self.session.get(url) as r:
                page = await r.text()
                status = r.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            stats.errors.append(f"{what}: {exc!r}")
            return None
        stats.page_ms.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            stats.errors.append(f"{what}: {status}")
            return None
        return page

    async def surge(self, built: dict, slots_url: str, prefs: list[int], tries: int, stats: Stats) -> None:
        known_taken: set[int] = set()
        seen: set[str] = set()  # days whose times this patient has looked at
        page = await self._get(slots_url, stats, "page")
        if page is None:
            return
        self.csrf = CSRF_RE.search(page).group(1)
        if self._learn(page, known_taken, seen, built):
            return  # the page says no time is left: a clear answer
        attempts = 0
        while attempts < tries:
            choice = next((s for s in prefs if s not in known_taken), None)
            if choice is None:
                return  # told that everything is taken: a clear answer, not starvation
            day = built["day_of"][choice]
            if day not in seen:  # a day not looked at yet: tap it in the strip first
                fragment = await self._get(f"{slots_url}/days/{day}", stats, "day")
                if fragment is None:
                    return
                self._learn(fragment, known_taken, seen, built)
                seen.add(day)
                continue
            attempts += 1
            data = {
                "doctor_id": str(built["doctor"]),
                "department_id": str(built["department"]),
                "starts_at": str(choice),
                "csrf_token": self.csrf,
            }
            stats.requests["hold"] += 1
            t0 = time.perf_counter()
            try:
                async with self.session.post(self.base + "/book/hold", data=data, allow_redirects=False) as r:
                    body = await r.text()
                    status = r.status
                    location = r.headers.get("Location", "")
            except (TimeoutError, aiohttp.ClientError) as exc:
                stats.hold_ms.append((time.perf_counter() - t0) * 1000)
                stats.errors.append(f"hold: {exc!r}")
                return
            stats.hold_ms.append((time.perf_counter() - t0) * 1000)
            if status == 303 and "/visits/" in location:
                stats.booked[self.phone] = location
                return
            if status == 409:
                stats.refused += 1
                known_taken.add(choice)
                if self._learn(body, known_taken, seen, built):
                    return
                continue
            stats.errors.append(f"hold: {status} {body[:200]!r}")
            return
        stats.gave_up += 1

    @staticmethod
    def _learn(page: str, known_taken: set[int], seen: set[str], built: dict) -> bool:
        """What a person reads off a page: the times shown taken, the days the strip shows full
        (nobody taps those), whether the page says no time is left at all (True)."""
        seen.update(PANEL_RE.findall(page))
        for starts_at, rest in SLOT_RE.findall(page):
            if "disabled" in rest:
                known_taken.add(int(starts_at))
        for day in FULL_DAY_RE.findall(page):
            known_taken.update(built["slots_of_day"].get(day, ()))
        return NONE_LEFT in page

    async def close(self) -> None:
        await self.session.close()


def check_db(db_path: Path, built: dict, stats: Stats) -> dict:
    conn = sqlite3.connect(db_path)
    try:
        active = "status IN ('held', 'confirmed', 'completed')"
        double = conn.execute(
            f"SELECT count(*) FROM visits a JOIN visits b ON a.doctor_id = b.doctor_id AND a.id < b.id"  # noqa: S608
            f" AND a.starts_at < b.ends_at AND b.starts_at < a.ends_at WHERE a.{active} AND b.{active}"
        ).fetchone()[0]
        in_db = {
            row[0]
            for row in conn.execute(f"SELECT public_id FROM visits WHERE {active}")  # noqa: S608
        }
        taken = {row[0] for row in conn.execute(f"SELECT starts_at FROM visits WHERE {active}")}  # noqa: S608
    finally:
        conn.close()
    acked = {loc.rstrip("/").rsplit("/", 1)[-1] for loc in stats.booked.values()}
    return {
        "double_bookings": double,
        "acked_missing": len(acked - in_db),
        "active": len(in_db),
        "slots_left": len(set(built["released"]) - taken),
    }


async def drive(server: ConsultServer, built: dict, args: argparse.Namespace) -> tuple[Stats, float]:
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=args.connections)
    patients = [
        Patient(phone, f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", server.origin, connector)
        for i, phone in enumerate(built["phones"], start=1)
    ]
    try:
        sem = asyncio.Semaphore(64)

        async def sign_in(p: Patient) -> None:
            async with sem:
                await p.sign_in()

        t0 = time.perf_counter()
        await asyncio.gather(*(sign_in(p) for p in patients))
        print(f"{len(patients)} patients signed in in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        slots_url = f"{server.origin}/book/{built['department']}/doctors/{built['doctor']}"
        stats = Stats()

        async def arrive(p: Patient, at: float, prefs: list[int]) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - release)))
            await p.surge(built, slots_url, prefs, args.tries, stats)

        plans = [(args.window * rng.random() ** 2, preferences(built["released"], rng)) for _ in patients]
        cpu0 = cpu_seconds(server.pid)
        release = time.perf_counter()
        await asyncio.gather(*(arrive(p, at, prefs) for p, (at, prefs) in zip(patients, plans, strict=True)))
        stats.server_cpu_s = cpu_seconds(server.pid) - cpu0
        return stats, time.perf_counter() - release
    finally:
        await asyncio.gather(*(p.close() for p in patients))
        await connector.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=5000, help="patients in the surge (default 5000)")
    p.add_argument("--slots", type=int, default=300, help="slots released at once (default 300)")
    p.add_argument(
        "--window", type=float, default=10.0, help="arrivals spread over this many seconds (default 10)"
    )
    p.add_argument("--tries", type=int, default=20, help="hold attempts a patient makes at most (default 20)")
    p.add_argument(
        "--connections", type=int, default=400, help="client connections open at most (default 400)"
    )
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    args = p.parse_args(argv)

    load_before = loadavg()
    data_dir = Path(tempfile.mkdtemp(prefix="consult-bench-surge-"))
    server = ConsultServer(
        data_dir / "data",
        log_dir=data_dir,
        host="127.0.0.1",
        env={
            "CONSULT_ARGON2_TIME_COST": "1",
            "CONSULT_ARGON2_MEMORY_KIB": "1024",
            "CONSULT_TIMEZONE": TZ,
            "CONSULT_TRUSTED_PROXIES": "127.0.0.1",
            "PYTHONPATH": str(ROOT),
        },
        startup_timeout=60,
    )
    try:
        server.init()
        built = build(server.data_dir / "consult.db", args.slots, args.patients)
        server.start()
        stats, seconds = asyncio.run(drive(server, built, args))
        server.stop()
        found = check_db(server.data_dir / "consult.db", built, stats)
    finally:
        server.stop()
        if args.keep:
            print(f"data kept in {data_dir}", file=sys.stderr)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    if stats.errors:
        print("first errors:", stats.errors[:5], file=sys.stderr)
    starved = stats.gave_up if found["slots_left"] else 0
    result = {
        "patients": args.patients,
        "slots": len(built["released"]),
        "window_s": args.window,
        "booked": len(stats.booked),
        "refused": stats.refused,
        "errors": len(stats.errors),
        "double_bookings": found["double_bookings"],
        "acked_missing": found["acked_missing"],
        "slots_left": found["slots_left"],
        "starved": starved,
        "p50_ms": round(statistics.median(stats.hold_ms), 1) if stats.hold_ms else None,
        "p99_ms": round(pct(stats.hold_ms, 99), 1) if stats.hold_ms else None,
        "page_p99_ms": round(pct(stats.page_ms, 99), 1) if stats.page_ms else None,
        "surge_s": round(seconds, 2),
        "server_cpu_s": round(stats.server_cpu_s, 2),
        # What the surge asked of the server: requests by kind, and the server's CPU per request
        # (every thread) -- requests x CPU each against the window is what one process can serve.
        "requests": stats.requests,
        "server_cpu_ms_per_request": round(
            stats.server_cpu_s * 1000 / max(1, sum(stats.requests.values())), 3
        ),
        "load_before": load_before,
        "load_after": loadavg(),
    }
    print(json.dumps(result))
    bad = result["double_bookings"] or result["errors"] or result["acked_missing"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
