"""The listening socket against hostile clients, over real sockets to a real `consult serve`.

Slow clients (slowloris) are dropped after the header timeout; one address cannot hold more
than its share of connections; running out of file descriptors is logged once, not thousands of
times a second. The access log against any bytes: tests/test_access_log.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import re
import socket
import ssl
import subprocess
import threading
import time
import weakref
from asyncio import sslproto
from collections.abc import Callable
from pathlib import Path

import pytest

from consult.ops import certs
from consult.ops.edge import (
    GC_FULL_EVERY,
    GC_MIDDLE_EVERY,
    GC_YOUNG_THRESHOLD,
    TLS_READ_BUFFER,
    AcceptErrorLimiter,
    ConnectionLimiter,
    GcFreezer,
    SlowCallbackProbe,
    address_key,
    handler_kwargs,
    pace_tls_handshakes,
    share_tls_read_buffer,
    trim_tls_connections,
    unpace_tls_handshakes,
)
from tests.harness.server import ConsultServer

OTHER_ADDR = "127.0.0.1"  # a second client address inside the test namespace


def connect(server: ConsultServer, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect((server.host, server.port))
    return s


def get(server: ConsultServer, path: str = "/healthz", source: str | None = None) -> bytes:
    """One complete request on a fresh connection; the raw response head and body."""
    with connect(server, source) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """True if the server closes `s` (EOF or reset) within `within` seconds."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def log_text(server: ConsultServer) -> str:
    return server.stderr_path.read_text(errors="replace") + server.stdout_path.read_text(errors="replace")


# -- unit -------------------------------------------------------------------------------------


def test_address_key_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key(None) is None


def test_connection_limiter_counts_and_releases() -> None:
    limiter = ConnectionLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a")
    assert not limiter.acquire("a")
    assert limiter.acquire("b")
    limiter.release("a")
    assert limiter.acquire("a")
    assert ConnectionLimiter(0).acquire("a")  # 0: no limit


def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limiter = AcceptErrorLimiter(60.0, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        context = {
            "message": "socket.accept() out of system resource",
            "exception": OSError(24, "Too many open files"),
            "socket": object(),
        }
        with caplog.at_level(logging.ERROR):
            for _ in range(10_000):
                limiter(loop, context)
            now[0] += 61
            limiter(loop, context)
            limiter(loop, {"message": "something else entirely"})
    finally:
        loop.close()
    accept = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(accept) == 2
    assert "9999 more" in accept[1].getMessage()
    assert any("something else entirely" in r.getMessage() for r in caplog.records)


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_gc_freezer_freezes_full_collection_survivors_and_hands_them_back_hourly() -> None:
    now = [0.0]
    freezer = GcFreezer(3600, clock=lambda: now[0])
    gc.unfreeze()
    thresholds = gc.get_threshold()
    freezer.install()
    try:
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, GC_MIDDLE_EVERY, GC_FULL_EVERY)
        gc.collect(0)
        assert gc.get_freeze_count() == 0  # young passes do not freeze
        gc.collect(1)
        assert gc.get_freeze_count() > 0 and freezer.freezes == 1  # middle passes do
        gc.unfreeze()
        survivor = Cycle()
        dead = weakref.ref(survivor)
        gc.collect(2)
        assert gc.get_freeze_count() > 0 and freezer.freezes == 2
        del survivor
        gc.collect(2)
        assert dead() is not None  # frozen cyclic garbage waits for the hourly hand-back
        now[0] += 3601
        gc.collect(2)
        assert gc.get_freeze_count() == 0
        gc.collect(2)
        assert dead() is None
        assert gc.get_freeze_count() > 0  # and the survivors of that pass are frozen again
    finally:
        freezer.uninstall()
        gc.unfreeze()
    assert freezer not in gc.callbacks and gc.get_threshold() == thresholds


async def churn_old_for_young(steps: int) -> int:
    """Frees old objects and makes as many young ones that stay, as a burst of teardowns does:
    Python's allocation count stays near zero. The largest young generation seen."""
    gc.collect()
    # Lists: containers the collector tracks, freed by their reference count alone.
    old: list[list[int]] = [[] for _ in range(steps * 200)]
    gc.collect()  # old now sits in the oldest generation
    young: list[list[int]] = []
    largest = 0
    for _ in range(steps):
        del old[-200:]
        young.extend([] for _ in range(200))
        largest = max(largest, len(gc.get_objects(0)))
        await asyncio.sleep(0.002)
    return largest


async def test_gc_freezer_sweeps_a_young_generation_that_deallocations_hid() -> None:
    loop = asyncio.get_running_loop()
    gc.unfreeze()
    unswept = GcFreezer(sweep_interval_s=0)
    unswept.install(loop)
    try:
        # Without sweeps the count never reaches the threshold: every young object piles up.
        assert await churn_old_for_young(60) > 8000
        assert unswept.sweeps == 0
    finally:
        unswept.uninstall()
        gc.unfreeze()
    freezer = GcFreezer(sweep_interval_s=0.005)
    freezer.install(loop)
    try:
        assert await churn_old_for_young(60) < 4000
        assert freezer.sweeps >= 5
        # A middle or full pass now and then, as Python's own schedule would.
        assert gc.get_count()[1] <= GC_MIDDLE_EVERY + 1
    finally:
        freezer.uninstall()
        gc.unfreeze()
    assert freezer not in gc.callbacks
    await asyncio.sleep(0.02)
    swept = freezer.sweeps
    await asyncio.sleep(0.02)
    assert freezer.sweeps == swept  # uninstalled: no more sweeps


def test_gc_freezer_sweep_makes_the_hourly_hand_back_when_no_full_pass_comes() -> None:
    now = [0.0]
    freezer = GcFreezer(3600, clock=lambda: now[0])
    gc.unfreeze()
    freezer.install()
    try:
        survivor = Cycle()
        dead = weakref.ref(survivor)
        gc.collect(1)  # a middle pass freezes it
        del survivor
        assert freezer.sweep() in (0, 1, 2)
        assert dead() is not None  # frozen cyclic garbage waits for the hand-back
        now[0] += 3601
        assert freezer.sweep() == 2
        assert dead() is None
    finally:
        freezer.uninstall()
        gc.unfreeze()


async def test_slow_callback_probe_names_the_callbacks_that_held_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def busy_task() -> None:
        time.sleep(0.03)  # noqa: ASYNC251 (holds the loop, as a long callback would)

    def busy_callback() -> None:
        time.sleep(0.03)

    loop = asyncio.get_running_loop()
    original = asyncio.events.Handle._run
    probe = SlowCallbackProbe(0.02)
    probe.install()
    try:
        with caplog.at_level(logging.WARNING, logger="consult.edge"):
            await asyncio.create_task(busy_task())
            done = loop.create_future()
            loop.call_soon(busy_callback)
            loop.call_soon(done.set_result, None)
            await done
            await asyncio.sleep(0)  # a quick callback is not logged
    finally:
        probe.uninstall()
    lines = [r.getMessage() for r in caplog.records if "slow callback" in r.getMessage()]
    assert probe.slow == 2 and len(lines) == 2, lines
    assert "task " in lines[0] and "busy_task" in lines[0] and "(CPU " in lines[0]
    assert "busy_callback" in lines[1]
    assert asyncio.events.Handle._run is original and probe._on_gc not in gc.callbacks  # handed back


async def in_one_iteration(callback: Callable[[], None], times: int) -> None:
    """Run `callback` `times` times, all ready at once (one loop iteration), and one more
    iteration after them (where the probe sums up the one before)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    for _ in range(times):
        loop.call_soon(callback)
    loop.call_soon(done.set_result, None)
    await done
    await asyncio.sleep(0)


async def test_slow_callback_probe_logs_an_iteration_held_by_many_short_callbacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 40 callbacks of 1 ms, all ready at once, run in one iteration: none is slow on its own, the
    # iteration is (a timer due meanwhile waits for all of them).
    def short_callback() -> None:
        time.sleep(0.001)

    loop = asyncio.get_running_loop()
    probe = SlowCallbackProbe(0.02)
    probe.install()
    try:
        with caplog.at_level(logging.WARNING, logger="consult.edge"):
            await in_one_iteration(short_callback, 40)
    finally:
        probe.uninstall()
    slow_callbacks = [r.getMessage() for r in caplog.records if "slow callback" in r.getMessage()]
    iterations = [r.getMessage() for r in caplog.records if "slow iteration" in r.getMessage()]
    assert probe.slow == 0 and not slow_callbacks, slow_callbacks
    assert probe.slow_iterations >= 1 and iterations
    assert "short_callback" in iterations[0] and "(CPU " in iterations[0], iterations
    assert "_run_once" not in vars(loop) and "select" not in vars(loop._selector)  # handed back


async def test_a_slow_iteration_says_where_its_wall_time_went_besides_the_loops_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 25 callbacks that each wait 2 ms off the CPU (as a socket call waits for the GIL), while
    # another thread of the process runs Python: the iteration's wall time is mostly not the
    # loop's CPU, and the summary says whose it was (the other thread's CPU, the loop thread's
    # voluntary switches), not only "CPU 1 ms of 50".
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    def waiting_callback() -> None:
        time.sleep(0.002)

    probe = SlowCallbackProbe(0.03)
    spinner = threading.Thread(target=spin, daemon=True)
    probe.install()
    spinner.start()
    try:
        with caplog.at_level(logging.WARNING, logger="consult.edge"):
            await in_one_iteration(waiting_callback, 25)
    finally:
        stop.set()
        spinner.join()
        probe.uninstall()
    lines = [r.getMessage() for r in caplog.records if "slow iteration" in r.getMessage()]
    assert lines, caplog.text
    found = re.search(
        r"slow iteration ([\d.]+) ms \(CPU ([\d.]+) ms, waiting for a CPU ([\d.]+|nan) ms, other"
        r" threads' CPU ([\d.]+) ms, (\d+) voluntary and (\d+) involuntary switches, (\d+) page faults\)",
        lines[0],
    )
    assert found, lines[0]
    wall, cpu, _runqueue, others, voluntary = (float(found[i]) for i in range(1, 6))
    assert wall >= 50 and cpu < wall / 2, lines[0]
    assert others >= 2, lines[0]  # the spinner ran while the loop's thread waited
    assert voluntary >= 25, lines[0]  # each wait gave up the CPU


async def test_slow_callback_probe_survives_a_collection_while_it_sums_up_an_iteration() -> None:
    # The summary of a slow iteration allocates while it reads the iteration's kinds; a
    # collection then runs the probe's own GC callback, which records the pass in those kinds.
    # Seen in a 19,900-participant run: the dict changed size while the summary sorted it, and
    # the RuntimeError stopped the server's loop. Here a real collection runs at that moment.
    class CollectsWhileRead(dict):
        def items(self):  # type: ignore[override]
            inner = iter(dict.items(self))
            yield next(inner)
            gc.collect(1)  # -> probe._on_gc, which records "gc1" in the iteration's kinds
            yield from inner

    loop = asyncio.get_running_loop()
    probe = SlowCallbackProbe(0.0)  # every iteration is summed up
    probe.NAMED_S = 0.0  # every callback and collection is recorded

    def read_with_a_collection() -> None:
        probe._it_kinds = CollectsWhileRead(probe._it_kinds)

    logger = logging.getLogger("consult.edge")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the summaries themselves are not the point here
    probe.install()
    try:
        done = loop.create_future()
        loop.call_soon(read_with_a_collection)
        loop.call_soon(done.set_result, None)
        await done
        await asyncio.sleep(0)
        assert loop.is_running()
    finally:
        probe.uninstall()
        logger.setLevel(level)
    assert probe.slow_iterations >= 2


async def test_websocket_heartbeats_fire_at_their_own_time_not_rounded_to_a_second() -> None:
    # aiohttp's default rounds a heartbeat (20 s) up to the next whole second of loop time, so
    # that all the sockets' heartbeats due within a second fire in one loop iteration.
    from types import SimpleNamespace

    import aiohttp
    from aiohttp import web

    heartbeats: list[float] = []

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        heartbeats.append(ws._heartbeat_cb.when())  # the timer aiohttp scheduled (private)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    settings = SimpleNamespace(header_timeout_seconds=10)
    runner = web.AppRunner(app, **handler_kwargs(settings, web.AccessLogger))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                    await ws.receive()
    finally:
        await runner.cleanup()
    assert len(heartbeats) == 3
    # Whole seconds with aiohttp's default; here 3 times in a row a whole second by chance is
    # (practically) impossible.
    assert any(when != int(when) for when in heartbeats), heartbeats


async def test_tls_connections_share_one_read_buffer_without_mixing_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Restored after the test: the change is process-wide.
    monkeypatch.setattr(sslproto.SSLProtocol, "max_size", sslproto.SSLProtocol.max_size)
    monkeypatch.setattr(sslproto.SSLProtocol, "__init__", sslproto.SSLProtocol.__init__)
    share_tls_read_buffer(asyncio.get_running_loop())
    share_tls_read_buffer(asyncio.get_running_loop())  # idempotent: not wrapped twice
    cert, key, _created = certs.generate(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.check_hostname = False
    size = 2 << 20  # 2 MiB each: many TLS records, many reads, interleaved between clients
    buffers: list[bytearray] = []

    async def echo_digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffers.append(writer.transport._ssl_protocol._ssl_buffer)  # asyncio's read buffer
        data = await reader.readexactly(size)
        writer.write(hashlib.sha256(data).digest())
        await writer.drain()
        writer.close()

    async def client(n: int) -> bool:
        body = bytes([n]) * size
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        for i in range(0, size, 100_000):
            writer.write(body[i : i + 100_000])
            await writer.drain()
        digest = await reader.readexactly(32)
        writer.close()
        return digest == hashlib.sha256(body).digest()

    server = await asyncio.start_server(echo_digest, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(120):
            assert await asyncio.gather(*(client(n) for n in range(6))) == [True] * 6
    finally:
        server.close()
        await server.wait_closed()
    assert len(buffers) == 6 and all(b is buffers[0] for b in buffers)
    assert len(buffers[0]) == TLS_READ_BUFFER


async def test_tls_handshakes_are_paced_and_all_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Process-wide patches, undone after the test.
    monkeypatch.setattr(sslproto.SSLProtocol, "max_size", sslproto.SSLProtocol.max_size)
    monkeypatch.setattr(sslproto.SSLProtocol, "__init__", sslproto.SSLProtocol.__init__)
    monkeypatch.setattr(sslproto.SSLProtocol, "buffer_updated", sslproto.SSLProtocol.buffer_updated)
    loop = asyncio.get_running_loop()
    share_tls_read_buffer(loop)  # as serve() does: the paced bytes must survive the shared buffer
    pacer = pace_tls_handshakes(loop, per_tick=2)
    assert pace_tls_handshakes(loop) is pacer  # one per loop, not wrapped twice
    cert, key, _created = certs.generate(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.check_hostname = False
    steps_per_tick: list[int] = []
    original_tick = pacer._tick

    def counting_tick() -> None:
        original_tick()
        steps_per_tick.append(pacer.done_this_tick)

    monkeypatch.setattr(pacer, "_tick", counting_tick)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            writer.write(await reader.readexactly(64))
            await writer.drain()
        writer.close()

    async def client(n: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        body = bytes([n]) * 64
        writer.write(body)
        answer = await reader.readexactly(64)
        writer.close()
        return answer == body

    def quitter() -> None:
        # A handshake that never finishes: its turn comes after it is gone.
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\x16\x03\x01\x00\x05hello")

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(120):
            results = await asyncio.gather(
                *(client(n) for n in range(40)), *(asyncio.to_thread(quitter) for _ in range(5))
            )
        assert results[:40] == [True] * 40
    finally:
        server.close()
        await server.wait_closed()
        unpace_tls_handshakes(loop)
        del sslproto.SSLProtocol._consult_pacers
    assert pacer.deferred > 0  # the burst was paced
    assert max(steps_per_tick) <= 2


async def test_a_closed_tls_connection_lets_go_of_its_openssl_object_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The protocols are kept alive here, as the reference cycles of a real server's connections
    # (and the freezer) keep them: the OpenSSL objects must go anyway, by reference counting.
    monkeypatch.setattr(sslproto.SSLProtocol, "__init__", sslproto.SSLProtocol.__init__)
    monkeypatch.setattr(sslproto.SSLProtocol, "connection_lost", sslproto.SSLProtocol.connection_lost)
    monkeypatch.setattr(
        sslproto.SSLProtocol, "_on_shutdown_complete", sslproto.SSLProtocol._on_shutdown_complete
    )
    trim_tls_connections()
    trim_tls_connections()  # idempotent: not wrapped twice
    # Whether the object was already gone when the connection was lost: dropped when the TLS
    # shutdown completed, not iterations later.
    gone_before_lost: list[bool] = []
    trimmed_lost = sslproto.SSLProtocol.connection_lost

    def spy(self: sslproto.SSLProtocol, exc: BaseException | None) -> None:
        if self in protocols:
            gone_before_lost.append(self._sslobj is None)
        trimmed_lost(self, exc)

    monkeypatch.setattr(sslproto.SSLProtocol, "connection_lost", spy)
    cert, key, _created = certs.generate(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.check_hostname = False
    protocols: list[sslproto.SSLProtocol] = []
    ssl_objects: list[weakref.ref[ssl.SSLObject]] = []
    size = 300_000  # several TLS records each way

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = writer.transport._ssl_protocol  # type: ignore[attr-defined]
        protocols.append(protocol)
        ssl_objects.append(weakref.ref(writer.get_extra_info("ssl_object")))
        assert isinstance(protocol._write_backlog, list)
        data = await reader.readexactly(size)
        writer.write(data)
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()  # until the connection is lost
        if len(protocols) == 8 and all(p._transport is None for p in protocols):
            all_lost.set()

    all_lost = asyncio.Event()

    async def client(n: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        body = bytes([n]) * size
        writer.write(body)
        answer = await reader.readexactly(size)
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        return answer == body

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(60):
            assert await asyncio.gather(*(client(n) for n in range(8))) == [True] * 8
            await all_lost.wait()
    finally:
        server.close()
        await server.wait_closed()
    assert len(protocols) == 8
    assert all(p._sslobj is None and p._get_extra_info("ssl_object") is None for p in protocols)
    assert [ref() for ref in ssl_objects] == [None] * 8
    assert gone_before_lost == [True] * 8


async def test_an_upgraded_connection_keeps_no_http_parser_or_request_queue_and_still_works() -> None:
    import aiohttp
    from aiohttp import web

    from consult.ops.edge import EdgeRequestHandler

    queues: list[object] = []
    parsers: list[object] = []

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        queues.append(request.protocol._messages)  # type: ignore[union-attr]
        parsers.append(request.protocol._parser)  # type: ignore[union-attr]
        async for msg in ws:
            await ws.send_str(msg.data.upper())
        return ws

    async def page(request: web.Request) -> web.Response:
        queues.append(request.protocol._messages)  # type: ignore[union-attr]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    server = runner.server
    assert server is not None
    limiter = ConnectionLimiter(0)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: EdgeRequestHandler(server, loop=loop, limiter=limiter), "127.0.0.1", 0
    )
    port = listener.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # keep-alive: the same connection serves two requests
                async with session.get(f"http://127.0.0.1:{port}/") as r:
                    assert await r.text() == "ok"
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                for word in ("one", "two", "three"):
                    await ws.send_str(word)
                    assert (await ws.receive()).data == word.upper()
    finally:
        listener.close()
        await runner.cleanup()
    assert [type(q).__name__ for q in queues] == ["deque", "deque", "tuple"]
    assert queues[2] == ()
    assert parsers == [None]  # the HTTP parser is dropped; the WebSocket's own reads on


# -- real server ------------------------------------------------------------------------------


async def test_slow_clients_are_dropped_after_the_header_timeout(consult_server_factory) -> None:
    server = await consult_server_factory(
        env={"CONSULT_HEADER_TIMEOUT_SECONDS": "2", "CONSULT_MAX_CONNECTIONS_PER_ADDRESS": "0"}, demo=False
    )

    def run() -> tuple[list[float], list[bytes]]:
        slow = [connect(server) for _ in range(30)]
        started = time.monotonic()
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        served: list[bytes] = []
        closed_at: dict[int, float] = {}
        # Trickle a header line every half second (an idle timer would never fire) and serve a
        # normal request meanwhile.
        while len(closed_at) < len(slow) and time.monotonic() - started < 15:
            for i, s in enumerate(slow):
                if i in closed_at:
                    continue
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    closed_at[i] = time.monotonic() - started
                    continue
                if closed_by_peer(s, 0.01):
                    closed_at[i] = time.monotonic() - started
            served.append(get(server))
            time.sleep(0.5)
        for s in slow:
            s.close()
        return sorted(closed_at.values()), served

    closed, served = await asyncio.to_thread(run)
    assert len(closed) == 30, f"only {len(closed)} of 30 slow connections were closed"
    assert 1.5 <= closed[0] and closed[-1] < 8, closed
    assert served and all(r.startswith(b"HTTP/1.1 200") for r in served)
    # A client that does send its request in time is answered as before.
    assert (await asyncio.to_thread(get, server, "/login")).startswith(b"HTTP/1.1 200")


async def test_one_address_cannot_hold_more_than_its_connections(consult_server_factory) -> None:
    limit = 5
    server = await consult_server_factory(
        env={"CONSULT_MAX_CONNECTIONS_PER_ADDRESS": str(limit), "CONSULT_HEADER_TIMEOUT_SECONDS": "60"},
        demo=False,
    )

    def run() -> None:
        held = [connect(server) for _ in range(limit)]
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)  # let the server accept them all
        extra = connect(server)
        started = time.monotonic()
        assert closed_by_peer(extra, 3), "the connection over the limit was kept open"
        assert time.monotonic() - started < 2
        extra.close()
        # Another address is still served, and so are the held connections' own requests.
        assert get(server, source=OTHER_ADDR).startswith(b"HTTP/1.1 200")
        held[0].sendall(b"Connection: close\r\n\r\n")
        assert read_all(held[0]).startswith(b"HTTP/1.1 200")
        held[0].close()
        time.sleep(0.3)
        # One slot free again: a new connection from the first address is served.
        assert get(server).startswith(b"HTTP/1.1 200")
        for s in held[1:]:
            s.close()

    await asyncio.to_thread(run)
    assert "over 5 open connections from one address" in log_text(server)


async def test_running_out_of_file_descriptors_is_logged_once_and_recovers(consult_server_factory) -> None:
    server = await consult_server_factory(
        env={"CONSULT_MAX_CONNECTIONS_PER_ADDRESS": "0", "CONSULT_HEADER_TIMEOUT_SECONDS": "60"}, demo=False
    )
    # Lower the running server's descriptor limit to what it uses now plus a few.
    in_use = len(await asyncio.to_thread(lambda: list(Path(f"/proc/{server.pid}/fd").iterdir())))
    limit = in_use + 10
    await asyncio.to_thread(
        subprocess.run, ["prlimit", f"--pid={server.pid}", f"--nofile={limit}:{limit}"], check=True
    )
    before = server.stderr_path.stat().st_size

    def run() -> list[socket.socket]:
        held = []
        for _ in range(60):  # far more than the limit: the rest wait in the listen backlog
            s = connect(server)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        time.sleep(4)  # asyncio retries accept() every second
        return held

    held = await asyncio.to_thread(run)
    flood = server.stderr_path.read_bytes()[before:].decode(errors="replace")
    for s in held:
        s.close()
    assert flood.count("cannot accept new connections") == 1, flood[-3000:]
    assert "out of system resource" not in flood
    assert len(flood) < 20_000, f"{len(flood)} bytes of log in 4 s"
    # Descriptors free again: the server answers.
    deadline = time.monotonic() + 10
    while True:
        try:
            response = await asyncio.to_thread(get, server)
            if response.startswith(b"HTTP/1.1 200"):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "server did not recover"
        await asyncio.sleep(0.5)
