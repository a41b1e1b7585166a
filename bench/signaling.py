"""Load benchmark for signaling, through the real Consult server by default (loopback only).

    .venv/bin/python bench/signaling.py                                   # 20,000 through Consult
    .venv/bin/python bench/signaling.py --participants 4000 --duration 10  # a quick run
    .venv/bin/python bench/signaling.py --bare                            # the package alone
    .venv/bin/python bench/signaling.py --participants 2000 --slow-callback-ms 20  # what stalls

Through Consult (the default): a throw-away data directory (``consult init``, a self-signed
certificate from ``consult certs``), N/2 confirmed visits (N/2 doctors, N/2 patients) written into
SQLite, and ``python -m consult serve`` with TLS on 127.0.0.1 in production mode. Every participant
connects over wss:// with the token the pages would use (the patient's call link, the doctor's
room token), so Consult's policy checks each admission against the database and its SQLite event
sink stores every room event. Each doctor admits the patient; then ``signal`` messages are relayed
between the pairs at ``--rate`` in total, round robin over all participants.

``--bare``: the ``signaling`` package alone in a subprocess, an in-memory policy, plain ws://.

The load generator (bench/sigclient.py) runs in process(es) of its own, one per 15,000 sockets
(``--clients``), plain asyncio with raw WebSocket frames: it shares the two cores with the
server, so it is kept cheap (no JSON on the relay path, precomputed frame parts) and its CPU is
reported beside the server's. Each process paces its sends against the wall clock (every 2 ms);
sender and receiver of a pair are in the same process, so one clock times both ends.

Figures (the last stdout line is one JSON object):
- ``through_app``: true when Consult's policy and event sink were in the path.
- ``participants``: connected and admitted; ``connect_s``: how long connecting all took.
- ``server_cpu_connect_s``/``server_cpu_relay_s``: the server's CPU seconds while connecting,
  and while relaying (warm-up and measured time): on a loaded machine the latencies mostly
  measure the other processes, these the server's own work. ``client_cpu_connect_s``/
  ``client_cpu_relay_s``: the same for the load generator. ``server_cores_measured``/
  ``client_cores_measured``: CPU over the measured seconds as a share of one core (the machine
  has ``os.cpu_count()``); a core the load generator uses is not the server's.
- ``rss_mib``: the server's largest resident memory during the run (sampled every second).
- ``relay_p50_ms``/``relay_p99_ms``/``relay_max_ms``: from the sender's write of the frame to
  the receiver's reading of the relayed frame (TLS both ways, the server's parse, checks and
  relay in between), over ``--duration`` seconds after a ``--warmup`` (the warm-up does NOT
  hide stalls: the loop-lag figures below cover the whole run, connect phase included).
- ``loop_lag_max_ms``/``loop_lag_p99_ms`` (through Consult): the server's own event-loop lag
  histogram (``consult_event_loop_lag_seconds``, a 20 ms timer sampled continuously) over the
  whole run: from before the first connection, through relaying, until every participant has
  hung up at once and the server has closed their sockets (and a second more), read from
  /metrics; each is the upper bound of the histogram bucket it falls in (1, 2, 5, 10, 20, 30,
  40, 50, 100, 200, 500 ms, 1, 2, 5, 10, 30 s). Apart, the same split in two:
  ``loop_lag_max_ms_connect_relay`` (until the last relayed message) and
  ``loop_lag_max_ms_hangup`` (the mass disconnect after it; ``server_cpu_hangup_s``: the
  server's CPU seconds for it, ``hangup_s``: until every socket was closed, plus a second).
  ``loop_lag_max_ms_exact``: the longest lag itself, not its bucket (the server's
  ``consult_event_loop_lag_max_seconds``: since it started, so start-up is included).
  ``gc_pause_max_ms``: the same for the server's garbage-collector pauses over the whole run
  (``gc_pause_max_ms_by_generation``: per generation; 2 is a full collection).
- ``errors``: refused or failed connections, error frames, closed sockets, lost messages
  (``error_kinds``: by kind).
- ``load_before``/``load_after``: the machine's load averages (client and server share it).
Targets: 20,000 participants < 1 GiB RSS; relay p99 < 5 ms at 2,000 msg/s; loop lag max < 50 ms.
File descriptors: the server raises its soft limit to the hard one (``ulimit -Hn``); 20,000
participants need 20,000 sockets plus the database, logs and listener in the server process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
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
from collections.abc import Callable
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


# ----- load generator (bench/sigclient.py, in processes of its own) ---------------------------

CLIENT = Path(__file__).resolve().parent / "sigclient.py"
# Sockets one load-generator process holds at most (the file-descriptor limit is per process).
SOCKETS_PER_CLIENT = 15_000


@dataclass
class Room:
    room_id: str
    host_token: str
    guest_token: str


def read_tagged(proc: subprocess.Popen, tag: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise SystemExit(f"load generator {proc.pid} ended (status {proc.wait()}) before {tag}")


def drive(
    args: argparse.Namespace,
    host: str,
    port: int,
    tls: bool,
    rooms: list[Room],
    server_pid: int,
    on_done: Callable[[], None] | None = None,
    phases: dict[str, float] | None = None,
) -> dict[str, Any]:
    clients = args.clients or max(1, -(-len(rooms) * 2 // SOCKETS_PER_CLIENT))
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    procs = [
        subprocess.Popen(
            [sys.executable, str(CLIENT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(clients)
    ]
    try:
        cpu0 = cpu_s(server_pid)
        t0 = time.perf_counter()
        for i, proc in enumerate(procs):
            job = {
                "host": host,
                "port": port,
                "tls": tls,
                "rooms": [[r.room_id, r.host_token, r.guest_token] for r in rooms[i::clients]],
                "rate": args.rate / clients,
                "warmup": args.warmup,
                "duration": args.duration,
                "concurrency": max(1, args.connect_concurrency // clients),
            }
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        connected = [read_tagged(p, "CONNECTED") for p in procs]
        connect_s = time.perf_counter() - t0
        connect_cpu_s = cpu_s(server_pid) - cpu0
        client_connect_cpu_s = sum(cpu_s(p.pid) for p in procs)
        participants = sum(c["participants"] for c in connected)
        print(
            f"connected {participants} participants in {connect_s:.1f}s; "
            f"server RSS {rss_mib(server_pid):.0f} MiB; {clients} load-generator process(es)",
            file=sys.stderr,
        )
        cpu1 = cpu_s(server_pid)
        client_cpu1 = sum(cpu_s(p.pid) for p in procs)
        if phases is not None:
            phases["relay"] = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        rss_samples = [rss_mib(server_pid)]
        relay_t0 = time.perf_counter()
        measure_cpu: tuple[float, float, float] | None = None
        while (elapsed := time.perf_counter() - relay_t0) < args.warmup + args.duration:
            if measure_cpu is None and elapsed >= args.warmup:
                measure_cpu = (time.perf_counter(), cpu_s(server_pid), sum(cpu_s(p.pid) for p in procs))
            rss_samples.append(rss_mib(server_pid))
            time.sleep(min(1.0, max(0.05, args.warmup + args.duration - elapsed)))
        relay_cpu_s = cpu_s(server_pid) - cpu1
        client_relay_cpu_s = sum(cpu_s(p.pid) for p in procs) - client_cpu1
        if measure_cpu is None:
            measure_cpu = (relay_t0, cpu1, client_cpu1)
        measure_wall = time.perf_counter() - measure_cpu[0]
        server_share = (cpu_s(server_pid) - measure_cpu[1]) / measure_wall
        client_share = (sum(cpu_s(p.pid) for p in procs) - measure_cpu[2]) / measure_wall
        for proc in procs:
            assert proc.stdout is not None
            while proc.stdout.readline().strip() not in ("DONE", ""):
                pass
        if on_done is not None:
            on_done()  # the server's stall histograms before everyone hangs up at once
        if phases is not None:
            phases["hang-up"] = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("CLOSE\n")
            proc.stdin.flush()
        results = [read_tagged(p, "RESULT") for p in procs]
        rss_samples.append(rss_mib(server_pid))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    lat = sorted(x for r in results for x in r["latencies_ms"])

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    error_kinds: dict[str, int] = {}
    for r in results:
        for kind, n in r["errors"].items():
            error_kinds[kind] = error_kinds.get(kind, 0) + n
    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    measured_sent = sum(r["sent_measured"] for r in results)
    lost = sent - received
    if lost > 0:
        error_kinds["lost"] = lost
    errors = sum(error_kinds.values())  # failed connections are among them (connect_*)
    print(
        f"sent {sent} ({measured_sent / args.duration:.0f}/s measured), received {received}, "
        f"mean {statistics.fmean(lat) if lat else float('nan'):.2f} ms, "
        f"max {lat[-1] if lat else float('nan'):.1f} ms, errors {error_kinds}",
        file=sys.stderr,
    )
    return {
        "participants": participants,
        "rss_mib": round(max(rss_samples), 1),
        "relay_p50_ms": pct(0.50),
        "relay_p99_ms": pct(0.99),
        "relay_max_ms": lat[-1] if lat else None,
        "errors": errors,
        "error_kinds": error_kinds,
        "rate_msg_s": round(measured_sent / args.duration),
        "connect_s": round(connect_s, 1),
        "server_cpu_connect_s": round(connect_cpu_s, 2),
        "server_cpu_relay_s": round(relay_cpu_s, 2),
        "client_processes": clients,
        "client_cpu_connect_s": round(client_connect_cpu_s, 2),
        "client_cpu_relay_s": round(client_relay_cpu_s, 2),
        "server_cores_measured": round(server_share, 3),
        "client_cores_measured": round(client_share, 3),
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
            if line.startswith("consult_event_loop_lag_max_seconds "):
                found["lag_max"] = {"value": float(line.split()[1])}
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


async def open_sockets(origin: str) -> float:
    """The server's open signaling WebSockets (``consult_websocket_connections``)."""
    async with aiohttp.ClientSession() as session, session.get(origin + "/metrics", ssl=False) as r:
        for line in (await r.text()).splitlines():
            if line.startswith("consult_websocket_connections "):
                return float(line.split()[1])
    return 0.0


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


STAMP = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)[,.](\d{3})(Z?)")


def phase_of(line: str, phases: dict[str, float]) -> str:
    """Which phase of the run (connect, relay, hang-up) a server log line was written in."""
    found = STAMP.search(line)
    if found is None:
        return "?"
    day, clock, ms, utc = found.groups()
    at = datetime.datetime.fromisoformat(f"{day}T{clock}.{ms}")
    stamp = at.replace(tzinfo=datetime.UTC).timestamp() if utc else at.timestamp()
    phase = "start"
    for name, start in sorted(phases.items(), key=lambda kv: kv[1]):
        if stamp >= start:
            phase = name
    return phase


def slow_callbacks(log_path: Path, phases: dict[str, float]) -> None:
    """What the server's slow-callback probe logged, grouped by phase and kind (stderr): slow
    callbacks, then slow loop iterations (many short callbacks together) by what took most."""
    seen: dict[str, list[tuple[float, float]]] = {}
    iterations: dict[str, list[tuple[float, float, str]]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        kind = next((k for k in ("slow callback ", "slow iteration ") if k in line), None)
        if kind is None:
            continue
        phase = phase_of(line, phases)
        text = line.split(kind, 1)[1]
        took = float(text.split(" ms", 1)[0])
        cpu = float(text.split("(CPU ", 1)[1].split(" ms", 1)[0]) if "(CPU " in text else float("nan")
        if kind == "slow callback ":
            what = text.split(": ", 1)[1] if ": " in text else text
            what = what.split(" (", 1)[0] if what.startswith("garbage") else what
            seen.setdefault(f"[{phase}] {what}", []).append((took, cpu))
        else:
            detail = text.split("): ", 1)[1]
            parts = detail.split("; ")
            detail = text  # in full: where the wall time went besides the loop's CPU, too
            top = parts[1].split(" ms ", 1)[1] if len(parts) > 1 and " ms " in parts[1] else "?"
            iterations.setdefault(f"[{phase}] {top}", []).append((took, cpu, detail))
    print(f"slow callbacks ({sum(map(len, seen.values()))}), longest wall (its CPU) ms:", file=sys.stderr)
    for what, took in sorted(seen.items(), key=lambda kv: -max(kv[1])[0])[:25]:
        wall, cpu = max(took)
        most_cpu = max((c for _w, c in took if c == c), default=float("nan"))
        line = f"  {len(took):5d}x max {wall:7.1f} ({cpu:6.1f}), max CPU {most_cpu:6.1f}  {what}"
        print(line, file=sys.stderr)
    count = sum(map(len, iterations.values()))
    print(f"slow iterations ({count}) by what took most of each, the longest in full:", file=sys.stderr)
    for top, seen_it in sorted(iterations.items(), key=lambda kv: -max(kv[1])[0])[:15]:
        wall, cpu, detail = max(seen_it)
        print(f"  {len(seen_it):5d}x max {wall:7.1f} ({cpu:6.1f})  {top}", file=sys.stderr)
        print(f"          {detail}", file=sys.stderr)


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
            **({"CONSULT_SLOW_CALLBACK_MS": str(args.slow_callback_ms)} if args.slow_callback_ms else {}),
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
        scraped: list[dict[str, dict[str, float]]] = []
        phases: dict[str, float] = {"connect": time.time()}
        hangup_cpu: list[float] = []
        result = drive(
            args,
            HOST,
            server.port,
            True,
            rooms,
            server.pid,
            lambda: (
                scraped.append(asyncio.run(scrape(server.origin))),
                hangup_cpu.append(cpu_s(server.pid)),
            ),
            phases,
        )
        after = scraped[0]
        # The hang-up burst handled: every socket closed on the server's side, then a second
        # for what follows (the room events stored, the collector).
        deadline = time.monotonic() + 120
        while asyncio.run(open_sockets(server.origin)) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        hung_up = asyncio.run(scrape(server.origin))
        hangup_cpu.append(cpu_s(server.pid))
        hangup_s = time.time() - phases["hang-up"]
        if args.slow_callback_ms:
            slow_callbacks(server.stderr_path, phases)
    except BaseException:
        print(server.logs(), file=sys.stderr)
        raise
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    lag_max, lag_p99 = stall_figures(
        before["consult_event_loop_lag_seconds_bucket"], hung_up["consult_event_loop_lag_seconds_bucket"]
    )
    connect_relay_lag_max, _ = stall_figures(
        before["consult_event_loop_lag_seconds_bucket"], after["consult_event_loop_lag_seconds_bucket"]
    )
    hangup_lag_max, _ = stall_figures(
        after["consult_event_loop_lag_seconds_bucket"], hung_up["consult_event_loop_lag_seconds_bucket"]
    )
    gc_max, _gc_p99 = stall_figures(
        before["consult_gc_pause_seconds_bucket"], hung_up["consult_gc_pause_seconds_bucket"]
    )
    by_generation = {
        key.rsplit("/", 1)[1]: stall_figures(before.get(key, {}), hung_up[key])[0]
        for key in sorted(hung_up)
        if key.startswith("consult_gc_pause_seconds_bucket/")
    }
    return {
        "through_app": True,
        **result,
        "loop_lag_max_ms": lag_max,
        "loop_lag_p99_ms": lag_p99,
        "gc_pause_max_ms": gc_max,
        "loop_lag_max_ms_connect_relay": connect_relay_lag_max,
        "loop_lag_max_ms_hangup": hangup_lag_max,
        # Not a bucket: the longest lag the sampler saw, since the server started.
        "loop_lag_max_ms_exact": round(hung_up.get("lag_max", {}).get("value", float("nan")) * 1000, 1),
        "server_cpu_hangup_s": round(hangup_cpu[1] - hangup_cpu[0], 2),
        "hangup_s": round(hangup_s, 1),
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
        result = drive(args, HOST, port, False, rooms, server.pid)
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
    parser.add_argument(
        "--connect-concurrency", type=int, default=100, help="pairs connecting at once (default 100)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=0,
        help=f"load-generator processes (default: one per {SOCKETS_PER_CLIENT:,} sockets)",
    )
    parser.add_argument(
        "--slow-callback-ms",
        type=float,
        default=0,
        help="diagnostics: the server logs every event-loop callback and GC pass longer than this"
        " (CONSULT_SLOW_CALLBACK_MS); a summary is printed to stderr",
    )
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
