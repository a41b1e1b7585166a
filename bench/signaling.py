"""Load benchmark for signaling, through the real Consult server by default (loopback only).

    .venv/bin/python bench/signaling.py                                   # 20,000 through Consult
    .venv/bin/python bench/signaling.py --participants 4000 --duration 10  # a quick run
    .venv/bin/python bench/signaling.py --bare                            # the package alone

Through Consult (the default): a throw-away data directory (``consult init``, a self-signed
certificate from ``consult certs``), N/2 confirmed visits (N/2 doctors, N/2 patients) written into
SQLite, and ``python -m consult serve`` with TLS on 127.0.0.1 in production mode. Every participant
connects over wss:// with the token the pages would use (the patient's call link, the doctor's
room token), so Consult's policy checks each admission against the database and its SQLite event
sink stores every room event. Each doctor admits the patient; then ``signal`` messages are relayed
between the pairs at ``--rate`` in total.

``--bare``: the ``signaling`` package alone in a subprocess, an in-memory policy, plain ws://.

Figures (the last stdout line is one JSON object):
- ``through_app``: true when Consult's policy and event sink were in the path.
- ``participants``: connected and admitted; ``connect_s``: how long connecting all took.
- ``server_cpu_connect_s``/``server_cpu_relay_s``: the server's CPU seconds while connecting,
  and while relaying (warm-up and measured time): on a loaded machine the latencies mostly
  measure the other processes, these the server's own work.
- ``rss_mib``: the server's largest resident memory during the run.
- ``relay_p50_ms``/``relay_p99_ms``: from the sender's send to the receiver's read, over
  ``--duration`` seconds after a ``--warmup`` (the warm-up does NOT hide stalls: the loop-lag
  figures below cover the whole run, connect phase included).
- ``loop_lag_max_ms``/``loop_lag_p99_ms`` (through Consult): the server's own event-loop lag
  histogram (``consult_event_loop_lag_seconds``, a 20 ms timer sampled continuously) over the
  whole run from before the first connection to the end, read from /metrics; each is the upper
  bound of the histogram bucket it falls in (1, 2, 5, 10, 20, 50, 100, 200, 500 ms...).
  ``gc_pause_max_ms``: the same for the server's garbage-collector pauses
  (``gc_pause_max_ms_by_generation``: per generation; 2 is a full collection).
- ``errors``: refused or failed connections, error frames, lost messages.
- ``load_before``/``load_after``: the machine's load averages (client and server share it).
Targets: 20,000 participants < 1 GiB RSS; relay p99 < 5 ms at 2,000 msg/s; loop lag max < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, ConsultServer, loadavg  # bench/ is on sys.path when run as a script

from signaling import SignalingConfig, SignalingServer
from signaling.testing import InMemoryPolicy, make_admission

HOST = "127.0.0.1"


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, needed))
    if target == resource.RLIM_INFINITY:
        target = needed
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used: unlike latencies, barely moved by other
    processes competing for the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----- server process ------------------------------------------------------------------------


async def serve(port: int, rooms: int) -> None:
    policy = InMemoryPolicy(keep_events=False)
    now = time.time()
    for i in range(rooms):
        policy.register(f"h{i}", make_admission(f"r{i}", "host", duration_s=86400, now=now))
        policy.register(f"g{i}", make_admission(f"r{i}", "guest", duration_s=86400, now=now))
    app = web.Application()
    SignalingServer(policy, SignalingConfig()).setup(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, backlog=4096).start()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal as signals

    loop.add_signal_handler(signals.SIGTERM, stop.set)
    loop.add_signal_handler(signals.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


# ----- load generator --------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.sent = 0
        self.received = 0
        self.measuring = False

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class Participant:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, stats: Stats) -> None:
        self.ws = ws
        self.stats = stats
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ready = False
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            if message["type"] == "signal":
                self.stats.received += 1
                if self.stats.measuring:
                    sent = message["data"]["t"]
                    self.stats.latencies_ms.append((time.perf_counter() - sent) * 1000)
            elif message["type"] == "error":
                self.stats.error(message["code"])
            elif not self.ready:
                self.inbox.put_nowait(message)
        if self.ws.close_code not in (1000, 1001, None) or self.stats.measuring:
            self.stats.error(f"closed_{self.ws.close_code}")

    async def expect(self, kind: str, timeout_s: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.inbox.get()
                if message["type"] == kind:
                    return message


async def open_participant(session: aiohttp.ClientSession, url: str, token: str, stats: Stats) -> Participant:
    ws = await session.ws_connect(url, autoping=True, max_msg_size=1 << 20, ssl=False)
    participant = Participant(ws, stats)
    participant.reader = asyncio.get_running_loop().create_task(participant.read())
    await ws.send_str(json.dumps({"type": "hello", "version": 1, "token": token}))
    await participant.expect("welcome")
    return participant


async def open_pair(
    session: aiohttp.ClientSession, base: str, room: Room, stats: Stats, gate: asyncio.Semaphore
) -> tuple[Participant, Participant]:
    async with gate:
        url = f"{base}/ws/rooms/{room.room_id}"
        host = await open_participant(session, url, room.host_token, stats)
        guest = await open_participant(session, url, room.guest_token, stats)
        await guest.ws.send_str('{"type":"join"}')  # no pre-call check: in the call once admitted
        await host.expect("peer_joined")
        await host.ws.send_str('{"type":"admit"}')
        await guest.expect("clock")
        await host.expect("clock")
        host.ready = guest.ready = True
        return host, guest


@dataclass
class Room:
    room_id: str
    host_token: str
    guest_token: str


async def drive(args: argparse.Namespace, base: str, rooms: list[Room], server_pid: int) -> dict[str, Any]:
    # The load generator's own TLS sockets share one read buffer like the server's, not 256 KiB
    # each (20,000 of those would be 5 GiB in this process).
    from consult.ops.edge import share_tls_read_buffer

    share_tls_read_buffer(asyncio.get_running_loop())
    stats = Stats()
    sent_before = 0
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    rss_samples: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(args.connect_concurrency)
        cpu0 = cpu_s(server_pid)
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(open_pair(session, base, room, stats, gate) for room in rooms),
            return_exceptions=True,
        )
        pairs = [r for r in results if isinstance(r, tuple)]
        for r in results:
            if isinstance(r, BaseException):
                stats.error(f"connect_{type(r).__name__}")
        connect_s = time.perf_counter() - t0
        connect_cpu_s = cpu_s(server_pid) - cpu0
        cpu1 = cpu_s(server_pid)
        print(
            f"connected {2 * len(pairs)} participants in {connect_s:.1f}s; "
            f"server RSS {rss_mib(server_pid):.0f} MiB",
            file=sys.stderr,
        )
        senders = [p for pair in pairs for p in pair]
        # The load generator holds ~10 objects per socket; without this its own full
        # collections (hundreds of ms at 10,000 sockets) would be measured as relay latency.
        gc.collect()
        gc.freeze()
        # Pace against the wall clock (not per tick) so the offered load is exactly --rate,
        # sent in small batches every few milliseconds.
        tick = 0.002
        start = time.perf_counter()
        measure_from = start + args.warmup
        index = 0
        next_rss = start
        while (now := time.perf_counter()) - start < args.warmup + args.duration:
            if not stats.measuring and now >= measure_from:
                stats.measuring = True
                sent_before = stats.sent
            due = int((now - start) * args.rate) - index
            for _ in range(due):
                sender = senders[index % len(senders)]
                index += 1
                payload = {"type": "signal", "data": {"t": time.perf_counter(), "n": index}}
                try:
                    await sender.ws.send_str(json.dumps(payload))
                    stats.sent += 1
                except (ConnectionError, RuntimeError):
                    stats.error("send_failed")
            if now >= next_rss:
                rss_samples.append(rss_mib(server_pid))
                next_rss = now + 1
            await asyncio.sleep(tick)
        elapsed = time.perf_counter() - measure_from
        relay_cpu_s = cpu_s(server_pid) - cpu1
        await asyncio.sleep(0.5)  # let the last relays arrive
        stats.measuring = False
        rss_samples.append(rss_mib(server_pid))
        for pair in pairs:
            for p in pair:
                await p.ws.close()
                if p.reader is not None:
                    p.reader.cancel()

    lat = sorted(stats.latencies_ms)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    lost = stats.sent - stats.received
    measured_sent = stats.sent - sent_before
    if lost > 0:
        stats.error("lost")
        stats.errors += lost - 1
    print(
        f"sent {stats.sent} ({measured_sent / elapsed:.0f}/s measured), received {stats.received}, "
        f"mean {statistics.fmean(lat) if lat else float('nan'):.2f} ms, "
        f"max {lat[-1] if lat else float('nan'):.1f} ms, errors {stats.error_kinds}",
        file=sys.stderr,
    )
    return {
        "participants": 2 * len(pairs),
        "rss_mib": round(max(rss_samples), 1),
        "relay_p50_ms": pct(0.50),
        "relay_p99_ms": pct(0.99),
        "errors": stats.errors,
        "rate_msg_s": round(measured_sent / elapsed),
        "connect_s": round(connect_s, 1),
        "server_cpu_connect_s": round(connect_cpu_s, 2),
        "server_cpu_relay_s": round(relay_cpu_s, 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def consult_rooms(db_path: Path, session_key: str, rooms: int) -> list[Room]:
    """`rooms` confirmed visits starting in two minutes, each with its own doctor and patient,
    written into Consult's database; the tokens the pages would use to join them."""
    from consult.calls.links import make_token
    from consult.calls.policy import make_host_token
    from consult.core.config import load_settings

    settings = load_settings(env={"CONSULT_SESSION_KEY": session_key})
    now = time.time()
    starts = int(now) + 120
    ends = starts + 900
    conn = sqlite3.connect(db_path)
    out: list[Room] = []
    with conn:
        dep = conn.execute(
            "INSERT INTO departments (code, name_zh, name_en) VALUES ('bench', '压测科', 'Benchmark')"
        ).lastrowid
        first = (conn.execute("SELECT coalesce(max(id), 0) FROM users").fetchone()[0]) + 1
        doctors = range(first, first + rooms)
        patients = range(first + rooms, first + 2 * rooms)
        conn.executemany(
            "INSERT INTO users (id, role, username, phone, display_name, password_hash, created,"
            " password_changed) VALUES (?, ?, ?, ?, ?, '!', ?, ?)",
            [(u, "doctor", f"doc{u}", None, f"医生{u}", now, now) for u in doctors]
            + [(u, "patient", None, f"139{u:08d}", f"患者{u}", now, now) for u in patients],
        )
        conn.executemany("INSERT INTO doctors (user_id) VALUES (?)", [(u,) for u in doctors])
        conn.executemany(
            "INSERT INTO doctor_departments (doctor_id, department_id) VALUES (?, ?)",
            [(u, dep) for u in doctors],
        )
        visits = []
        for i, (doctor, patient) in enumerate(zip(doctors, patients, strict=True)):
            public_id = f"bench{i:010d}"
            nonce = f"n{i}"
            visits.append(
                (public_id, patient, doctor, dep, starts, ends, "confirmed", 5000, "CNY", now, now, nonce)
            )
            out.append(
                Room(
                    public_id,
                    make_host_token(settings, public_id, doctor, now),
                    make_token(settings, public_id, "patient", nonce, starts, ends),
                )
            )
        conn.executemany(
            "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at, status,"
            " fee_minor, currency, created, updated, call_nonce) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            visits,
        )
    conn.close()
    return out


async def scrape(origin: str) -> dict[str, dict[str, float]]:
    """The server's stall histograms from /metrics: {metric: {le: cumulative count}}."""
    wanted = ("consult_event_loop_lag_seconds_bucket", "consult_gc_pause_seconds_bucket")
    found: dict[str, dict[str, float]] = {name: {} for name in wanted}
    async with aiohttp.ClientSession() as session, session.get(origin + "/metrics", ssl=False) as r:
        if r.status != 200:
            raise SystemExit(f"/metrics answered {r.status}")
        for line in (await r.text()).splitlines():
            for name in wanted:
                if line.startswith(name + "{"):
                    labels, value = line[len(name) + 1 :].rsplit("} ", 1)
                    le = labels.split('le="', 1)[1].split('"', 1)[0]
                    found[name][le] = found[name].get(le, 0.0) + float(value)
                    if 'generation="' in labels:  # also per collector generation
                        gen = labels.split('generation="', 1)[1].split('"', 1)[0]
                        per = found.setdefault(f"{name}/{gen}", {})
                        per[le] = per.get(le, 0.0) + float(value)
    return found


def stall_figures(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, float | None]:
    """(max, p99) in ms over the run, each the upper bound of its histogram bucket."""
    bounds = sorted((float(le), le) for le in after if le != "+Inf")
    diff = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = diff.get("+Inf", 0.0)
    if total <= 0:
        return None, None
    p99 = None
    top = None
    for bound, le in bounds:
        if p99 is None and diff[le] >= 0.99 * total:
            p99 = bound * 1000
        if diff[le] >= total:
            top = bound * 1000
            break
    return (top if top is not None else float("inf")), (p99 if p99 is not None else float("inf"))


def run_through_app(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="consult-bench-signaling-"))
    key = secrets.token_urlsafe(32)
    server = ConsultServer(
        workdir / "data",
        log_dir=workdir,
        host=HOST,
        env={
            "CONSULT_SESSION_KEY": key,
            "CONSULT_METRICS_ALLOW": "127.0.0.1/32",
            "CONSULT_MAX_CONNECTIONS_PER_ADDRESS": "0",  # every client is 127.0.0.1 here
            # A profiler's hook (sitecustomize) may ride along on an outer PYTHONPATH.
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        },
        tls=(workdir / "dev-cert.pem", workdir / "dev-key.pem"),
        startup_timeout=120,
    )
    try:
        server.init()
        server.cli("certs", "--dir", str(workdir))
        rooms = consult_rooms(server.data_dir / "consult.db", key, args.participants // 2)
        server.start()
        before = asyncio.run(scrape(server.origin))
        result = asyncio.run(drive(args, server.origin.replace("https", "wss"), rooms, server.pid))
        after = asyncio.run(scrape(server.origin))
    except BaseException:
        print(server.logs(), file=sys.stderr)
        raise
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    lag_max, lag_p99 = stall_figures(
        before["consult_event_loop_lag_seconds_bucket"], after["consult_event_loop_lag_seconds_bucket"]
    )
    gc_max, _gc_p99 = stall_figures(
        before["consult_gc_pause_seconds_bucket"], after["consult_gc_pause_seconds_bucket"]
    )
    by_generation = {
        key.rsplit("/", 1)[1]: stall_figures(before.get(key, {}), after[key])[0]
        for key in sorted(after)
        if key.startswith("consult_gc_pause_seconds_bucket/")
    }
    return {
        "through_app": True,
        **result,
        "loop_lag_max_ms": lag_max,
        "loop_lag_p99_ms": lag_p99,
        "gc_pause_max_ms": gc_max,
        "gc_pause_max_ms_by_generation": by_generation,
    }


def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    port = args.port or free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, *os.environ.get("BENCH_SERVER_WRAP", "").split(), __file__),
            *("--serve", "--port", str(port)),
            *("--rooms", str(args.participants // 2), "--participants", str(args.participants)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    rooms = [Room(f"r{i}", f"h{i}", f"g{i}") for i in range(args.participants // 2)]
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if line.strip() != "READY":
            raise SystemExit(f"server did not start: {line!r}")
        result = asyncio.run(drive(args, f"ws://{HOST}:{port}", rooms, server.pid))
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)
        if server.poll() is None:
            server.kill()
    return {"through_app": False, **result, "loop_lag_max_ms": None, "loop_lag_p99_ms": None}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--participants", type=int, default=20_000, help="2 per room (default 20000)")
    parser.add_argument("--rate", type=float, default=2000, help="total signal messages/s (default 2000)")
    parser.add_argument(
        "--duration", type=float, default=10, help="seconds of measured relaying (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=5,
        help="seconds of relaying before the relay latencies are recorded (default 5); the loop-lag"
        " figures cover it and the connect phase anyway",
    )
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--bare", action="store_true", help="the signaling package alone, not Consult")
    parser.add_argument("--serve", action="store_true", help="internal: run the bare server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rooms", type=int, default=0, help="internal: rooms to register")
    args = parser.parse_args()
    if args.participants < 2:
        parser.error("--participants must be at least 2")
    raise_fd_limit(args.participants * 2 + 1024)

    if args.serve:
        asyncio.run(serve(args.port, args.rooms))
        return
    load_before = loadavg()
    result = run_bare(args) if args.bare else run_through_app(args)
    result.update(load_before=load_before, load_after=loadavg())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
