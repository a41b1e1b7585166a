"""The load generator of bench/signaling.py: one process, plain asyncio, raw WebSocket frames.

Run by bench/signaling.py (never by hand): it reads its job from stdin as one JSON line
``{"host", "port", "tls", "rooms": [[room_id, host_token, guest_token], ...], "rate", "warmup",
"duration", "concurrency"}``, connects every pair (hello, join, admit, as the pages do), prints
``CONNECTED <json>``, waits for a ``GO`` line, relays ``signal`` messages at ``rate`` in total for
``warmup + duration`` seconds, prints ``DONE``, and once told (any line) hangs up and prints
``RESULT <json>`` (the latencies measured after the
warm-up, sent/received counts, errors).

Why not aiohttp's client: it costs the shared two cores several times what the server spends on
the same messages (a reader task, a queue and a message object per frame, json both ways), so the
figure measured the load generator. Here a connection is one small ``asyncio.Protocol``; frames
are masked with a zero key (a legal key that leaves the payload as it is), so a message is a
two-byte header, four zero bytes and a payload built from one precomputed prefix and the send
time; the receiver reads the send time back out of the relayed bytes without parsing JSON.
"""

from __future__ import annotations

import asyncio
import gc
import json
import ssl
import sys
import time
from typing import Any

perf_counter = time.perf_counter

UPGRADE = (
    "GET /ws/rooms/{room} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)
SIGNAL_PREFIX = b'{"type":"signal","data":{"t":'
T_MARK = b'"t":'
ZERO_MASK = b"\0\0\0\0"
PONG_EMPTY = b"\x8a\x80" + ZERO_MASK


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame: masked with the zero key, so the payload goes as it is."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + ZERO_MASK + payload


class Stats:
    __slots__ = ("errors", "latencies", "measuring", "received", "sent")

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.sent = 0
        self.received = 0
        self.measuring = False

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Client(asyncio.Protocol):
    """One participant's socket. Before it is in the call, text frames are parsed (JSON) and
    handed to whoever waits for a type; after, only relayed signals are counted and timed."""

    __slots__ = ("buf", "closed", "inbox", "ready", "stats", "transport", "upgraded", "waiter")

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.ready = False
        self.closed = False
        self.inbox: list[dict[str, Any]] | None = []
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed:
            self.closed = True
            self.stats.error("connection_lost")
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.stats.error("upgrade_" + bytes(buf[9:12]).decode(errors="replace"))
                self.closed = True
                self.transport.close()  # type: ignore[union-attr]
                self._wake()
                return
            del buf[: end + 4]
            self.upgraded = True
            self._wake()
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + n:
                break
            start = pos + head
            pos = start + n
            opcode = b0 & 0x0F
            if opcode == 0x1:
                self._text(buf, start, pos)
            elif opcode == 0x9:  # ping: pong with the same payload
                self.transport.write(frame(bytes(buf[start:pos]), 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                code = int.from_bytes(buf[start : start + 2], "big") if n >= 2 else 1005
                if not self.closed:
                    self.closed = True
                    if code not in (1000, 1001) or self.stats.measuring or not self.ready:
                        self.stats.error(f"closed_{code}")
                self._wake()
        if pos:
            del buf[:pos]

    def _text(self, buf: bytearray, start: int, end: int) -> None:
        stats = self.stats
        if self.ready and buf.startswith(SIGNAL_PREFIX, start):
            stats.received += 1
            if stats.measuring:
                at = buf.find(T_MARK, start, end) + 4
                sent = float(buf[at : buf.find(b"}", at, end)])
                stats.latencies.append(perf_counter() - sent)
            return
        message = json.loads(bytes(buf[start:end]))
        kind = message.get("type")
        if kind == "error":
            stats.error(str(message.get("code")))
        elif self.inbox is not None:
            self.inbox.append(message)
            self._wake()

    async def expect(self, kind: str, timeout_s: float = 60) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            assert self.inbox is not None
            for i, message in enumerate(self.inbox):
                if message.get("type") == kind:
                    del self.inbox[: i + 1]
                    return message
            if self.closed:
                raise ConnectionError(f"closed while waiting for {kind}")
            self.waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self.waiter
            finally:
                self.waiter = None

    async def upgrade(self, request: bytes, timeout_s: float = 60) -> None:
        self.transport.write(request)  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        while not self.upgraded:
            if self.closed:
                raise ConnectionError("upgrade refused")
            self.waiter = loop.create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self.waiter
            finally:
                self.waiter = None

    def send_json(self, message: dict[str, Any]) -> None:
        self.transport.write(frame(json.dumps(message, separators=(",", ":")).encode()))  # type: ignore[union-attr]


async def open_client(
    job: dict[str, Any], ctx: ssl.SSLContext | None, room: str, token: str, stats: Stats
) -> Client:
    loop = asyncio.get_running_loop()
    _transport, client = await loop.create_connection(
        lambda: Client(stats), job["host"], job["port"], ssl=ctx, server_hostname="" if ctx else None
    )
    request = UPGRADE.format(room=room, host=job["host"], port=job["port"]).encode()
    await client.upgrade(request)
    client.send_json({"type": "hello", "version": 1, "token": token})
    await client.expect("welcome")
    return client


async def open_pair(
    job: dict[str, Any], ctx: ssl.SSLContext | None, room: list[str], stats: Stats, gate: asyncio.Semaphore
) -> tuple[Client, Client]:
    room_id, host_token, guest_token = room
    async with gate:
        host = await open_client(job, ctx, room_id, host_token, stats)
        guest = await open_client(job, ctx, room_id, guest_token, stats)
        guest.send_json({"type": "join"})  # no pre-call check: in the call once admitted
        await host.expect("peer_joined")
        host.send_json({"type": "admit"})
        await guest.expect("clock")
        await host.expect("clock")
        for c in (host, guest):
            c.ready = True
            c.inbox = None
        return host, guest


async def run(job: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    ctx = None
    if job["tls"]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:  # asyncio's 256 KiB read buffer per TLS socket: 5 GiB at 20,000 (see edge.py)
            from consult.ops.edge import share_tls_read_buffer

            share_tls_read_buffer(loop)
        except ImportError:
            pass
    stats = Stats()
    gate = asyncio.Semaphore(job["concurrency"])
    t0 = perf_counter()
    results = await asyncio.gather(
        *(open_pair(job, ctx, room, stats, gate) for room in job["rooms"]), return_exceptions=True
    )
    pairs = [r for r in results if isinstance(r, tuple)]
    for r in results:
        if isinstance(r, BaseException):
            stats.error(f"connect_{type(r).__name__}")
    senders = [c for pair in pairs for c in pair]
    del results
    # What lives until the end (the sockets) moves out of this process's collector's way; a
    # young collection then costs little and no full one scans 20,000 sockets mid-measure.
    gc.collect()
    gc.freeze()
    connected = {"participants": len(senders), "connect_s": perf_counter() - t0}
    print("CONNECTED " + json.dumps(connected), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "GO":
        return
    rate = job["rate"]
    tick = 0.002
    start = perf_counter()
    measure_from = start + job["warmup"]
    stop_at = measure_from + job["duration"]
    index = 0
    sent_before = 0
    cpu_measure = 0.0
    count = len(senders)
    prefix = SIGNAL_PREFIX
    while (now := perf_counter()) < stop_at and count:
        if not stats.measuring and now >= measure_from:
            stats.measuring = True
            sent_before = stats.sent
            cpu_measure = time.process_time()
        due = int((now - start) * rate) - index
        for _ in range(due):
            sender = senders[index % count]
            index += 1
            if sender.closed:
                stats.error("send_closed")
                continue
            payload = b"%s%r}}" % (prefix, perf_counter())
            sender.transport.write(bytes((0x81, 0x80 | len(payload))) + ZERO_MASK + payload)  # type: ignore[union-attr]
            stats.sent += 1
        await asyncio.sleep(tick)
    cpu_measured = time.process_time() - cpu_measure
    await asyncio.sleep(0.5)  # the last relays
    stats.measuring = False
    # The server's figures for connecting and relaying are read now, before everyone hangs up.
    print("DONE", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    close = frame((1000).to_bytes(2, "big"), 0x8)
    for c in senders:
        c.closed = True
        if c.transport is not None and not c.transport.is_closing():
            c.transport.write(close)
            c.transport.close()
    await asyncio.sleep(0.2)
    result = {
        "latencies_ms": [round(x * 1000, 3) for x in stats.latencies],
        "sent": stats.sent,
        "sent_measured": stats.sent - sent_before,
        "received": stats.received,
        "errors": stats.errors,
        "cpu_measured_s": cpu_measured,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    job = json.loads(sys.stdin.readline())
    asyncio.run(run(job))


if __name__ == "__main__":
    main()
