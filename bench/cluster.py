"""One Consult node against two on one PostgreSQL behind HAProxy, and how long a failover takes.

    python bench/cluster.py            # a few minutes on two cores
    python bench/cluster.py --quick    # a smoke run (under a minute or two)

Sets up, all on 127.0.0.1: a throwaway PostgreSQL (initdb into /tmp, fsync off), node A
(`consult init` with CONSULT_DATABASE_URL), node B given A's secrets (`consult secrets export`
/ `import`), both `consult serve --no-tls` with CONSULT_SHARED_DIR and CONSULT_TRUSTED_PROXIES,
and HAProxy running the shipped deploy/haproxy.cfg (its bind, certificate and server lines
replaced) with TLS on its front. Every client goes through HAProxy's https/wss front. First
with HAProxy listing node A only ("1 node"), then with both nodes ("2 nodes"); the same
PostgreSQL throughout. Each run gets its own doctors, patients and rooms.

Figures (the last stdout line is one JSON object):
- ``bookings_per_s_1_node`` / ``bookings_per_s_2_nodes``: successful bookings (a 303 to the
  visit from ``POST /book/hold``) per second of the booking phase, through HAProxy. Patients are
  written straight into PostgreSQL and signed in through the real form before the clock starts;
  ``--clients`` of them book at once, each its own slots, no two wanting the same slot and no
  patient two overlapping ones (as bench/booking.py), so every booking should succeed.
  ``booking_errors_*``: every other answer. ``booking_p99_ms_*``: over all hold requests.
  ``double_bookings_*``: slots held twice (same doctor, overlapping times), counted in
  PostgreSQL after the run: must be 0. ``holds_per_node_2_nodes``: hold requests each node
  logged (HAProxy spreads them with leastconn).
- ``relay_p99_ms_1_node`` / ``relay_p99_ms_2_nodes`` (and p50, errors): signaling relay latency
  at a fixed total rate (``--rate`` msg/s) over ``--rooms`` confirmed visits (doctor + patient
  each with the token the pages use), connected over wss through HAProxy, which places each room
  on a node by hashing its path: from the sender's write of a ``signal`` frame to the receiver's
  reading of it relayed (TLS to HAProxy both ways, HAProxy, the node's checks and relay). The
  load generator is bench/sigclient.py in a process of its own; ``--warmup`` seconds of relaying
  are not measured. ``rooms_per_node_2_nodes``: where the room leases ended up.
- ``failover_s``: one room, doctor and patient as two WebSocket clients through HAProxy (no
  browsers) that reconnect the way the pages do (signaling-client.js: the same token and page
  instance, back-off from 0.5 s doubling, jittered); both in the call and relaying; the room's
  node is SIGKILLed. The steps, in seconds after the kill: ``failover_haproxy_down_s`` (HAProxy
  logs the node DOWN in its rooms backend), ``failover_first_readmitted_s`` (a client's hello
  welcomed again on the other node, the patient's welcome saying ``admitted``: the room restored
  from the database, not admitted anew), ``failover_both_readmitted_s``, and ``failover_s``
  (both relaying ``signal`` messages to each other again). The other node must first wait out
  the dead node's room lease (3 s from its last renewal, due every second: up to 3 s after the
  kill), which is most of the figure. Signaling only: media (ICE restart over the new socket) is not
  measured here; tests/test_browser_cluster.py checks it in Chromium. Also:
  ``failover_guest_admitted_after`` (the patient's new welcome said admitted),
  ``failover_room_moved`` (the lease is the survivor's now), ``failover_refusals`` (error codes
  the clients saw on the way, e.g. ``peer_absent`` for a signal sent while the other was gone),
  ``failover_killed``. Target < 5 s (not asserted).
- ``load_before`` / ``load_after``: the machine's load averages. Clients, HAProxy, PostgreSQL and
  the nodes all share the machine's cores (two here), so two nodes cannot double throughput
  here and every figure is noisy on a loaded machine; compare runs at a similar load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

# The repository first: bench/signaling.py must not shadow the signaling package consult imports.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from booking import DAY_START, SLOT_MIN, SLOTS_PER_DAY, TZ, Gate, plan
from cluster_parts import HAProxy, Postgres
from common import (
    CSRF_RE,
    PATIENT_PASSWORD,
    ROOT,
    ConsultServer,
    loadavg,
)

HOST = "127.0.0.1"
CLIENT = Path(__file__).resolve().parent / "sigclient.py"
ACTIVE = "status IN ('held', 'confirmed', 'completed')"
FINAL_CLOSE_CODES = {4000, 4001, 4002, 4003}  # as signaling-client.js: no reconnect after these


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the cluster --------------------------------------------------------------------------------


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pg = Postgres(HOST)
        self.url = ""
        self.nodes: list[ConsultServer] = []
        self.proxy: HAProxy | None = None
        self.proxy_port = 0

    def setup(self) -> None:
        from common import free_port

        self.pg.start()
        self.url = self.pg.create_database("consult")
        self.proxy_port = free_port(HOST)
        env = {
            "CONSULT_DATABASE_URL": self.url,
            "CONSULT_SHARED_DIR": str(self.workdir / "shared"),
            "CONSULT_TRUSTED_PROXIES": HOST,
            "CONSULT_PUBLIC_URL": f"https://{HOST}:{self.proxy_port}",
            "CONSULT_ARGON2_TIME_COST": "1",
            "CONSULT_ARGON2_MEMORY_KIB": "1024",
            "CONSULT_TIMEZONE": TZ,
            "CONSULT_MAX_CONNECTIONS_PER_ADDRESS": "0",  # every client is 127.0.0.1 here
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        }
        self.nodes = [
            ConsultServer(
                self.workdir / f"node-{n}", log_dir=self.workdir, host=HOST, env=env, name=f"node-{n}",
                startup_timeout=120,
            )
            for n in ("a", "b")
        ]  # fmt: skip
        first, second = self.nodes
        first.init()
        bundle = self.workdir / "cluster-secrets.json"
        first.cli("secrets", "export", str(bundle))
        second.cli("secrets", "import", str(bundle))
        second.init()

    def route(self, nodes: list[ConsultServer]) -> None:
        """HAProxy (the shipped config) in front of `nodes`, on the same port every time."""
        if self.proxy is not None:
            self.proxy.stop()
        for node in nodes:
            if not node.running:
                node.start()
        self.proxy = HAProxy(
            self.workdir / f"haproxy-{len(nodes)}", [(n.host, n.port) for n in nodes], HOST, self.proxy_port
        ).start()
        asyncio.run(self._wait_healthy())

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as s:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(self.origin + "/healthz") as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise SystemExit(f"HAProxy never answered /healthz:\n{self.proxy.log()[-2000:]}")
                await asyncio.sleep(0.1)

    @property
    def origin(self) -> str:
        assert self.proxy is not None
        return self.proxy.origin

    def connect(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def node_log(self, node: ConsultServer) -> str:
        return "".join(
            p.read_text(errors="replace") for p in (node.stdout_path, node.stderr_path) if p.exists()
        )

    def teardown(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for node in self.nodes:
            node.stop()
        self.pg.stop()


# -- bookings -----------------------------------------------------------------------------------


def make_catalogue(
    cluster: Cluster, tag: str, doctors: int, patients: int
) -> tuple[int, list[int], list[str]]:
    """A department of `doctors` doctors working 08:00-20:00 every day, and `patients` patients
    (one argon2 hash with the nodes' cheap parameters), written straight into PostgreSQL."""
    from argon2 import PasswordHasher

    hashed = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PATIENT_PASSWORD)
    now = time.time()
    prefix = {"1": "1391", "2": "1392"}.get(tag, "1393")
    phones = [f"{prefix}{i:07d}" for i in range(patients)]
    with cluster.connect() as conn:
        dep = conn.execute(
            "INSERT INTO departments (code, name_zh, name_en) VALUES (%s, '压测科', 'Benchmark')"
            " RETURNING id",
            [f"bench{tag}"],
        ).fetchone()[0]
        ids = []
        for i in range(doctors):
            uid = conn.execute(
                "INSERT INTO users (role, username, display_name, password_hash, created, password_changed)"
                " VALUES ('doctor', %s, %s, 'x', %s, %s) RETURNING id",
                [f"bench{tag}.doc{i}", f"Doctor {tag}.{i}", now, now],
            ).fetchone()[0]
            ids.append(uid)
            conn.execute(
                "INSERT INTO doctors (user_id, fee_minor, visit_minutes) VALUES (%s, 5000, %s)",
                [uid, SLOT_MIN],
            )
            conn.execute(
                "INSERT INTO doctor_departments (doctor_id, department_id) VALUES (%s, %s)", [uid, dep]
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO schedule_templates (doctor_id, weekday, start_local, end_local)"
                    " VALUES (%s, %s, %s, '20:00')",
                    [(uid, wd, DAY_START) for wd in range(7)],
                )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (role, phone, display_name, password_hash, created, password_changed)"
                " VALUES ('patient', %s, %s, %s, %s, %s)",
                [(p, f"患者{p[-4:]}", hashed, now, now) for p in phones],
            )
    return dep, ids, phones


def double_bookings(cluster: Cluster) -> int:
    with cluster.connect() as conn:
        return conn.execute(
            f"SELECT count(*) FROM visits a JOIN visits b ON a.doctor_id = b.doctor_id AND a.id < b.id"  # noqa: S608
            f" AND a.starts_at < b.ends_at AND b.starts_at < a.ends_at WHERE a.{ACTIVE} AND b.{ACTIVE}"
        ).fetchone()[0]


async def sign_in(session: aiohttp.ClientSession, base: str, phone: str) -> str:
    async with session.get(base + "/login") as r:
        token = CSRF_RE.search(await r.text()).group(1)
    data = {"identifier": phone, "password": PATIENT_PASSWORD, "csrf_token": token}
    async with session.post(base + "/login", data=data, allow_redirects=False) as r:
        if r.status != 303:
            raise RuntimeError(f"sign-in of {phone} failed: {r.status} {(await r.text())[:300]}")
    async with session.get(base + "/") as r:
        found = CSRF_RE.search(await r.text())
    return found.group(1) if found else token


async def book(base: str, phone: str, dep: int, work: list[tuple[int, int]], gate: Gate, out: dict) -> None:
    connector = aiohttp.TCPConnector(limit=1, ssl=False)  # HAProxy's development certificate
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), connector=connector) as s:
        token = await sign_in(s, base, phone)
        await gate.arrive()
        for doctor_id, starts_at in work:
            data = {
                "doctor_id": str(doctor_id),
                "department_id": str(dep),
                "starts_at": str(starts_at),
                "csrf_token": token,
            }
            t0 = time.perf_counter()
            try:
                async with s.post(base + "/book/hold", data=data, allow_redirects=False) as r:
                    await r.read()
                    status: Any = r.status
            except aiohttp.ClientError as exc:
                status = repr(exc)
            out["latencies"].append(time.perf_counter() - t0)
            if status == 303:
                out["ok"] += 1
            else:
                out["errors"].append(str(status))


async def booking_run(base: str, dep: int, work: list[list[tuple[int, int]]], phones: list[str]) -> dict:
    out: dict[str, Any] = {"ok": 0, "errors": [], "latencies": []}
    gate = Gate(len(phones))
    tasks = [asyncio.create_task(book(base, p, dep, w, gate, out)) for p, w in zip(phones, work, strict=True)]
    ready = asyncio.create_task(gate.ready.wait())
    await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():  # a client failed while signing in: its error
        ready.cancel()
        await asyncio.gather(*tasks)
    t0 = time.perf_counter()
    gate.go.set()
    await asyncio.gather(*tasks)
    out["seconds"] = time.perf_counter() - t0
    return out


def bookings(cluster: Cluster, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    dep, doctor_ids, phones = make_catalogue(cluster, tag, args.doctors, args.clients)
    first_day = datetime.now(ZoneInfo(TZ)).date() + timedelta(days=1)
    work = plan(doctor_ids, first_day, args.visits, args.clients)
    assert math.ceil(args.visits / (args.doctors * SLOTS_PER_DAY)) < 25, "more days than the booking horizon"
    marks = [len(cluster.node_log(n)) for n in cluster.nodes]
    out = asyncio.run(booking_run(cluster.origin, dep, work, phones))
    time.sleep(1)  # the nodes' last access-log lines written
    holds = [
        cluster.node_log(n)[m:].count("POST /book/hold") for n, m in zip(cluster.nodes, marks, strict=True)
    ]
    lat = sorted(x * 1000 for x in out["latencies"])
    if out["errors"]:
        log(f"booking errors ({len(out['errors'])}), first: {out['errors'][:5]}")
    result = {
        "bookings_per_s": round(out["ok"] / out["seconds"], 1) if out["seconds"] else 0.0,
        "booked": out["ok"],
        "booking_errors": len(out["errors"]),
        "booking_p50_ms": round(statistics.median(lat), 1) if lat else None,
        "booking_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
        "double_bookings": double_bookings(cluster),
        "holds_per_node": holds,
    }
    log(f"bookings, {tag} node(s): {result}")
    return result


# -- signaling relay ----------------------------------------------------------------------------


def keyed_settings(cluster: Cluster):
    """The settings the nodes sign with (the cluster's secrets, as node A holds them)."""
    from consult.core.config import ensure_secrets, load_settings

    return ensure_secrets(load_settings(env={}, data_dir=cluster.nodes[0].data_dir, tls=False))


def make_rooms(cluster: Cluster, tag: str, count: int, starts_in: int = 120) -> list[dict[str, Any]]:
    """`count` confirmed visits, each with its own doctor and patient, and the tokens the pages
    would join them with (the doctor's room token, the patient's call link)."""
    from consult.calls.links import make_token
    from consult.calls.policy import make_host_token

    settings = keyed_settings(cluster)
    now = time.time()
    starts = int(now) + starts_in
    ends = starts + 900
    rooms = []
    with cluster.connect() as conn:
        dep = conn.execute(
            "INSERT INTO departments (code, name_zh, name_en) VALUES (%s, '压测科', 'Benchmark')"
            " RETURNING id",
            [f"rooms{tag}"],
        ).fetchone()[0]
        for i in range(count):
            doctor = conn.execute(
                "INSERT INTO users (role, username, display_name, password_hash, created, password_changed)"
                " VALUES ('doctor', %s, %s, '!', %s, %s) RETURNING id",
                [f"room{tag}.doc{i}", f"医生{tag}.{i}", now, now],
            ).fetchone()[0]
            patient = conn.execute(
                "INSERT INTO users (role, phone, display_name, password_hash, created, password_changed)"
                " VALUES ('patient', %s, %s, '!', %s, %s) RETURNING id",
                [f"138{tag[:1]}{i:07d}", f"患者{tag}.{i}", now, now],
            ).fetchone()[0]
            conn.execute("INSERT INTO doctors (user_id) VALUES (%s)", [doctor])
            conn.execute(
                "INSERT INTO doctor_departments (doctor_id, department_id) VALUES (%s, %s)", [doctor, dep]
            )
            public_id, nonce = f"room{tag}x{secrets.token_hex(6)}", secrets.token_urlsafe(8)
            conn.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, fee_minor, currency, created, updated, call_nonce)"
                " VALUES (%s, %s, %s, %s, %s, %s, 'confirmed', 5000, 'CNY', %s, %s, %s)",
                [public_id, patient, doctor, dep, starts, ends, now, now, nonce],
            )
            rooms.append(
                {
                    "room": public_id,
                    "host": make_host_token(settings, public_id, doctor, now),
                    "guest": make_token(settings, public_id, "patient", nonce, starts, ends),
                }
            )
    return rooms


def read_tagged(proc: subprocess.Popen, tag: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise SystemExit(f"load generator ended (status {proc.wait()}) before {tag}")


def relay(cluster: Cluster, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    rooms = make_rooms(cluster, tag, args.rooms)
    assert cluster.proxy is not None
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
    }
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        job = {
            "host": HOST,
            "port": cluster.proxy.port,
            "tls": True,
            "rooms": [[r["room"], r["host"], r["guest"]] for r in rooms],
            "rate": args.rate,
            "warmup": args.warmup,
            "duration": args.duration,
            "concurrency": 20,
        }
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        connected = read_tagged(proc, "CONNECTED")
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        while proc.stdout.readline().strip() not in ("DONE", ""):
            pass
        with cluster.connect() as conn:
            owners = conn.execute(
                "SELECT r.node, count(*) FROM rooms r JOIN visits v ON v.id = r.visit_id"
                " WHERE v.public_id LIKE %s GROUP BY r.node",
                [f"room{tag}x%"],
            ).fetchall()
        proc.stdin.write("CLOSE\n")
        proc.stdin.flush()
        result = read_tagged(proc, "RESULT")
    finally:
        if proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    lat = sorted(result["latencies_ms"])
    errors = dict(result["errors"])
    lost = result["sent"] - result["received"]
    if lost > 0:
        errors["lost"] = lost
    per_node = [
        sum(n for node, n in owners if node and node.split(":")[1] == str(c.pid)) for c in cluster.nodes
    ]
    out = {
        "participants": connected["participants"],
        "relay_p50_ms": round(lat[len(lat) // 2], 2) if lat else None,
        "relay_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
        "relay_rate_msg_s": round(result["sent_measured"] / args.duration),
        "relay_errors": sum(errors.values()),
        "relay_error_kinds": errors,
        "rooms_per_node": per_node,
    }
    log(f"relay, {tag} node(s): {out}")
    return out


# -- failover -----------------------------------------------------------------------------------


class Participant:
    """One page's signaling socket, reconnecting as web/static/signaling-client.js does."""

    def __init__(self, role: str, url: str, token: str) -> None:
        self.role = role
        self.url = url
        self.token = token
        self.instance = secrets.token_hex(8)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.welcomes: list[tuple[float, dict[str, Any]]] = []
        self.signals: list[float] = []  # when a relayed signal arrived
        self.closes: list[tuple[float, int | None]] = []
        self.errors: list[dict[str, Any]] = []
        self.admit_once = role == "host"
        self.stopped = False
        self.in_call = asyncio.Event()
        self.relayed = asyncio.Event()  # a relayed signal arrived

    async def run(self, session: aiohttp.ClientSession) -> None:
        attempt = 0
        while not self.stopped:
            try:
                ws = await session.ws_connect(self.url, ssl=False, autoping=True)
            except (aiohttp.ClientError, OSError) as exc:
                self.closes.append((time.monotonic(), None))
                self.errors.append({"connect": repr(exc)})
            else:
                await ws.send_json(
                    {"type": "hello", "version": 1, "token": self.token, "instance": self.instance}
                )
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    await self.on_message(ws, json.loads(msg.data))
                    if self.ws is ws:
                        attempt = 0
                self.ws = None
                self.closes.append((time.monotonic(), ws.close_code))
                if ws.close_code in FINAL_CLOSE_CODES:
                    return
            if self.stopped:
                return
            base = min(8.0, 0.5 * 2**attempt)  # the pages' back-off: 0.5 s doubling, jittered
            attempt += 1
            await asyncio.sleep(base / 2 + random.random() * base / 2)

    async def on_message(self, ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "welcome":
            self.welcomes.append((time.monotonic(), message))
            self.ws = ws
            await ws.send_json({"type": "join"})  # a new socket is a new seat connection: say it again
        elif kind == "peer_joined" and self.admit_once and not message.get("admitted"):
            self.admit_once = False
            await ws.send_json({"type": "admit"})
        elif kind == "clock":
            self.in_call.set()
        elif kind == "signal":
            self.signals.append(time.monotonic())
            self.relayed.set()
        elif kind == "error":
            self.errors.append(message)

    async def pinger(self) -> None:
        while not self.stopped:
            if self.ws is not None and not self.ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.send_json({"type": "signal", "data": {"from": self.role}})
            await asyncio.sleep(0.05)


async def _failover(cluster: Cluster, room: dict[str, Any], within: float) -> dict[str, Any]:
    url = cluster.origin.replace("https://", "wss://") + f"/ws/rooms/{room['room']}"
    host, guest = Participant("host", url, room["host"]), Participant("guest", url, room["guest"])
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(host.run(session))]
        await asyncio.sleep(0.5)  # the doctor first, as in a visit
        tasks.append(asyncio.create_task(guest.run(session)))
        tasks += [asyncio.create_task(p.pinger()) for p in (host, guest)]
        try:
            async with asyncio.timeout(60):
                await host.in_call.wait()
                await guest.in_call.wait()
                await host.relayed.wait()
                await guest.relayed.wait()
            owner = await asyncio.to_thread(room_node, cluster, room["room"])
            victim = next((n for n in cluster.nodes if n.pid == owner), None)
            if victim is None:
                raise SystemExit(f"the room's lease names no node of this run: {owner}")
            survivor = next(n for n in cluster.nodes if n is not victim)
            victim_index = cluster.nodes.index(victim) + 1
            haproxy_mark = len(cluster.proxy.log())
            log(f"failover: both in the call on {victim.name}; SIGKILL it")
            killed = time.monotonic()
            os.killpg(victim.pid, signal.SIGKILL)
            down = first = both = relaying = None
            while time.monotonic() - killed < within:
                now = time.monotonic()
                if (
                    down is None
                    and f"consult_rooms/node{victim_index} is DOWN" in cluster.proxy.log()[haproxy_mark:]
                ):
                    down = now
                back = [next((t for t, w in p.welcomes if t > killed), None) for p in (host, guest)]
                if first is None and any(back):
                    first = min(t for t in back if t)
                if both is None and all(back):
                    both = max(back)
                if relaying is None and both and all(any(t > both for t in p.signals) for p in (host, guest)):
                    relaying = max(next(t for t in p.signals if t > both) for p in (host, guest))
                if relaying and down:
                    break
                await asyncio.sleep(0.02)
            victim.proc.wait()
            new_owner = await asyncio.to_thread(room_node, cluster, room["room"])
            guest_welcome = next((w for t, w in guest.welcomes if t > killed), {})
        finally:
            for p in (host, guest):
                p.stopped = True
                if p.ws is not None:
                    await p.ws.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def since(t: float | None) -> float | None:
        return round(t - killed, 2) if t is not None else None

    refusals = [e.get("code") for p in (host, guest) for e in p.errors if e.get("code")]
    return {
        "failover_s": since(relaying),
        "failover_haproxy_down_s": since(down),
        "failover_first_readmitted_s": since(first),
        "failover_both_readmitted_s": since(both),
        "failover_guest_admitted_after": guest_welcome.get("admitted"),
        "failover_room_moved": new_owner == survivor.pid,
        "failover_refusals": sorted(set(refusals)),
        "failover_killed": victim.name,
    }


def room_node(cluster: Cluster, public_id: str) -> int | None:
    """The pid of the node holding the room's lease (leases name a node host:pid:random)."""
    with cluster.connect() as conn:
        row = conn.execute(
            "SELECT r.node FROM rooms r JOIN visits v ON v.id = r.visit_id WHERE v.public_id = %s",
            [public_id],
        ).fetchone()
    return int(row[0].split(":")[1]) if row and row[0] else None


def failover(cluster: Cluster) -> dict[str, Any]:
    room = make_rooms(cluster, "f", 1, starts_in=-60)[0]  # a visit that began a minute ago
    result = asyncio.run(_failover(cluster, room, within=60))
    log(f"failover: {result}")
    return result


# -- the whole run ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="consult-bench-cluster-"))
    cluster = Cluster(workdir)
    result: dict[str, Any] = {}
    try:
        log(f"setting up PostgreSQL and two nodes in {workdir}")
        cluster.setup()
        for tag, nodes, suffix in (("1", cluster.nodes[:1], "1_node"), ("2", cluster.nodes, "2_nodes")):
            cluster.route(nodes)
            log(f"HAProxy in front of {len(nodes)} node(s) on {cluster.origin}")
            for key, value in bookings(cluster, args, tag).items():
                result[f"{key}_{suffix}"] = value
            for key, value in relay(cluster, args, tag).items():
                result[f"{key}_{suffix}"] = value
        result.update(failover(cluster))
    except BaseException:
        for node in cluster.nodes:
            log(node.logs())
        if cluster.proxy is not None:
            log(cluster.proxy.log()[-3000:])
        raise
    finally:
        cluster.teardown()
        if args.keep:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result.update(
        visits=args.visits, clients=args.clients, rooms=args.rooms, rate=args.rate, cores=os.cpu_count(),
        load_before=load_before, load_after=loadavg(),
    )  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--visits", type=int, default=3000, help="visits booked per run (default 3000)")
    parser.add_argument("--clients", type=int, default=40, help="patients booking at once (default 40)")
    parser.add_argument("--doctors", type=int, default=40, help="doctors per run's catalogue (default 40)")
    parser.add_argument(
        "--rooms", type=int, default=100, help="rooms (2 sockets each) for the relay (default 100)"
    )
    parser.add_argument("--rate", type=float, default=200, help="total signal messages/s (default 200)")
    parser.add_argument("--warmup", type=float, default=3, help="relay seconds not measured (default 3)")
    parser.add_argument("--duration", type=float, default=10, help="relay seconds measured (default 10)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few visits, rooms and seconds")
    parser.add_argument("--keep", action="store_true", help="keep the logs (and data directories)")
    args = parser.parse_args()
    if args.quick:
        args.visits, args.clients, args.doctors = 200, 10, 10
        args.rooms, args.rate, args.warmup, args.duration = 10, 50, 1, 3
    if args.clients > args.visits or args.clients < 1:
        parser.error("--clients must be between 1 and --visits")
    load = loadavg()
    log(f"load average before: {load}")
    result = run(args)
    log(f"load average after: {result['load_after']}")
    print(json.dumps(result), flush=True)
    # A failed run: a slot held twice, any error, or a failover that never completed.
    failed = [
        k
        for k, v in result.items()
        if (k.startswith(("double_bookings_", "booking_errors_", "relay_errors_")) and v)
        or (k == "failover_s" and v is None)
    ]
    if failed:
        log(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
