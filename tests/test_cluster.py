"""Two Consult nodes on one PostgreSQL behind deploy/haproxy.cfg: what one node writes the other
serves, a booking rush spread over both never books a slot twice, and every booking a patient was
told about is in the database.

The nodes are real servers (`consult init`/`demo`/`serve`), the second given the first's secrets
with `consult secrets export`/`import`; PostgreSQL is the session's throwaway server
(tests/harness/postgres.py); HAProxy runs the shipped config. All on loopback.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from consult.accounts import users as accounts
from consult.core.pg import PgDatabase
from tests.harness.fixtures import FailureArtifacts
from tests.harness.haproxy import INSECURE, HAProxy, fetch
from tests.harness.postgres import PostgresServer
from tests.harness.server import ConsultServer

PASSWORD = "correct horse battery"
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')
# Fast password hashing for the many sign-ins; the nodes are told the same parameters.
ARGON2 = {"CONSULT_ARGON2_TIME_COST": "1", "CONSULT_ARGON2_MEMORY_KIB": "1024"}


@dataclass
class Cluster:
    proxy: HAProxy
    nodes: list[ConsultServer]
    url: str  # the PostgreSQL database both nodes use

    def db(self) -> PgDatabase:
        return PgDatabase(self.url)

    def served(self, needle: str) -> list[int]:
        """How many access-log lines containing `needle` each node wrote."""
        counts = []
        for node in self.nodes:
            text = "".join(
                p.read_text(errors="replace") for p in (node.stdout_path, node.stderr_path) if p.exists()
            )
            counts.append(text.count(needle))
        return counts


@pytest.fixture
async def cluster(
    tmp_path: Path, postgres_server: PostgresServer, haproxy, failure_artifacts: FailureArtifacts
) -> AsyncIterator[Cluster]:
    url = postgres_server.socket_url(postgres_server.create_database())
    env = {
        "CONSULT_DATABASE_URL": url,
        "CONSULT_SHARED_DIR": str(tmp_path / "shared"),
        "CONSULT_TRUSTED_PROXIES": "127.0.0.1",
        **ARGON2,
    }
    nodes = [
        ConsultServer(
            tmp_path / f"node-{name}", log_dir=tmp_path, host="127.0.0.1", env=env, name=f"node-{name}"
        )
        for name in ("a", "b")
    ]
    try:
        first, second = nodes
        await asyncio.to_thread(first.init, demo=True)  # the schema and the demo clinic, in PostgreSQL
        bundle = tmp_path / "cluster-secrets.json"
        await asyncio.to_thread(first.cli, "secrets", "export", str(bundle))
        await asyncio.to_thread(second.cli, "secrets", "import", str(bundle))
        await asyncio.to_thread(second.init)
        for node in nodes:
            await node.astart()
        proxy = await haproxy([(n.host, n.port) for n in nodes], host="127.0.0.1")
        deadline = time.monotonic() + 30
        while fetch(proxy.url("/healthz"))[0] != 200:
            assert time.monotonic() < deadline, proxy.logs()
            await asyncio.sleep(0.1)
        yield Cluster(proxy, nodes, url)
    finally:
        for node in nodes:
            node.stop()
        if failure_artifacts.failed:
            for node in nodes:
                failure_artifacts.copy(node.stdout_path)
                failure_artifacts.copy(node.stderr_path)
            failure_artifacts.copy(postgres_server.log_path)


def make_clinic(cluster: Cluster, patients: int, slots: int) -> dict:
    """A department and a doctor with exactly `slots` slots the day after tomorrow, and patients."""
    tz = ZoneInfo("Asia/Shanghai")
    day = datetime.now(tz).date() + timedelta(days=2)
    end = (datetime(2000, 1, 1, 8, 0) + timedelta(minutes=15 * slots)).strftime("%H:%M")
    from argon2 import PasswordHasher

    hashed = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)

    def write(d) -> dict:
        dep = d.execute(
            "INSERT INTO departments (code, name_zh, name_en) VALUES ('rush', '热门科', 'Popular')"
            " RETURNING id"
        ).fetchone()[0]
        doc = accounts.create_user_sync(
            d, role="doctor", display_name="热门医生", password_hash="!", username="rushdoc"
        )
        d.execute("INSERT INTO doctors (user_id, fee_minor, visit_minutes) VALUES (?, 5000, 15)", [doc])
        d.execute("INSERT INTO doctor_departments (doctor_id, department_id) VALUES (?, ?)", [doc, dep])
        d.execute(
            "INSERT INTO schedule_templates (doctor_id, weekday, start_local, end_local)"
            " VALUES (?, ?, '08:00', ?)",
            [doc, day.weekday(), end],
        )
        phones = []
        for i in range(patients):
            phone = f"1370000{i:04d}"
            accounts.create_user_sync(
                d, role="patient", display_name=f"患者{i}", password_hash=hashed, phone=phone
            )
            phones.append(phone)
        return {"department": dep, "doctor": doc, "phones": phones}

    db = cluster.db()
    try:
        built = db.write_sync(write)
    finally:
        db.close()
    start = datetime(day.year, day.month, day.day, 8, 0, tzinfo=tz)
    built["slots"] = [int((start + timedelta(minutes=15 * k)).timestamp()) for k in range(slots)]
    return built


async def sign_in(session: aiohttp.ClientSession, base: str, phone: str) -> str:
    async with session.get(base + "/login", ssl=INSECURE) as r:
        token = CSRF_RE.search(await r.text()).group(1)
    data = {"identifier": phone, "password": PASSWORD, "csrf_token": token}
    async with session.post(base + "/login", data=data, allow_redirects=False, ssl=INSECURE) as r:
        assert r.status == 303, (r.status, (await r.text())[:300])
    async with session.get(base + "/", ssl=INSECURE) as r:
        found = CSRF_RE.search(await r.text())
    return found.group(1) if found else token


async def test_a_booking_rush_over_two_nodes_books_each_slot_once_and_loses_no_booking(cluster: Cluster):
    patients, slot_count = 30, 8
    built = await asyncio.to_thread(make_clinic, cluster, patients, slot_count)
    base = cluster.proxy.origin
    acked: dict[str, str] = {}
    refused = 0
    errors: list[str] = []
    rng = random.Random(16)

    async def patient(phone: str) -> None:
        nonlocal refused
        # Each patient its own connection, so HAProxy spreads them (leastconn) over both nodes.
        jar = aiohttp.CookieJar(unsafe=True)  # cookies from an IP address (127.0.0.1)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), cookie_jar=jar
        ) as session:
            token = await sign_in(session, base, phone)
            # Everybody wants the first slots most: the orders collide.
            prefs = sorted(built["slots"], key=lambda s: built["slots"].index(s) + rng.expovariate(0.5))
            for starts_at in prefs:
                data = {
                    "doctor_id": str(built["doctor"]),
                    "department_id": str(built["department"]),
                    "starts_at": str(starts_at),
                    "csrf_token": token,
                }
                async with session.post(
                    base + "/book/hold", data=data, allow_redirects=False, ssl=INSECURE
                ) as r:
                    body = await r.text()
                    if r.status == 303 and "/visits/" in r.headers.get("Location", ""):
                        acked[phone] = r.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
                        return
                    if r.status == 409:
                        refused += 1
                        continue
                    errors.append(f"{r.status}: {body[:200]}")
                    return

    await asyncio.gather(*(patient(p) for p in built["phones"]))
    assert not errors, errors[:5]

    db = cluster.db()
    try:
        active = "status IN ('held', 'confirmed', 'completed')"
        double = await db.query_one(
            f"SELECT count(*) FROM visits a JOIN visits b ON a.doctor_id = b.doctor_id AND a.id < b.id"  # noqa: S608
            f" AND a.starts_at < b.ends_at AND b.starts_at < a.ends_at WHERE a.{active} AND b.{active}"
        )
        stored = {r[0] for r in await db.query(f"SELECT public_id FROM visits WHERE {active}")}  # noqa: S608
    finally:
        db.close()
    assert double[0] == 0
    assert set(acked.values()) <= stored, "a booking the patient was told about is missing"
    assert len(acked) == slot_count == len(stored), (len(acked), len(stored))
    assert refused >= patients - slot_count
    per_node = cluster.served("POST /book/hold")
    assert all(n > 0 for n in per_node), f"the rush did not reach both nodes: {per_node}"


async def test_what_one_node_writes_the_other_serves(cluster: Cluster):
    """An account made through node A signs in through node B; a session made on one node is
    honoured by the other (sessions live in the database, not in a node's memory)."""
    built = await asyncio.to_thread(make_clinic, cluster, 1, 1)
    phone = built["phones"][0]
    a, b = cluster.nodes
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await sign_in(session, a.origin, phone)
        # The same cookies, straight to the other node.
        cookies = {c.key: c.value for c in session.cookie_jar}
    async with aiohttp.ClientSession(cookies=cookies) as other:
        async with other.get(b.origin + "/patient", allow_redirects=False) as r:
            text = await r.text()
            assert r.status == 200, (r.status, r.headers.get("Location"), cookies)
            assert "患者0" in text
