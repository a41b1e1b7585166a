"""Nothing lost in a crash: SIGKILL a real Consult server at random moments under load, then check.

    python bench/chaos.py                       # 30 kills, 8 clients: a few minutes on 2 cores
    python bench/chaos.py --kills 5 --seed 7    # a short run; the same seed gives the same kills

What runs: a throw-away data directory (``consult init``), a synthetic clinic written into it (one
department, doctors working every day, two patients per client), and ``python -m consult serve
--no-tls`` on 127.0.0.1. Concurrent clients, each driven by its own seeded RNG, book slots
(``POST /book/hold``), start payments (``POST /visits/<id>/pay``), send the gateway's signed success
notices (``POST /api/payments/callback/simulator``, retried with the same body until answered, as
a gateway does), send late notices for holds that expired after someone else took the slot (which
must be refunded), cancel paid visits (refunds), try to take slots others hold, and upload test
reports (``POST /api/visits/<id>/reports``). A doctor and a patient open a call room now and then
(the signaling WebSocket: both join, the doctor admits, the clock runs). A client records only
what the server acknowledged (2xx, or the 303 of a form) before the kill.

The server is killed with SIGKILL (its whole process group) after a random delay, and restarted;
``--kills`` times. The delays come from ``--seed`` alone: the same seed gives the same schedule
(what the load has done by then still depends on the machine's speed). After the last kill the
load stops; report files the dead server left are aged past the files sweep's grace (it was down
"long enough"), and the server is started a final time. Once /healthz answers, the job table has
no queued or running job, the start-up sweeps have run and every room's clock has run out and
been swept (or a time limit passes), these invariants are checked from the database and the disk:

  integrity_check          PRAGMA integrity_check is "ok" (and foreign_key_check finds nothing)
  double_booking           no doctor has two active visits (held, confirmed, completed) that overlap
  acknowledged_holds       every hold answered 201 is a visit row
  acknowledged_payments    every notice answered 200 left its payment paid (or refunded)
  acknowledged_cancels     every cancellation answered 303 left its visit cancelled
  acknowledged_uploads     every upload answered 201 is a report row whose file has its sha256
  refunds_exactly_once     every payment on a visit that lost its slot (or was cancelled) is
                           refunded once: one line in the simulator's ledger
                           (<data_dir>/simulator/refunds.jsonl), one "refunded" payment event
  no_stray_refunds         no other payment was refunded; no ledger line without its payment
  confirmation_messages    every visit ever confirmed has its confirmation in the outbox, every
                           cancelled paid visit its cancellation message
  jobs_settled             no job queued, running or dead
  upload_files             no upload temp file left; every stored file has a row (orphans are
                           quarantined, counted under "checked"); every row has its file
  past_rooms_closed        every room whose clock ran out is ended whole: visit completed, one
                           "ended" event, a finished session summary
  audit_chain              the hash-chained audit trail verifies
  server_errors            no request was answered with a 5xx (a killed server answers nothing)

The last stdout line is one JSON object: {"seed", "kills", "invariant_violations" (a count),
"violations" (by invariant name, only when there are some), "acknowledged" (what the clients
were told was done), "checked" (what the checks looked at), "seconds"}. Exit status 1 when any
invariant is violated (or fewer kills happened than asked). Only loopback traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the consult and signaling packages
    sys.path.insert(0, str(ROOT))

from consult.accounts import users as accounts  # noqa: E402
from consult.accounts.passwords import Passwords  # noqa: E402
from consult.audit import chain as audit_chain  # noqa: E402
from consult.booking import catalogue, schedules  # noqa: E402
from consult.calls import links as calllinks  # noqa: E402
from consult.calls import policy as callpolicy  # noqa: E402
from consult.clinical import reports as clinical_reports  # noqa: E402
from consult.clinical import uploads  # noqa: E402
from consult.core import jobs as corejobs  # noqa: E402
from consult.core.config import ensure_secrets, load_settings  # noqa: E402
from consult.core.db import Database  # noqa: E402
from consult.core.engine import open_database  # noqa: E402
from consult.payments import simulator  # noqa: E402
from signaling.client import SignalingClient  # noqa: E402

PASSWORD = "chaos password 1"
CALLBACK = simulator.CALLBACK_PATH
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')
ACTIVE = ("held", "confirmed", "completed")
FEE_MINOR = 5000

# The server's settings for a chaos run: short holds (late payments within seconds), quick
# sweeps and retries, patients may cancel any time, a call's clock of a few seconds.
HOLD_MINUTES = 0.05
VISIT_S = 5.0
JOB_TIMEOUT_S = 3.0


def server_env(*, visit_s: float = VISIT_S) -> dict[str, str]:
    return {
        "CONSULT_ARGON2_TIME_COST": "1",
        "CONSULT_ARGON2_MEMORY_KIB": "1024",
        "CONSULT_DEFAULT_LOCALE": "en",
        "CONSULT_HOLD_MINUTES": str(HOLD_MINUTES),
        "CONSULT_CANCEL_FREE_HOURS": "0",
        "CONSULT_REAPER_INTERVAL_SECONDS": "0.5",
        "CONSULT_JOB_POLL_SECONDS": "0.2",
        "CONSULT_JOB_TIMEOUT_SECONDS": str(JOB_TIMEOUT_S),
        "CONSULT_JOB_RETRY_BASE_SECONDS": "0.5",
        "CONSULT_JOB_RETRY_MAX_SECONDS": "2",
        "CONSULT_FILES_SWEEP_INTERVAL_SECONDS": "1",
        "CONSULT_VISIT_SECONDS_OVERRIDE": str(visit_s),
    }


class Server(Protocol):
    """What the chaos run needs of a server process (tests/harness/server.py's ConsultServer,
    or this benchmark's): its data dir and origin, start (blocking until healthy), kill9, stop."""

    data_dir: Path
    startup_timeout: float

    @property
    def origin(self) -> str: ...

    def start(self) -> Any: ...

    def kill9(self) -> int: ...

    def stop(self) -> int | None: ...


def kill_schedule(seed: int, kills: int, low: float, high: float) -> list[float]:
    """Seconds of load before each kill: a function of the seed alone."""
    rng = random.Random(f"chaos-kills:{seed}")
    return [round(rng.uniform(low, high), 3) for _ in range(kills)]


# -- the clinic, written into the data dir ------------------------------------------------------


@dataclass
class Clinic:
    department_id: int
    doctor_ids: list[int]
    call_pairs: list[tuple[int, int]]  # (doctor, patient) of each call room, never sharing a time
    patients: list[tuple[int, str]]  # (id, phone), two per client
    times: list[int]  # bookable slot starts, every doctor works them all
    tz: str


def database_url_of(server: Any) -> str:
    """The PostgreSQL database a server was given (``CONSULT_DATABASE_URL`` in its environment),
    or "" when it keeps the SQLite file in its data dir."""
    env = server.env() if callable(getattr(server, "env", None)) else {}
    return env.get("CONSULT_DATABASE_URL", "")


def open_db(data_dir: Path, database_url: str = "") -> Database:
    """The server's database, whichever engine it runs on."""
    return open_database(SimpleNamespace(data_dir=data_dir, database_url=database_url))


def build_clinic(
    data_dir: Path,
    env: dict[str, str],
    *,
    clients: int,
    doctors: int,
    days: int,
    calls: int,
    database_url: str = "",
) -> Clinic:
    settings = load_settings(env={**os.environ, **env}, data_dir=data_dir, tls=False)
    pw = Passwords(1, 1024).hash(PASSWORD)
    db = open_db(data_dir, database_url)
    tz = settings.timezone

    def write(d) -> Clinic:
        dep = catalogue.save_department_sync(
            d, department_id=None, code="chaos", name_zh="压测科", name_en="Chaos medicine"
        )
        doctor_ids = []
        for i in range(doctors + calls):
            uid = accounts.create_user_sync(
                d, role="doctor", display_name=f"Doctor {i}", password_hash=pw, username=f"chaos.doc{i}"
            )
            catalogue.save_doctor_sync(
                d,
                uid,
                title_en="Physician",
                title_zh="医师",
                fee_minor=FEE_MINOR,
                currency="CNY",
                visit_minutes=15,
                department_ids=[dep],
                tz=tz,
            )
            if i < doctors:  # the others only take calls, seeded straight into the database
                for weekday in range(7):
                    schedules.add_template_sync(d, uid, weekday, "00:00", "23:45", tz=tz)
            doctor_ids.append(uid)
        patients = []
        for i in range(2 * clients + calls):
            phone = f"1770{i:07d}"
            uid = accounts.create_user_sync(
                d, role="patient", display_name=f"Patient {i}", password_hash=pw, phone=phone
            )
            patients.append((uid, phone))
        pairs = list(zip(doctor_ids[doctors:], [p[0] for p in patients[2 * clients :]], strict=True))
        return Clinic(dep, doctor_ids[:doctors], pairs, patients[: 2 * clients], [], tz)

    try:
        clinic = db.write_sync(write)
        now = time.time()
        first = now + 2 * 3600  # clear of the booking lead time, whatever the clock says
        slots = db.read_sync(
            lambda d: schedules.slots(
                d, clinic.doctor_ids[0], first, first + days * 86400, tz, now=now, free_only=True
            )
        )
    finally:
        db.close()
    clinic.times = [s.starts_at for s in slots]
    return clinic


# -- what the clients were told ------------------------------------------------------------------


@dataclass
class Acknowledged:
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # public id -> (doctor, starts_at)
    orders: dict[str, str] = field(default_factory=dict)  # order id -> public id (pay answered 303)
    payments: set[str] = field(default_factory=set)  # order ids whose success notice was answered 200
    late_payments: set[str] = field(default_factory=set)  # ... sent after the hold expired
    cancels: set[str] = field(default_factory=set)  # public ids
    uploads: dict[int, str] = field(default_factory=dict)  # report id -> sha256 the server answered
    rooms: set[str] = field(default_factory=set)  # public ids whose clock was seen to start
    refused: dict[str, int] = field(default_factory=dict)  # 4xx answers by what was asked (expected)
    unanswered: int = 0  # requests cut off by a kill (no answer: not acknowledged)
    server_errors: list[str] = field(default_factory=list)  # 5xx answers: never expected

    def summary(self) -> dict[str, int]:
        return {
            "holds": len(self.holds),
            "orders": len(self.orders),
            "payments": len(self.payments),
            "late_payments": len(self.late_payments),
            "cancellations": len(self.cancels),
            "uploads": len(self.uploads),
            "rooms": len(self.rooms),
            "refused": sum(self.refused.values()),
            "unanswered": self.unanswered,
            "server_errors": len(self.server_errors),
        }


class Unanswered(Exception):
    """The server died (or was down) before it answered."""


@dataclass
class Patient:
    id: int
    phone: str
    session: aiohttp.ClientSession
    csrf: str = ""


class Load:
    """The clients' shared state: the server's origin, whether it is up, what was acknowledged."""

    def __init__(self, server: Server, clinic: Clinic, seed: int, clients: int) -> None:
        self.server = server
        self.clinic = clinic
        self.seed = seed
        self.clients = clients
        self.acked = Acknowledged()
        self.up = asyncio.Event()
        self.stopping = False
        self.recent: deque[tuple[int, int]] = deque(maxlen=32)  # slots held lately, to contend for
        self.secret = ensure_secrets(load_settings(env={}, data_dir=server.data_dir, tls=False))
        self._next_time = [0] * clients

    @property
    def origin(self) -> str:
        return self.server.origin

    def next_time(self, client: int) -> int:
        """Client ``c`` books only times ``t`` with t % clients == c: its patients never overlap
        their own visits, while contention (another client's patient) still meets them."""
        k = self._next_time[client]
        self._next_time[client] += 1
        index = k * self.clients + client
        if index >= len(self.clinic.times):
            raise RuntimeError("the clinic ran out of slots; raise days")
        return self.clinic.times[index]

    def refused(self, what: str) -> None:
        self.acked.refused[what] = self.acked.refused.get(what, 0) + 1

    async def request(
        self, session: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            async with session.request(method, self.origin + path, allow_redirects=False, **kwargs) as r:
                body = await r.read()
                if r.status >= 500:
                    self.acked.server_errors.append(f"{method} {path}: {r.status} {body[:120]!r}")
                return r.status, dict(r.headers), body
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.acked.unanswered += 1
            raise Unanswered(repr(exc)) from None

    async def until_up(self) -> None:
        while not self.up.is_set():
            if self.stopping:
                raise asyncio.CancelledError
            await self.up.wait()


# -- one client's requests -------------------------------------------------------------------------


async def sign_in(load: Load, patient: Patient) -> None:
    while True:
        await load.until_up()
        try:
            status, _h, body = await load.request(patient.session, "GET", "/login")
            token = CSRF_RE.search(body.decode())
            if status != 200 or token is None:
                raise Unanswered(f"/login answered {status}")
            data = {"identifier": patient.phone, "password": PASSWORD, "csrf_token": token.group(1)}
            status, _h, body = await load.request(patient.session, "POST", "/login", data=data)
            if status != 303:
                raise RuntimeError(f"sign-in of {patient.phone} refused: {status} {body[:200]!r}")
            status, _h, body = await load.request(patient.session, "GET", "/account")
            token = CSRF_RE.search(body.decode())
            if status != 200 or token is None:
                raise Unanswered(f"/account answered {status}")
            patient.csrf = token.group(1)
            return
        except Unanswered:
            await asyncio.sleep(0.1)


async def hold(load: Load, p: Patient, doctor_id: int, starts_at: int) -> tuple[str, float] | None:
    data = {
        "doctor_id": str(doctor_id),
        "department_id": str(load.clinic.department_id),
        "starts_at": str(starts_at),
        "csrf_token": p.csrf,
    }
    status, _h, body = await load.request(
        p.session, "POST", "/book/hold", data=data, headers={"Accept": "application/json"}
    )
    if status == 201:
        reply = json.loads(body)
        load.acked.holds[reply["public_id"]] = (doctor_id, starts_at)
        load.recent.append((doctor_id, starts_at))
        return reply["public_id"], float(reply["hold_expires"])
    if 400 <= status < 500:
        load.refused("hold")
        return None
    raise Unanswered(f"hold answered {status}")


async def start_payment(load: Load, p: Patient, public_id: str) -> str | None:
    status, headers, _b = await load.request(
        p.session, "POST", f"/visits/{public_id}/pay", data={"csrf_token": p.csrf}
    )
    location = headers.get("Location", "")
    if status == 303 and location.startswith("/simulator/pay/"):
        order = location.rsplit("/", 1)[1]
        load.acked.orders[order] = public_id
        return order
    if 400 <= status < 500 or status == 303:
        load.refused("pay")
        return None
    raise Unanswered(f"pay answered {status}")


async def notify(load: Load, order_id: str, *, late: bool = False) -> bool:
    """The gateway tells the hospital the money arrived; like a gateway, it sends the same signed
    body again until it gets an answer (a replay the server already applied changes nothing)."""
    payload = {
        "order_id": order_id,
        "amount_minor": FEE_MINOR,
        "currency": "CNY",
        "status": "SUCCESS",
        "notify_id": "N" + secrets.token_hex(12),
        "timestamp": int(time.time()),
    }
    body = simulator.canonical(payload)
    headers = {
        "Content-Type": "application/json",
        simulator.SIGNATURE_HEADER: simulator.sign(load.secret.payment_secret, payload),
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as gateway:
        while True:
            await load.until_up()
            try:
                status, _h, reply = await load.request(gateway, "POST", CALLBACK, data=body, headers=headers)
            except Unanswered:
                await asyncio.sleep(0.05)
                continue
            if status == 200:
                load.acked.payments.add(order_id)
                if late:
                    load.acked.late_payments.add(order_id)
                return True
            if 400 <= status < 500:
                raise RuntimeError(f"the server refused a genuine notice for {order_id}: {reply[:200]!r}")
            await asyncio.sleep(0.05)


async def cancel(load: Load, p: Patient, public_id: str) -> None:
    status, headers, _b = await load.request(
        p.session,
        "POST",
        f"/visits/{public_id}/cancel",
        data={"csrf_token": p.csrf, "reason": "chaos", "confirm": "yes"},  # the confirmation page's button
    )
    if status == 303 and not headers.get("Location", "").endswith("/cancel"):
        load.acked.cancels.add(public_id)
    elif status == 303:
        raise Unanswered("cancel with confirm=yes was sent back to its confirmation page")
    elif 400 <= status < 500:
        load.refused("cancel")
    else:
        raise Unanswered(f"cancel answered {status}")


def report_pdf(rng: random.Random) -> bytes:
    from PIL import Image  # the server's own dependency

    buf = io.BytesIO()
    colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    Image.new("RGB", (40 + rng.randrange(40), 60), colour).save(buf, "PDF")
    return buf.getvalue()


async def upload(load: Load, p: Patient, public_id: str, rng: random.Random) -> None:
    form = aiohttp.FormData()
    form.add_field("file", report_pdf(rng), filename="report.pdf", content_type="application/pdf")
    status, _h, body = await load.request(
        p.session, "POST", f"/api/visits/{public_id}/reports", data=form, headers={"X-CSRF-Token": p.csrf}
    )
    if status == 201:
        report = json.loads(body)["report"]
        load.acked.uploads[int(report["id"])] = report["sha256"]
    elif 400 <= status < 500:
        load.refused("upload")
    else:
        raise Unanswered(f"upload answered {status}")


# -- the scenarios ---------------------------------------------------------------------------------


async def pay_scenario(load: Load, rng: random.Random, c: int, main: Patient, other: Patient) -> None:
    """Book, maybe upload a report, pay; sometimes cancel afterwards (a refund)."""
    doctor = rng.choice(load.clinic.doctor_ids)
    held = await hold(load, main, doctor, load.next_time(c))
    if held is None:
        return
    public_id, _expires = held
    if rng.random() < 0.5:
        await upload(load, main, public_id, rng)
    order = await start_payment(load, main, public_id)
    if order is None:
        return
    await notify(load, order)
    if rng.random() < 0.3:
        await cancel(load, main, public_id)


async def late_scenario(load: Load, rng: random.Random, c: int, main: Patient, other: Patient) -> None:
    """Book and start paying, but the money arrives after the hold expired and another patient
    took the slot: the late payment must be refunded (or confirm, if nobody took it)."""
    doctor = rng.choice(load.clinic.doctor_ids)
    starts_at = load.next_time(c)
    held = await hold(load, main, doctor, starts_at)
    if held is None:
        return
    public_id, expires = held
    order = await start_payment(load, main, public_id)
    if order is None:
        return
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.2)
    taken = await hold(load, other, doctor, starts_at)
    if taken is not None and rng.random() < 0.7:
        taker_order = await start_payment(load, other, taken[0])
        if taker_order is not None:
            await notify(load, taker_order)
    await notify(load, order, late=True)


async def contend_scenario(load: Load, rng: random.Random, c: int, main: Patient, other: Patient) -> None:
    """Try to take a slot someone held lately: refused while their hold lives."""
    if not load.recent:
        return
    doctor, starts_at = rng.choice(list(load.recent))
    if load.clinic.times.index(starts_at) % load.clients == c:
        return  # one of this client's own times: its patients must not overlap themselves
    held = await hold(load, other, doctor, starts_at)
    if held is not None and rng.random() < 0.5:
        order = await start_payment(load, other, held[0])
        if order is not None:
            await notify(load, order)


async def abandon_scenario(load: Load, rng: random.Random, c: int, main: Patient, other: Patient) -> None:
    """Book, upload a report, never pay: the hold expires."""
    held = await hold(load, main, rng.choice(load.clinic.doctor_ids), load.next_time(c))
    if held is not None:
        await upload(load, main, held[0], rng)


SCENARIOS: list[tuple[Callable[..., Any], float]] = [
    (pay_scenario, 5),
    (late_scenario, 3),
    (contend_scenario, 2),
    (abandon_scenario, 1),
]


async def client(load: Load, c: int) -> None:
    rng = random.Random(f"chaos-client:{load.seed}:{c}")
    sessions = []
    try:
        patients = []
        for pid, phone in load.clinic.patients[2 * c : 2 * c + 2]:
            jar = aiohttp.CookieJar(unsafe=True)
            s = aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=15))
            sessions.append(s)
            patients.append(Patient(pid, phone, s))
        for p in patients:
            await sign_in(load, p)
        funcs, weights = zip(*SCENARIOS, strict=True)
        while not load.stopping:
            await load.until_up()
            scenario = rng.choices(funcs, weights)[0]
            try:
                await scenario(load, rng, c, *patients)
            except Unanswered:
                await asyncio.sleep(0.05)
    finally:
        for s in sessions:
            await s.close()


# -- calls -----------------------------------------------------------------------------------------


def seed_call_visit(
    db: Database, clinic: Clinic, doctor_id: int, patient_id: int
) -> tuple[int, str, str, int, int]:
    """A confirmed visit that started a minute ago, written straight into the database (each
    room has its own doctor and patient: seeded visits must not double-book anyone either)."""
    now = time.time()
    starts = int(now - 60 - random.randrange(30))
    public_id, nonce = secrets.token_urlsafe(12), secrets.token_urlsafe(8)
    visit_id = db.write_sync(
        lambda d: d.execute(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " fee_minor, currency, created, updated, call_nonce)"
            " VALUES (?,?,?,?,?,?,'confirmed',0,'CNY',?,?,?) RETURNING id",
            [
                public_id,
                patient_id,
                doctor_id,
                clinic.department_id,
                starts,
                starts + 900,
                now,
                now,
                nonce,
            ],
        ).fetchone()[0]
    )
    return int(visit_id), public_id, nonce, starts, starts + 900


def _seed_call_visit_on(
    server: Any, clinic: Clinic, doctor_id: int, patient_id: int
) -> tuple[int, str, str, int, int]:
    db = open_db(server.data_dir, database_url_of(server))
    try:
        return seed_call_visit(db, clinic, doctor_id, patient_id)
    finally:
        db.close()


async def open_room(load: Load, session: aiohttp.ClientSession, sockets: list[SignalingClient]) -> None:
    """Patient and doctor join a room and the doctor admits: its clock runs."""
    if not load.clinic.call_pairs:
        return
    doctor_id, patient_id = load.clinic.call_pairs.pop()
    _vid, public_id, nonce, starts, ends = await asyncio.to_thread(
        _seed_call_visit_on, load.server, load.clinic, doctor_id, patient_id
    )
    keyed = load.secret
    url = load.origin.replace("http", "ws", 1) + f"/ws/rooms/{public_id}"
    guest = await SignalingClient.connect(session, url)
    sockets.append(guest)
    await guest.hello(calllinks.make_token(keyed, public_id, "patient", nonce, starts, ends))
    host = await SignalingClient.connect(session, url)
    sockets.append(host)
    await host.hello(callpolicy.make_host_token(keyed, public_id, doctor_id, time.time()))
    if not guest.welcome["admitted"]:
        await host.send({"type": "admit"})
    await guest.next_message("clock")
    load.acked.rooms.add(public_id)


# -- the checks ------------------------------------------------------------------------------------


def _rows(conn: Any, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[Any]:
    return conn.execute(sql, list(params)).fetchall()


def settled(data_dir: Path, visit_s: float, database_url: str = "") -> dict[str, int]:
    """What still moves after the final restart: jobs to run, rooms whose clock ran out."""
    db = open_db(data_dir, database_url)
    try:
        return db.read_sync(lambda conn: _settled(conn, visit_s))
    finally:
        db.close()


def _settled(conn: Any, visit_s: float) -> dict[str, int]:
    jobs = _rows(conn, "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")[0][0]
    rooms = _rows(
        conn,
        "SELECT count(*) FROM rooms WHERE ended_at IS NULL AND started_at IS NOT NULL AND started_at + ? < ?",
        [visit_s, time.time()],
    )[0][0]
    running = _rows(conn, "SELECT count(*) FROM rooms WHERE ended_at IS NULL AND started_at IS NOT NULL")
    return {"jobs": jobs, "past_rooms_open": rooms, "rooms_open": running[0][0]}


def age_upload_files(data_dir: Path) -> int:
    """The server stayed down past the files sweep's grace: age what the dead server left in the
    uploads directory (temp files, stored files) rather than wait the grace out."""
    root = uploads.uploads_root(data_dir)
    if not root.is_dir():
        return 0
    old = time.time() - clinical_reports.FILES_GRACE_S - 60
    aged = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mtime > old:
            os.utime(path, (old, old))
            aged += 1
    return aged


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(
    data_dir: Path, acked: Acknowledged, *, visit_s: float, database_url: str = ""
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Every invariant, from the database and the disk: (violations by name, what was checked)."""
    v: dict[str, list[str]] = {}
    checked: dict[str, int] = {}

    def bad(name: str, what: str) -> None:
        v.setdefault(name, []).append(what)

    db = open_db(data_dir, database_url)

    def examine(conn: Any) -> None:
        # integrity_check: SQLite's own checks of its file (PostgreSQL checks its pages and
        # foreign keys itself, on every write)
        if db.engine == "sqlite":
            result = [r[0] for r in _rows(conn, "PRAGMA integrity_check")]
            if result != ["ok"]:
                bad("integrity_check", "; ".join(result[:5]))
            for r in _rows(conn, "PRAGMA foreign_key_check")[:5]:
                bad("integrity_check", f"foreign key: {tuple(r)}")

        # double_booking: from the rows, not from what clients were told
        active = "status IN ('held', 'confirmed', 'completed')"
        for r in _rows(
            conn,
            f"SELECT a.id AS a, b.id AS b, a.doctor_id, a.starts_at FROM visits a JOIN visits b"  # noqa: S608
            f" ON a.doctor_id = b.doctor_id AND a.id < b.id AND a.starts_at < b.ends_at"
            f" AND b.starts_at < a.ends_at WHERE a.{active} AND b.{active}",
        ):
            bad(
                "double_booking", f"visits {r['a']} and {r['b']}: doctor {r['doctor_id']} at {r['starts_at']}"
            )
        checked["active_visits"] = _rows(conn, f"SELECT count(*) FROM visits WHERE {active}")[0][0]  # noqa: S608
        visits = {r["public_id"]: r for r in _rows(conn, "SELECT * FROM visits")}
        checked["visits"] = len(visits)

        # acknowledged_holds
        for public_id, (doctor, starts_at) in acked.holds.items():
            row = visits.get(public_id)
            if row is None or (row["doctor_id"], row["starts_at"]) != (doctor, starts_at):
                bad("acknowledged_holds", f"hold {public_id} (doctor {doctor} at {starts_at}) is not a visit")

        # acknowledged_payments
        payments = {r["order_id"]: r for r in _rows(conn, "SELECT * FROM payments")}
        events: dict[int, list[str]] = {}
        for r in _rows(conn, "SELECT payment_id, kind FROM payment_events WHERE payment_id IS NOT NULL"):
            events.setdefault(r["payment_id"], []).append(r["kind"])
        checked["payments"] = len(payments)
        for order in acked.orders:
            if order not in payments:
                bad("acknowledged_payments", f"order {order} (answered 303) has no payment row")
        for order in acked.payments:
            p = payments.get(order)
            if p is None or p["status"] not in ("paid", "refunded") or "paid" not in events.get(p["id"], []):
                status = None if p is None else p["status"]
                bad("acknowledged_payments", f"order {order}: notice answered 200, payment is {status}")

        # acknowledged_cancels
        for public_id in acked.cancels:
            row = visits.get(public_id)
            if row is None or row["status"] != "cancelled":
                bad(
                    "acknowledged_cancels",
                    f"visit {public_id}: cancel answered 303, visit is "
                    f"{None if row is None else row['status']}",
                )

        # refunds_exactly_once, no_stray_refunds: the gateway's ledger and our events agree
        ledger = simulator.read_ledger(data_dir / simulator.REFUND_LEDGER)
        by_order: dict[str, list[dict[str, Any]]] = {}
        for line in ledger:
            by_order.setdefault(str(line["order_id"]), []).append(line)
        checked["ledger_refunds"] = len(ledger)
        ids = [line["refund_id"] for line in ledger]
        if len(set(ids)) != len(ids):
            bad("refunds_exactly_once", "a refund number was paid out twice in the ledger")
        by_id = {r["id"]: r for r in payments.values()}
        visit_status = {r["id"]: r["status"] for r in visits.values()}
        due = 0
        for order, p in payments.items():
            kinds = events.get(p["id"], [])
            if "paid" not in kinds:
                if by_order.get(order):
                    bad("no_stray_refunds", f"order {order} was never paid, yet refunded")
                continue
            lost = visit_status.get(p["visit_id"]) in ("expired", "cancelled") or any(
                k in kinds for k in ("slot_lost", "duplicate_payment")
            )
            lines = by_order.get(order, [])
            refunded_events = kinds.count("refunded")
            if lost:
                due += 1
                if len(lines) != 1 or refunded_events != 1 or p["status"] != "refunded":
                    bad(
                        "refunds_exactly_once",
                        f"order {order} (visit {visit_status.get(p['visit_id'])}): {len(lines)} ledger"
                        f" refunds, {refunded_events} refunded events, status {p['status']}",
                    )
                elif (
                    int(lines[0]["amount_minor"]) != p["amount_minor"]
                    or p["refund_minor"] != p["amount_minor"]
                ):
                    bad(
                        "refunds_exactly_once",
                        f"order {order}: refunded {lines[0]['amount_minor']} of {p['amount_minor']}",
                    )
            elif lines or refunded_events or p["status"] != "paid":
                bad(
                    "no_stray_refunds",
                    f"order {order} keeps its visit ({visit_status.get(p['visit_id'])}), yet"
                    f" {len(lines)} ledger refunds, {refunded_events} refunded events, status {p['status']}",
                )
        for order in by_order:
            if order not in payments:
                bad("no_stray_refunds", f"ledger refund for unknown order {order}")
        checked["refunds_due"] = due
        checked["late_payments_refunded"] = sum(
            1 for o in acked.late_payments if o in payments and payments[o]["status"] == "refunded"
        )
        del by_id

        # confirmation_messages: every visit confirmed (its audit entry) was told so
        outbox: dict[str, set[str]] = {}
        for r in _rows(conn, "SELECT subject, body FROM outbox"):
            for m in re.finditer(r"/visits/([A-Za-z0-9_-]+)", r["body"]):
                outbox.setdefault(m.group(1), set()).add(r["subject"])
        confirmed_ids = {
            int(r[0]) for r in _rows(conn, "SELECT object_id FROM audit_log WHERE action = 'visit.confirm'")
        }
        by_vid = {r["id"]: r for r in visits.values()}
        checked["confirmed_visits"] = len(confirmed_ids)
        for vid in sorted(confirmed_ids):
            row = by_vid.get(vid)
            if row is None:
                bad("confirmation_messages", f"audit names visit {vid}, which does not exist")
                continue
            if "Visit confirmed" not in outbox.get(row["public_id"], set()):
                bad(
                    "confirmation_messages", f"visit {row['public_id']} ({row['status']}) has no confirmation"
                )
            if row["status"] == "cancelled" and "Visit cancelled" not in outbox.get(row["public_id"], set()):
                bad("confirmation_messages", f"visit {row['public_id']} was cancelled without a message")
        for r in _rows(
            conn,
            "SELECT v.public_id FROM visits v WHERE v.status IN ('confirmed', 'completed')"
            " AND EXISTS (SELECT 1 FROM payments p WHERE p.visit_id = v.id AND p.status = 'paid')",
        ):
            if r["public_id"] not in {by_vid[i]["public_id"] for i in confirmed_ids if i in by_vid}:
                bad(
                    "confirmation_messages",
                    f"visit {r['public_id']} is confirmed with no visit.confirm entry",
                )
        checked["messages"] = sum(len(s) for s in outbox.values())

        # jobs_settled
        for r in _rows(
            conn, "SELECT kind, key, status, attempts, last_error FROM jobs WHERE status != 'done'"
        ):
            bad(
                "jobs_settled",
                f"{r['kind']}:{r['key']} is {r['status']} after {r['attempts']} attempts ({r['last_error']})",
            )
        checked["jobs"] = _rows(conn, "SELECT count(*) FROM jobs")[0][0]

        # acknowledged_uploads, upload_files
        reports = {r["id"]: r for r in _rows(conn, "SELECT id, stored_name, sha256 FROM reports")}
        checked["reports"] = len(reports)
        for rid, sha in acked.uploads.items():
            r = reports.get(rid)
            if r is None or r["sha256"] != sha:
                bad("acknowledged_uploads", f"report {rid} (answered 201) has no row with its sha256")
        on_disk = uploads.stored_files(data_dir)
        names = {r["stored_name"]: r for r in reports.values()}
        for name in sorted(on_disk):
            if name not in names:
                bad("upload_files", f"stored file {name} has no row (not quarantined)")
        for name, r in names.items():
            stored = uploads.stored_path(data_dir, name)
            if not stored.is_file():
                bad("upload_files", f"report {r['id']}: its file {name} is missing")
            elif sha256_of(stored) != r["sha256"]:
                bad("upload_files", f"report {r['id']}: its file {name} does not have its sha256")
        tmp = uploads.tmp_dir(data_dir)
        left = sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []
        for name in left:
            bad("upload_files", f"temp file {name} left after the sweep")
        quarantine = uploads.quarantine_dir(data_dir)
        checked["report_files"] = len(on_disk)
        checked["quarantined"] = len(list(quarantine.iterdir())) if quarantine.is_dir() else 0

        # past_rooms_closed
        now = time.time()
        rooms = _rows(conn, "SELECT visit_id, started_at, ended_at FROM rooms")
        checked["rooms"] = len(rooms)
        for r in rooms:
            if r["started_at"] is None and r["ended_at"] is None:
                continue
            if r["ended_at"] is None:
                if r["started_at"] + visit_s < now - 1:
                    bad("past_rooms_closed", f"room of visit {r['visit_id']}: its clock ran out, still open")
                continue
            vrow = by_vid.get(r["visit_id"])
            ended = _rows(
                conn,
                "SELECT count(*) FROM session_events WHERE visit_id = ? AND name = 'ended'",
                [r["visit_id"]],
            )[0][0]
            summary = _rows(
                conn, "SELECT outcome, ended_at FROM session_summaries WHERE visit_id = ?", [r["visit_id"]]
            )
            if (
                vrow is None
                or vrow["status"] != "completed"
                or ended != 1
                or not summary
                or summary[0]["outcome"] == "in_progress"
                or summary[0]["ended_at"] is None
            ):
                bad(
                    "past_rooms_closed",
                    f"room of visit {r['visit_id']} ended, but not whole: visit "
                    f"{None if vrow is None else vrow['status']}, {ended} ended events, summary "
                    f"{dict(summary[0]) if summary else None}",
                )
        for public_id in acked.rooms:
            if public_id not in visits:
                bad("past_rooms_closed", f"room {public_id} has no visit")

    try:
        db.read_sync(examine)

        for error in acked.server_errors:
            bad("server_errors", error)

        # audit_chain
        ok, message = db.read_sync(audit_chain.verify)
        if not ok:
            bad("audit_chain", message)
        checked["audit_entries"] = db.read_sync(
            lambda d: d.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        )
    finally:
        db.close()
    return v, checked


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Options:
    seed: int = 1
    kills: int = 5
    clients: int = 4
    doctors: int = 3
    min_up_s: float = 1.5  # load between a restart and the next kill
    max_up_s: float = 4.0
    call_chance: float = 0.6  # a room is opened after a (re)start with this chance (always the first)
    visit_s: float = VISIT_S
    settle_timeout_s: float = JOB_TIMEOUT_S + corejobs.LEASE_MARGIN_S + 30
    days: int = 30


@dataclass
class Result:
    seed: int
    kills: int
    schedule: list[float]
    violations: dict[str, list[str]]
    acknowledged: dict[str, int]
    checked: dict[str, int]
    seconds: float
    log: list[str]

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seed": self.seed,
            "kills": self.kills,
            "invariant_violations": sum(len(x) for x in self.violations.values()),
        }
        if self.violations:
            out["violations"] = {k: x[:20] for k, x in sorted(self.violations.items())}
        out.update(acknowledged=self.acknowledged, checked=self.checked, seconds=round(self.seconds, 1))
        return out


async def run(server: Server, opts: Options, *, say: Callable[[str], None] = lambda _m: None) -> Result:
    """Drive ``server`` (already initialised and started, empty clinic) through ``opts.kills``
    SIGKILLs under load, restart it a final time, let it settle, check every invariant."""
    t0 = time.monotonic()
    log: list[str] = []

    def note(message: str) -> None:
        log.append(f"{time.monotonic() - t0:7.2f}s {message}")
        say(log[-1])

    server.startup_timeout = max(getattr(server, "startup_timeout", 20.0), 60.0)
    clinic = await asyncio.to_thread(
        build_clinic,
        server.data_dir,
        server_env(visit_s=opts.visit_s),
        clients=opts.clients,
        doctors=opts.doctors,
        calls=opts.kills,
        days=opts.days,
        database_url=database_url_of(server),
    )
    load = Load(server, clinic, opts.seed, opts.clients)
    load.up.set()
    schedule = kill_schedule(opts.seed, opts.kills, opts.min_up_s, opts.max_up_s)
    call_rng = random.Random(f"chaos-calls:{opts.seed}")
    clients = [asyncio.create_task(client(load, c), name=f"chaos-client-{c}") for c in range(opts.clients)]
    kills = 0
    sockets: list[SignalingClient] = []
    calls = aiohttp.ClientSession()
    try:
        for round_, delay in enumerate(schedule):
            if call_rng.random() < opts.call_chance or round_ == 0:  # at least one room
                try:
                    await asyncio.wait_for(open_room(load, calls, sockets), 5)
                except Exception as exc:  # a slow machine: counted, the run goes on
                    load.refused("room")
                    note(f"no room this round: {exc!r}")
            await asyncio.sleep(delay)
            for task in clients:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # a client found the server refusing what it must take
            load.up.clear()
            if kills == opts.kills - 1:
                load.stopping = True  # the last kill: the load stops with it
            code = await asyncio.to_thread(server.kill9)
            kills += 1
            note(f"kill {kills}/{opts.kills} after {delay:.2f} s (exit {code}); {load.acked.summary()}")
            for sig in sockets:
                with contextlib.suppress(Exception):
                    await sig.close()
            sockets.clear()
            if load.stopping:
                break
            await asyncio.to_thread(server.start)
            load.up.set()
    finally:
        load.stopping = True
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for sig in sockets:
            with contextlib.suppress(Exception):
                await sig.close()
        await calls.close()
    for task in clients:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()

    # The final restart, and one sweep/drain.
    aged = age_upload_files(server.data_dir)
    await asyncio.to_thread(server.start)
    started = time.monotonic()
    note(f"final restart ({aged} upload files aged past the grace)")
    state: dict[str, int] = {}
    while time.monotonic() - started < opts.settle_timeout_s:
        await asyncio.sleep(0.25)
        state = await asyncio.to_thread(settled, server.data_dir, opts.visit_s, database_url_of(server))
        # Two files sweeps (1 s) and reaper runs (0.5 s) after start-up, no job left, rooms closed.
        if time.monotonic() - started > 2.5 and not state["jobs"] and not state["rooms_open"]:
            break
    note(f"settled: {state}")
    await asyncio.to_thread(_healthy, server)
    violations, checked = await asyncio.to_thread(
        check, server.data_dir, load.acked, visit_s=opts.visit_s, database_url=database_url_of(server)
    )
    await asyncio.to_thread(server.stop)
    if kills < opts.kills:
        violations.setdefault("kills", []).append(f"{kills} kills of {opts.kills}")
    checked["settle_seconds"] = round(time.monotonic() - started)
    return Result(
        opts.seed, kills, schedule, violations, load.acked.summary(), checked, time.monotonic() - t0, log
    )


def _healthy(server: Server) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.origin + "/healthz", timeout=10) as resp:
        if resp.status != 200:
            raise RuntimeError(f"/healthz answered {resp.status} after the final restart")


# -- the command -----------------------------------------------------------------------------------


def bench_server(data_dir: Path, log_dir: Path, env: dict[str, str]) -> Server:
    from common import ConsultServer  # bench/ is on sys.path when run as a script

    class KillableServer(ConsultServer):
        def kill9(self) -> int:
            assert self.proc is not None
            self._signal(__import__("signal").SIGKILL)
            return self.proc.wait()

    # --demo: the load pays through the payment simulator, which exists only in demo mode.
    return KillableServer(
        data_dir, log_dir=log_dir, host="127.0.0.1", env=env, startup_timeout=60, serve_args=["--demo"]
    )


async def amain(args: argparse.Namespace) -> Result:
    work = Path(tempfile.mkdtemp(prefix="consult-chaos-"))
    env = server_env()
    server = bench_server(work / "data", work, env)
    try:
        await asyncio.to_thread(server.init)
        await asyncio.to_thread(server.start)
        opts = Options(
            seed=args.seed,
            kills=args.kills,
            clients=args.clients,
            doctors=args.doctors,
            min_up_s=args.min_up,
            max_up_s=args.max_up,
            days=max(30, args.kills * args.clients // 20 + 30),
        )
        say = (lambda m: print(m, file=sys.stderr)) if not args.quiet else (lambda _m: None)
        result = await run(server, opts, say=say)
    finally:
        server.stop()
    if args.keep or result.violations:
        print(f"data and server logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs under load (default 30)")
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the kill schedule and the load (default 1)"
    )
    parser.add_argument(
        "--clients", type=int, default=8, help="concurrent clients, two patients each (default 8)"
    )
    parser.add_argument("--doctors", type=int, default=4, help="doctors taking bookings (default 4)")
    parser.add_argument("--min-up", type=float, default=2.0, help="least load before a kill, s (default 2)")
    parser.add_argument("--max-up", type=float, default=6.0, help="most load before a kill, s (default 6)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args()
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    result = asyncio.run(amain(args))
    print(json.dumps(result.as_json()))
    return 1 if result.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
