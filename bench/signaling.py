"""Load benchmark for the signaling server (loopback only).

Starts the server in a subprocess (`--serve`), connects N participants (N/2 rooms, each host
admits its guest), relays `signal` messages between the pairs at a target total rate, and
reports relay latency (send timestamp carried in the message), the server's RSS and errors.
The last line of stdout is one JSON object.

    .venv/bin/python bench/signaling.py --participants 10000 --rate 2000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    ws = await session.ws_connect(url, autoping=True, max_msg_size=1 << 20)
    participant = Participant(ws, stats)
    participant.reader = asyncio.get_running_loop().create_task(participant.read())
    await ws.send_str(json.dumps({"type": "hello", "version": 1, "token": token}))
    await participant.expect("welcome")
    return participant


async def open_pair(
    session: aiohttp.ClientSession, base: str, i: int, stats: Stats, gate: asyncio.Semaphore
) -> tuple[Participant, Participant]:
    async with gate:
        url = f"{base}/ws/rooms/r{i}"
        host = await open_participant(session, url, f"h{i}", stats)
        guest = await open_participant(session, url, f"g{i}", stats)
        await guest.ws.send_str('{"type":"join"}')  # no pre-call check: in the call once admitted
        await host.expect("peer_joined")
        await host.ws.send_str('{"type":"admit"}')
        await guest.expect("clock")
        await host.expect("clock")
        host.ready = guest.ready = True
        return host, guest


async def drive(args: argparse.Namespace, port: int, server_pid: int) -> dict[str, Any]:
    stats = Stats()
    sent_before = 0
    base = f"http://{HOST}:{port}"
    pairs_n = args.participants // 2
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    rss_samples: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(args.connect_concurrency)
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(open_pair(session, base, i, stats, gate) for i in range(pairs_n)),
            return_exceptions=True,
        )
        pairs = [r for r in results if isinstance(r, tuple)]
        for r in results:
            if isinstance(r, BaseException):
                stats.error(f"connect_{type(r).__name__}")
        connect_s = time.perf_counter() - t0
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
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=2000, help="2 per room, max 10000")
    parser.add_argument("--rate", type=float, default=2000, help="total signal messages/s")
    parser.add_argument("--duration", type=float, default=10, help="seconds of measured load")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10,
        help="seconds of unmeasured load after connecting (the server's garbage collector "
        "does its full passes over the new sockets' objects then)",
    )
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--serve", action="store_true", help="internal: run the server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rooms", type=int, default=0, help="internal: rooms to register")
    args = parser.parse_args()
    if not 2 <= args.participants <= 10_000:
        parser.error("--participants must be between 2 and 10000")
    raise_fd_limit(args.participants * 2 + 1024)

    if args.serve:
        asyncio.run(serve(args.port, args.rooms))
        return

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
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if line.strip() != "READY":
            raise SystemExit(f"server did not start: {line!r}")
        result = asyncio.run(drive(args, port, server.pid))
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)
        if server.poll() is None:
            server.kill()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
