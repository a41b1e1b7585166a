"""The listening socket, hardened for the open internet: what `consult serve` runs.

aiohttp's own knobs do part of it. Its protocol arms one timer when a connection opens and again
after every response (``keepalive_timeout``) and drops the connection if, when the timer fires,
it is still waiting for a complete request: so that timer *is* the header-read timeout (a
slowloris that trickles header bytes never completes a request), and it also ends idle
keep-alive connections. ``web.run_app`` sets it to 75 s; we set it to ``header_timeout_seconds``.
With TLS, the handshake gets the same bound (``ssl_handshake_timeout``).

The rest aiohttp has no knob for, so it lives here:

- ``EdgeRequestHandler`` counts open connections per client address (an IPv6 client by its /64,
  which one host usually owns whole) and closes any beyond ``max_connections_per_address`` as
  soon as it is accepted (a trusted reverse proxy's connections are not counted: they carry
  many clients); it also gives the responses aiohttp writes on its own (400 for a
  malformed request, before our application sees it) the same versionless ``Server`` header.
- ``AcceptErrorLimiter`` is the loop's exception handler: when the process runs out of file
  descriptors, asyncio reports the failed ``accept()`` once per queued connection and retries
  every second, which floods the log (tens of MB in 30 s); this logs it once per interval with a
  count of what it held back.
- ``share_tls_read_buffer``: asyncio gives every TLS connection its own zero-filled 256 KiB read
  buffer (``asyncio.sslproto.SSLProtocol``), resident from the handshake on: 2,000 signaling
  sockets held 500 MiB of it. A selector loop reads a socket into that buffer and copies the
  bytes into the connection's TLS input (a MemoryBIO) in the same call, before any other
  connection can read, so one 16 KiB buffer serves every connection of the process.
- ``trim_tls_connections``: asyncio's TLS connection keeps what it no longer needs. Its OpenSSL
  object (~16 KiB while open) also holds a ~17 KiB read buffer from the moment the peer's
  close_notify arrives and a ~17 KiB write buffer once ours is sent (``SSL_MODE_RELEASE_BUFFERS``,
  which CPython sets, frees them only while the session is open), and asyncio keeps the object
  until the protocol is collected, at least two loop iterations after the shutdown: when 19,900
  participants hung up at once, ~10,000 of them held these buffers together (+180 MiB). Trimmed,
  the protocol drops the OpenSSL object as soon as its TLS shutdown is complete (or the
  connection is lost), and its write backlog (empty but for a write made before the handshake
  completes) is a list (56 bytes) instead of a deque (760).
- ``GcFreezer``: every full garbage collection scans every live container object; with thousands
  of open sockets (~100 objects each) one pass held the loop for hundreds of milliseconds, and
  while sockets connect the heap grows and triggers one pass after another. After each full
  pass the freezer moves its survivors out of the collector's way (``gc.freeze()``), so the
  next pass scans only what was made since. Cyclic garbage among frozen objects is not
  reclaimed until they are handed back (``gc.unfreeze()``) every ``GC_UNFREEZE_INTERVAL_S``:
  that one full pass an hour is what remains of the stall. Passes are also made smaller and more
  frequent (``GC_YOUNG_THRESHOLD``, ``GC_MIDDLE_EVERY``, ``GC_FULL_EVERY``): a full pass every
  ``GC_FULL_EVERY`` + 1 middle-generation passes instead of 11, so each scans fewer new objects.
  And the freezer sweeps the young generation every ``GC_SWEEP_INTERVAL_S``: Python starts a
  young pass when allocations minus deallocations pass the threshold, so when many old (frozen)
  objects are freed, as when 2,000 participants hang up together, the deallocations cancel the
  allocations and no pass runs while the young generation grows to 20,000+ objects: the pass
  that finally runs (and the middle and full ones after it) scanned them all, 10-35 ms each.
  Swept on a timer, a pass scans what ``GC_SWEEP_INTERVAL_S`` of work left alive. The survivors
  of middle passes are frozen too (not only of full ones): a full pass in the burst otherwise
  scanned everything its first second left alive (20,000+ objects, 40 ms). With middle passes
  freezing, full ones may never come due, so the sweep makes the hourly hand-back itself.
  What this asks of the code: what a request or a message makes must not end as cyclic garbage,
  or every one in flight when a middle pass runs is kept for up to an hour. Requests are checked
  for it (tests/test_request_cycles.py): aiohttp_jinja2's template context, raised redirects and
  the router's 404s each made a cycle per request, 8,000 frozen objects a second at 800 bookings/s.
- ``pace_tls_handshakes``: a clinic's phones connecting at once send their TLS ClientHellos
  within the same milliseconds; asyncio answers every one that arrived in the same loop
  iteration (0.5-1.5 ms of CPU each, the key exchange), so a burst of 100 held the loop, and
  every call's signaling, for 50-150 ms (more on a busy machine). Paced, at most
  ``HANDSHAKES_PER_TICK`` are worked on per iteration and the rest wait their turn in arrival
  order (their bytes are kept), with the relays of open calls running in between. Likewise the
  listening socket accepts at most ``ACCEPTS_PER_TICK`` connections per iteration (asyncio's
  batch is the listen backlog, 2,048 here), while the kernel still queues ``BACKLOG``.
- ``cap_io_events``: asyncio runs, in one loop iteration, the callback of every socket its
  ``select`` reported, and a timer due meanwhile (every relay's and visit clock's) waits for all
  of them; the selector reports every ready socket at once. When a clinic's phones hang up
  together, 2,000 closing sockets (TLS shutdown, the WebSocket close, waking each handler) were
  one iteration, and their handlers' teardowns the next: the loop was held for 0.25-0.5 s. Capped,
  epoll hands out at most ``IO_EVENTS_PER_TICK`` ready sockets per iteration; being
  level-triggered, it reports the rest at the next call, in order, so none is lost or starved and
  timers run in between. The handlers' teardowns take turns likewise
  (``signaling.connection.TeardownPacer``). In ordinary traffic far fewer are ready at once.
  When an iteration that handled a full batch still takes longer than ``IO_ITERATION_BUDGET_S``
  (10 ms: 19,900 participants hanging up on two cores, where each iteration also waits for a
  core and for the GIL the database writer holds), the next takes half as many sockets, down to
  ``IO_EVENTS_MIN_PER_TICK``, and the number grows back by a quarter after each iteration under
  half the budget: a timer due meanwhile waits for about two iterations, not two of 30-40 ms.
- ``SlowCallbackProbe`` (diagnostics, off unless ``CONSULT_SLOW_CALLBACK_MS`` is set in the
  server's environment): logs every event-loop callback that held the loop longer than that
  many milliseconds, with its CPU time (wall time far above CPU time means the process was
  waiting for a core, not working) and what it was (a task's coroutine, a socket's protocol and
  TLS state), and every loop iteration that did (many short callbacks that were ready together,
  which no single callback shows: a timer due meanwhile waits for all of them), with how many
  callbacks and I/O events it ran and which kinds took most of it. asyncio's own debug mode
  times callbacks too but slows every one of them down.
- ``raise_fd_limit`` lifts the soft file-descriptor limit to the hard one at start (1,024 is the
  usual soft default; systemd's unit in docs/install.md raises the hard one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import gc
import ipaddress
import logging
import math
import os
import resource
import select
import selectors
import signal
import socket
import time
import types
from asyncio import sslproto
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import hdrs, web

from consult.core import i18n, proxy
from consult.core.security import SERVER_HEADER

# Pending connections the kernel queues (capped by net.core.somaxconn): a clinic opening at 8:00,
# or every phone reconnecting after a restart, arrives at once; 128 made the rest retry SYNs (1 s+).
BACKLOG = 2048

log = logging.getLogger("consult.edge")

ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# How often the objects frozen after full collections are handed back to the collector: the
# bound on how long cyclic garbage among them waits to be reclaimed.
GC_UNFREEZE_INTERVAL_S = 3600.0
# gc.set_threshold while the freezer runs (Python's defaults: 700, 10, 10). A pass costs in
# proportion to the objects it scans (measured with 2,000 sockets connecting: young passes up to
# 16 ms of CPU at 700, 34 ms at 7,000; full passes 53 ms at (700, 10, 2), 24 ms at (500, 5, 1)):
# smaller, more frequent passes hold the loop for less at a time.
GC_YOUNG_THRESHOLD = 500
GC_MIDDLE_EVERY = 5
GC_FULL_EVERY = 1
# How often the freezer runs the collection the thresholds above would, whatever the allocation
# count says (see GcFreezer.sweep): what a burst of teardowns leaves in the young generation is
# scanned in small passes instead of one of 20,000+ objects.
GC_SWEEP_INTERVAL_S = 0.05

# TLS handshakes worked on per event-loop iteration, and connections accepted per iteration;
# see pace_tls_handshakes.
HANDSHAKES_PER_TICK = 4
ACCEPTS_PER_TICK = 32
# I/O events (sockets ready to read or write) handled per event-loop iteration at most; see
# cap_io_events.
IO_EVENTS_PER_TICK = 32
# The fewest it comes down to after slow iterations.
IO_EVENTS_MIN_PER_TICK = 2
# An iteration that handled a full batch and took longer than this halves the batch (a timer
# waits for about two iterations: the one running when it fell due, and the next, which runs it).
IO_ITERATION_BUDGET_S = 0.010

# aiohttp rounds timers longer than this up to a whole second (its default: 5 s); see handler_kwargs.
TIMER_CEIL_THRESHOLD_S = float(365 * 86400)

# Bytes a TLS connection reads from its socket at once (asyncio's default: 256 KiB, allocated per
# connection; here one buffer for all of them); see the module docstring.
TLS_READ_BUFFER = 16 * 1024


def address_key(address: str | None) -> str | None:
    """What one client is: its IPv4 address, or the /64 of an IPv6 one (an IPv4-mapped IPv6
    address counts as its IPv4 address)."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionLimiter:
    """Open connections per client; ``limit`` 0 means no limit. Addresses in ``exempt`` (the
    trusted reverse proxies, whose connections carry many clients) are never counted: the proxy
    limits its own clients."""

    def __init__(self, limit: int, exempt: Sequence[proxy.Network] = ()) -> None:
        self.limit = limit
        self.exempt = tuple(exempt)
        self.open: Counter[str] = Counter()
        self.refused = 0

    def key_of(self, address: str | None) -> str | None:
        """The counter an address uses; None (not counted) for an exempt proxy."""
        if self.exempt and proxy.is_trusted(address, self.exempt):
            return None
        return address_key(address)

    def acquire(self, key: str | None) -> bool:
        if key is None or self.limit <= 0:
            return True
        if self.open[key] >= self.limit:
            self.refused += 1
            return False
        self.open[key] += 1
        return True

    def release(self, key: str | None) -> None:
        if key is None or self.limit <= 0 or key not in self.open:
            return
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]


# What an upgraded connection's request queue becomes (see EdgeRequestHandler.set_parser).
_NO_MESSAGES: Any = ()


class EdgeRequestHandler(web.RequestHandler):
    """aiohttp's protocol, plus the per-address cap and a versionless Server header on the
    responses aiohttp makes itself."""

    # aiohttp's protocol is slotted; without these a dict per connection holds the three below.
    __slots__ = ("_edge_key", "_edge_limiter", "_edge_refused")

    def __init__(self, manager: web.Server, *, limiter: ConnectionLimiter, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge_limiter = limiter
        self._edge_key: str | None = None
        self._edge_refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        key = self._edge_limiter.key_of(peer[0] if isinstance(peer, tuple) and peer else None)
        if not self._edge_limiter.acquire(key):
            self._edge_refused = True
            if self._edge_limiter.refused == 1 or self._edge_limiter.refused % 1000 == 0:
                log.warning(
                    "closed a connection from %s: over %d open connections from one address"
                    " (%d refused so far)",
                    key,
                    self._edge_limiter.limit,
                    self._edge_limiter.refused,
                )
            transport.abort()  # at once: no request is read, no file descriptor is kept
            return
        self._edge_key = key
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._edge_refused:
            return  # aiohttp never saw this connection
        self._edge_limiter.release(self._edge_key)
        self._edge_key = None
        super().connection_lost(exc)

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        """The connection became a WebSocket (aiohttp calls this when it accepts the upgrade):
        from now on its bytes go to `parser`, and what served its HTTP request is kept for the
        socket's lifetime though never used again. aiohttp parses and queues a further request
        only while no payload parser is set, and touches the HTTP parser of an upgraded
        connection nowhere else (pausing and resuming skip it), so the parser (~1.6 KiB) is
        dropped and the empty request deque (760 bytes) becomes an empty tuple, which reads the
        same and would fail loudly if anything appended to it."""
        super().set_parser(parser, data_received_cb)
        if self._upgraded:
            self._parser = None
        if not self._messages:
            self._messages = _NO_MESSAGES

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        response.headers[hdrs.SERVER] = SERVER_HEADER
        return response


class AcceptErrorLimiter:
    """A loop exception handler: the out-of-descriptors accept error at most once per
    ``interval`` seconds; everything else goes to the loop's default handler."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: float | None = None
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS and "socket" in context):
            loop.default_exception_handler(context)
            return
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.suppressed += 1
            return
        log.error(
            "cannot accept new connections: %s (%d more such errors in the last %.0f s not logged)."
            " Too many open connections: raise LimitNOFILE, lower max_connections_per_address.",
            exc.strerror or exc,
            self.suppressed,
            self.interval if self.last is not None else 0,
        )
        self.last = now
        self.suppressed = 0


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard) as they now are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def share_tls_read_buffer(loop: asyncio.AbstractEventLoop, size: int = TLS_READ_BUFFER) -> None:
    """From now on every TLS connection asyncio creates in this process reads its socket into one
    shared `size`-byte buffer (or, on a loop that is not a selector loop, where reads complete
    later, into its own `size`-byte buffer) instead of 256 KiB of its own. Idempotent."""
    protocol = sslproto.SSLProtocol
    protocol.max_size = min(protocol.max_size, size)
    if getattr(protocol.__init__, "shares_read_buffer", False) or not isinstance(
        loop, asyncio.selector_events.BaseSelectorEventLoop
    ):
        return
    shared = bytearray(protocol.max_size)
    view = memoryview(shared)
    original = protocol.__init__

    @functools.wraps(original)
    def __init__(self: sslproto.SSLProtocol, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # get_buffer() hands this out; buffer_updated() copies from it into the MemoryBIO
        # synchronously, right after the selector loop's recv_into filled it.
        self._ssl_buffer = shared
        self._ssl_buffer_view = view

    __init__.shares_read_buffer = True  # type: ignore[attr-defined]
    protocol.__init__ = __init__  # type: ignore[method-assign]


def trim_tls_connections() -> None:
    """From now on every TLS connection asyncio creates in this process drops its OpenSSL object
    when the connection is lost, and queues writes in a list; see the module docstring.
    Idempotent."""
    protocol = sslproto.SSLProtocol
    if getattr(protocol.connection_lost, "drops_ssl_object", False):
        return
    original_init = protocol.__init__
    original_shutdown_complete = protocol._on_shutdown_complete
    original_lost = protocol.connection_lost

    @functools.wraps(original_init)
    def __init__(self: sslproto.SSLProtocol, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # asyncio only appends to it, reads [0], replaces or deletes [0], clears it and tests
        # it for emptiness: a list does all of that.
        self._write_backlog = []  # type: ignore[assignment]

    @functools.wraps(original_shutdown_complete)
    def _on_shutdown_complete(self: sslproto.SSLProtocol, shutdown_exc: BaseException | None) -> None:
        original_shutdown_complete(self, shutdown_exc)
        if shutdown_exc is None:
            # Both close_notify alerts are through (or the peer's, with its TCP end): the session
            # is over and the transport closes next. Until then the protocol stays in SHUTDOWN,
            # where the only step that would use the object again is a repeated unwrap when more
            # bytes arrive; marking the end of the stream as seen makes that step skip it.
            self._eof_received = True
            _drop_ssl_object(self)

    @functools.wraps(original_lost)
    def connection_lost(self: sslproto.SSLProtocol, exc: BaseException | None) -> None:
        original_lost(self, exc)
        # The protocol is UNWRAPPED now: no code path of asyncio's touches the object again
        # (every read, write and shutdown step checks the state first).
        _drop_ssl_object(self)

    connection_lost.drops_ssl_object = True  # type: ignore[attr-defined]
    protocol.__init__ = __init__  # type: ignore[method-assign]
    protocol._on_shutdown_complete = _on_shutdown_complete  # type: ignore[method-assign]
    protocol.connection_lost = connection_lost  # type: ignore[method-assign]


def _drop_ssl_object(protocol: sslproto.SSLProtocol) -> None:
    protocol._sslobj = None  # type: ignore[assignment]
    protocol._extra.pop("ssl_object", None)


class HandshakePacer:
    """At most `per_tick` TLS handshake steps per event-loop iteration; the others are queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_tick: int = HANDSHAKES_PER_TICK) -> None:
        self.loop = loop
        self.per_tick = per_tick
        self.waiting: collections.deque[sslproto.SSLProtocol] = collections.deque()
        self.done_this_tick = 0
        self.deferred = 0  # handshake steps that waited a turn (for tests and diagnostics)
        self._scheduled = False

    def admit(self, protocol: sslproto.SSLProtocol) -> bool:
        """Whether `protocol` may do its handshake step now; if not, it is queued."""
        if not self.waiting and self.done_this_tick < self.per_tick:
            self.done_this_tick += 1
            self._schedule()
            return True
        if not getattr(protocol, "_consult_waiting", False):  # not `in self.waiting`: O(n)
            protocol._consult_waiting = True  # type: ignore[attr-defined]
            self.waiting.append(protocol)
            self.deferred += 1
        self._schedule()
        return False

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        # Runs first thing in the next iteration (call_soon goes before what the selector
        # reports), so the budget is per iteration.
        self._scheduled = False
        self.done_this_tick = 0
        while self.waiting and self.done_this_tick < self.per_tick:
            protocol = self.waiting.popleft()
            protocol._consult_waiting = False  # type: ignore[attr-defined]
            if protocol._state is not sslproto.SSLProtocolState.DO_HANDSHAKE:
                continue  # closed or timed out meanwhile
            self.done_this_tick += 1
            protocol._do_handshake()
        if self.waiting or self.done_this_tick:
            self._schedule()


def pace_tls_handshakes(
    loop: asyncio.AbstractEventLoop, per_tick: int = HANDSHAKES_PER_TICK
) -> HandshakePacer:
    """From now on TLS servers and clients on `loop` work on at most `per_tick` handshakes per
    loop iteration (see the module docstring). Returns the pacer (one per loop)."""
    protocol = sslproto.SSLProtocol
    pacers: dict[asyncio.AbstractEventLoop, HandshakePacer] = getattr(protocol, "_consult_pacers", {})
    if pacers.get(loop) is None:
        pacers[loop] = HandshakePacer(loop, per_tick)
    if not hasattr(protocol, "_consult_pacers"):
        original = protocol.buffer_updated

        @functools.wraps(original)
        def buffer_updated(self: sslproto.SSLProtocol, nbytes: int) -> None:
            if self._state is sslproto.SSLProtocolState.DO_HANDSHAKE:
                pacer = pacers.get(self._loop)
                if pacer is not None and not pacer.admit(self):
                    # Keep the bytes (the read buffer may be shared); the handshake step
                    # runs in the pacer's turn.
                    self._incoming.write(self._ssl_buffer_view[:nbytes])
                    return
            original(self, nbytes)

        protocol._consult_pacers = pacers  # type: ignore[attr-defined]
        protocol.buffer_updated = buffer_updated  # type: ignore[method-assign]
    return pacers[loop]


def unpace_tls_handshakes(loop: asyncio.AbstractEventLoop) -> None:
    pacers = getattr(sslproto.SSLProtocol, "_consult_pacers", None)
    if pacers is not None:
        pacers.pop(loop, None)


class _IoCap:
    """The I/O events a capped selector hands out per iteration: at most `top`; `cap` now;
    whether the last select handed out a full batch of `cap`, and when it returned."""

    __slots__ = ("budget_s", "cap", "full", "returned", "top")

    def __init__(self, top: int, budget_s: float) -> None:
        self.top = self.cap = top
        self.budget_s = budget_s
        self.full = False
        self.returned = time.perf_counter()

    def next_cap(self) -> int:
        """The batch for the select about to run, from how long the iteration just run took."""
        took = time.perf_counter() - self.returned
        if took > self.budget_s and self.full:
            # Slow with a full batch: the sockets' work is (part of) why; a slow timer or
            # collection with few sockets ready does not shrink what the sockets get.
            self.cap = max(min(IO_EVENTS_MIN_PER_TICK, self.top), self.cap // 2)
        elif self.cap < self.top and took < self.budget_s / 2:
            self.cap = min(self.top, self.cap + max(1, self.cap // 4))
        return self.cap


def cap_io_events(
    loop: asyncio.AbstractEventLoop,
    per_tick: int = IO_EVENTS_PER_TICK,
    budget_s: float = IO_ITERATION_BUDGET_S,
) -> bool:
    """From now on `loop` handles at most `per_tick` I/O events per iteration, and half as many
    after each iteration that handled a full batch and took longer than `budget_s` (down to
    `IO_EVENTS_MIN_PER_TICK`), growing back by a quarter after each that took less than half of
    it (see the module docstring); False (and nothing changed) on a loop that does not poll with
    epoll. Calling it again changes the cap and the budget."""
    selector = getattr(loop, "_selector", None)
    if not isinstance(selector, selectors.EpollSelector):
        return False
    state = getattr(selector, "_consult_state", None)
    if state is not None:
        state.top = state.cap = max(1, per_tick)
        state.budget_s = budget_s
        return True
    state = selector._consult_state = _IoCap(max(1, per_tick), budget_s)  # type: ignore[attr-defined]
    epoll = selector._selector  # type: ignore[attr-defined]
    fd_to_key = selector._fd_to_key  # type: ignore[attr-defined]

    def capped_select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # selectors.EpollSelector.select, with `maxevents` the cap instead of every registered
        # descriptor. Level-triggered epoll reports the sockets left over again at the next call,
        # ahead of those that became ready since (Linux keeps its ready list in order).
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            timeout = math.ceil(timeout * 1e3) * 1e-3  # at least `timeout`, as the original
        ready: list[tuple[selectors.SelectorKey, int]] = []
        cap = state.next_cap()
        try:
            fd_events = epoll.poll(timeout, cap)
        except InterruptedError:
            fd_events = []
        state.full = len(fd_events) >= cap
        state.returned = time.perf_counter()
        for fd, event in fd_events:
            events = 0
            if event & ~select.EPOLLIN:
                events |= selectors.EVENT_WRITE
            if event & ~select.EPOLLOUT:
                events |= selectors.EVENT_READ
            key = fd_to_key.get(fd)
            if key:
                ready.append((key, events & key.events))
        return ready

    selector.select = capped_select  # type: ignore[method-assign]
    return True


def uncap_io_events(loop: asyncio.AbstractEventLoop) -> None:
    selector = getattr(loop, "_selector", None)
    if getattr(selector, "_consult_state", None) is not None:
        del selector._consult_state  # type: ignore[union-attr]
        with contextlib.suppress(AttributeError):
            del selector.select  # type: ignore[union-attr]


class GcFreezer:
    """Freezes the survivors of every middle and full collection; unfreezes them every
    `unfreeze_interval_s`; on an event loop, sweeps the young generation every `sweep_interval_s`."""

    def __init__(
        self,
        unfreeze_interval_s: float = GC_UNFREEZE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval_s: float = GC_SWEEP_INTERVAL_S,
    ) -> None:
        self.unfreeze_interval_s = unfreeze_interval_s
        self.sweep_interval_s = sweep_interval_s
        self._clock = clock
        self._unfrozen_at = clock()
        self.freezes = 0
        self.sweeps = 0
        self._thresholds: tuple[int, int, int] | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        # A gc callback: runs in whichever thread collected, after the collection, without
        # allocating enough to start another.
        if phase != "stop" or info.get("generation") == 0:
            return
        # What outlived a middle pass (a few hundred milliseconds) is frozen too, not only what
        # outlived a full one: otherwise a full pass in a burst of hang-ups scanned the 20,000+
        # objects the burst's first second left alive (40 ms).
        if info.get("generation") == 2 and self._hand_back():
            return  # the next full pass scans (and frees) them all
        gc.freeze()
        self.freezes += 1

    def _hand_back(self) -> bool:
        """Unfreeze everything once every `unfreeze_interval_s`; True when it did."""
        if self._clock() - self._unfrozen_at < self.unfreeze_interval_s:
            return False
        gc.unfreeze()
        self._unfrozen_at = self._clock()
        return True

    def sweep(self) -> int:
        """Run the pass Python would start next, now; returns its generation.

        Python counts allocations minus deallocations of container objects since the last young
        pass; a pass starts when that passes the young threshold. Freeing old objects lowers the
        count without shrinking the young generation, so a burst of teardowns (each frees a
        connection's frozen objects and makes a few new ones) leaves it growing unswept. The
        generation is chosen as Python does (the oldest whose count of younger passes is over
        its threshold), so middle and full passes keep their usual share of young ones.
        """
        if self._hand_back():
            # With middle passes freezing, full ones may never come due: the hourly hand-back
            # (and the full pass that reclaims cyclic garbage among the frozen) is made here.
            gc.collect(2)
            self.sweeps += 1
            return 2
        counts = gc.get_count()
        thresholds = gc.get_threshold()
        generation = 0
        for older in (2, 1):
            if counts[older] > thresholds[older]:
                generation = older
                break
        gc.collect(generation)
        self.sweeps += 1
        return generation

    def _sweep_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sweep()
        self._sweep_handle = loop.call_later(self.sweep_interval_s, self._sweep_tick, loop)

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
            self._thresholds = gc.get_threshold()
            gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_EVERY, GC_FULL_EVERY)
        if loop is not None and self._sweep_handle is None and self.sweep_interval_s > 0:
            self._sweep_handle = loop.call_later(self.sweep_interval_s, self._sweep_tick, loop)

    def uninstall(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None


def _thread_usage() -> Any:
    """This thread's resource usage (Linux); zeros where threads have none of their own."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    if who is None:
        return _NO_USAGE
    return resource.getrusage(who)


_NO_USAGE = types.SimpleNamespace(ru_nvcsw=0, ru_nivcsw=0, ru_minflt=0, ru_majflt=0)


class SlowCallbackProbe:
    """Times every callback the event loop runs (``asyncio.Handle._run``) and every iteration of
    the loop, and logs the slow ones.

    An iteration runs every callback that was ready when it started (all the sockets the
    selector reported, the timers due, what the previous iteration scheduled): a timer due
    meanwhile, such as the loop-lag sampler's, waits for the whole of it. So many short
    callbacks can hold the loop as long as one long one; a slow iteration is logged with how
    many callbacks it ran and which kinds took the most of it.
    """

    # Callbacks shorter than this are counted, not named, in a slow iteration's summary.
    NAMED_S = 0.0005

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.slow = 0
        self.slow_iterations = 0
        self._original: Callable[..., Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gc_started = 0.0
        self._gc_cpu = 0.0
        # The iteration in progress: when its select returned, CPU then, I/O events, callbacks
        # run, and {kind: [count, seconds]} of its callbacks longer than NAMED_S (and GC passes).
        self._it_wall = 0.0
        self._it_cpu = 0.0
        self._it_events = 0
        self._it_callbacks = 0
        self._it_kinds: dict[str, list[float]] = {}
        # Where an iteration's wall time went besides the loop thread's CPU: the whole process's
        # CPU (the other threads' share is the difference), the loop thread's voluntary and
        # involuntary context switches and page faults, and its wait for a CPU while runnable
        # (from /proc/thread-self/schedstat, where the kernel keeps it).
        self._it_process = 0.0
        self._it_usage: Any = None
        self._it_runqueue: int | None = None
        self._schedstat: int | None = None
        self._own_select: Callable[..., Any] | None = None

    def _runqueue_ns(self) -> int | None:
        """Nanoseconds the loop thread has waited, runnable, for a CPU (None when unknown)."""
        if self._schedstat is None:
            return None
        try:
            return int(os.pread(self._schedstat, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._gc_cpu = time.thread_time()
            return
        took = time.perf_counter() - self._gc_started
        if took >= self.NAMED_S:
            kind = self._it_kinds.setdefault(f"gc{info.get('generation')}", [0, 0.0])
            kind[0] += 1
            kind[1] += took
        if took >= self.threshold_s:
            log.warning(
                "slow callback %.1f ms (CPU %.1f ms): garbage collection of generation %s (%s collected)",
                took * 1000,
                (time.thread_time() - self._gc_cpu) * 1000,
                info.get("generation"),
                info.get("collected"),
            )

    @staticmethod
    def describe(handle: asyncio.Handle) -> str:
        callback = getattr(handle, "_callback", None)
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, asyncio.Task):
            coro = owner.get_coro()
            where = ""
            # Where the step ended: the innermost coroutine it awaits (a hint of what it did).
            inner, depth = coro, 0
            while (
                depth < 20
                and getattr(inner, "cr_await", None) is not None
                and hasattr(inner.cr_await, "cr_frame")
            ):
                inner, depth = inner.cr_await, depth + 1
            frame = getattr(inner, "cr_frame", None)
            if frame is not None:
                where = f" at {frame.f_code.co_filename}:{frame.f_lineno}"
                if inner is not coro:
                    where = f" in {getattr(inner, '__qualname__', inner)}{where}"
            return f"task {getattr(coro, '__qualname__', coro)}{where}"
        protocol = getattr(owner, "_protocol", None)
        if protocol is not None:
            app = getattr(protocol, "_app_protocol", None)
            state = getattr(protocol, "_state", None)
            name = getattr(callback, "__qualname__", repr(callback))
            if app is not None:
                return f"{name} TLS {getattr(state, 'name', state)} -> {type(app).__name__}"
            return f"{name} -> {type(protocol).__name__}"
        return repr(handle)

    @staticmethod
    def kind(handle: asyncio.Handle) -> str:
        """A short name of what `handle` ran, for the iteration summary (a task's coroutine,
        a transport's method and protocol, or the function)."""
        callback = getattr(handle, "_callback", None)
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, asyncio.Task):
            coro = owner.get_coro()
            return f"task {getattr(coro, '__qualname__', type(coro).__name__)}"
        protocol = getattr(owner, "_protocol", None)
        name = getattr(callback, "__qualname__", type(callback).__name__)
        if protocol is not None:
            app = getattr(protocol, "_app_protocol", None)
            return f"{name} -> {type(app if app is not None else protocol).__name__}"
        return name

    def install(self) -> None:
        if self._original is not None:
            return
        original = self._original = asyncio.events.Handle._run
        probe = self

        def _run(handle: asyncio.Handle) -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                original(handle)
            finally:
                took = time.perf_counter() - wall
                probe._it_callbacks += 1
                if took >= probe.NAMED_S:
                    kind = probe._it_kinds.setdefault(probe.kind(handle), [0, 0.0])
                    kind[0] += 1
                    kind[1] += took
                if took >= probe.threshold_s:
                    probe.slow += 1
                    log.warning(
                        "slow callback %.1f ms (CPU %.1f ms): %s",
                        took * 1000,
                        (time.thread_time() - cpu) * 1000,
                        probe.describe(handle),
                    )

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        gc.callbacks.append(self._on_gc)
        with contextlib.suppress(RuntimeError):
            self._watch_iterations(asyncio.get_running_loop())

    def _watch_iterations(self, loop: asyncio.AbstractEventLoop) -> None:
        selector = getattr(loop, "_selector", None)
        run_once = getattr(loop, "_run_once", None)
        if selector is None or run_once is None:
            return  # not a selector loop
        select = selector.select
        # cap_io_events's select is the selector's own attribute: put back on uninstall, not removed.
        self._own_select = vars(selector).get("select")
        probe = self

        with contextlib.suppress(OSError):
            # Opened here, in the loop's thread: "thread-self" is the thread that opens it.
            self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)

        def timed_select(timeout: float | None = None) -> list[Any]:
            events = select(timeout)
            probe._it_wall = time.perf_counter()
            probe._it_cpu = time.thread_time()
            probe._it_process = time.process_time()
            probe._it_usage = _thread_usage()
            probe._it_runqueue = probe._runqueue_ns()
            probe._it_events = len(events)
            probe._it_callbacks = 0
            probe._it_kinds = {}
            return events

        def timed_run_once() -> None:
            run_once()
            took = time.perf_counter() - probe._it_wall
            if took < probe.threshold_s:
                return
            probe.slow_iterations += 1
            # Taken away first: a collection while this summary allocates runs _on_gc, which
            # would otherwise add to the dict being sorted (RuntimeError in the loop itself).
            it_kinds, probe._it_kinds = probe._it_kinds, {}
            cpu = time.thread_time() - probe._it_cpu
            # Clamped: the two clocks are read one after the other, a few microseconds apart.
            others = max(0.0, time.process_time() - probe._it_process - cpu)
            usage, before = _thread_usage(), probe._it_usage
            now, then = probe._runqueue_ns(), probe._it_runqueue
            runqueue = math.nan if now is None or then is None else (now - then) / 1e6
            kinds = sorted(it_kinds.items(), key=lambda kv: -kv[1][1])
            named = sum(n for kind, (n, _s) in kinds if not kind.startswith("gc"))
            log.warning(
                "slow iteration %.1f ms (CPU %.1f ms, waiting for a CPU %.1f ms, other threads'"
                " CPU %.1f ms, %d voluntary and %d involuntary switches, %d page faults):"
                " %d callbacks, %d I/O events; %s",
                took * 1000,
                cpu * 1000,
                runqueue,
                others * 1000,
                usage.ru_nvcsw - before.ru_nvcsw,
                usage.ru_nivcsw - before.ru_nivcsw,
                usage.ru_minflt - before.ru_minflt + usage.ru_majflt - before.ru_majflt,
                probe._it_callbacks,
                probe._it_events,
                "; ".join(f"{int(n)}x {s * 1000:.1f} ms {kind}" for kind, (n, s) in kinds[:4])
                + (f"; {probe._it_callbacks - int(named)} shorter than {probe.NAMED_S * 1000:g} ms"),
            )

        selector.select = timed_select  # type: ignore[method-assign]
        loop._run_once = timed_run_once  # type: ignore[attr-defined]
        self._loop = loop

    def uninstall(self) -> None:
        if self._original is not None:
            asyncio.events.Handle._run = self._original  # type: ignore[method-assign]
            self._original = None
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._on_gc)
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None
        if self._loop is not None:
            # The instance attributes hid the class's methods: removing them restores those
            # (or the select cap_io_events installed, when there was one).
            selector = self._loop._selector  # type: ignore[attr-defined]
            if self._own_select is not None:
                selector.select = self._own_select
            else:
                with contextlib.suppress(AttributeError):
                    del selector.select
            self._own_select = None
            with contextlib.suppress(AttributeError):
                del self._loop._run_once  # type: ignore[attr-defined]
            self._loop = None


def handler_kwargs(settings: Any, access_log_class: type) -> dict[str, Any]:
    """What every connection's RequestHandler is built with."""
    return {
        "access_log_class": access_log_class,
        # The one timer aiohttp has for a connection waiting on a request: see the docstring.
        "keepalive_timeout": settings.header_timeout_seconds,
        # aiohttp rounds a timer of more than 5 s up to the loop's next whole second, so that
        # timers fire together: every WebSocket's heartbeat (20 s) that falls due within a second
        # fired in one iteration (100 pings at once at 2,000 sockets, 1,000 at 20,000: 40-60 ms
        # with the loop held). At their own time they are spread over the second.
        "timeout_ceil_threshold": TIMER_CEIL_THRESHOLD_S,
    }


async def serve(
    app: web.Application,
    settings: Any,
    *,
    ssl_context: Any = None,
    access_log_class: type,
    shutdown_timeout: float = 5.0,
) -> None:
    """Run ``app`` until SIGINT or SIGTERM, like ``web.run_app`` but with the edge limits."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLimiter(settings.accept_error_log_interval_seconds))
    soft, _hard = raise_fd_limit()
    # Before the probe: the probe times whatever select this installs.
    cap_io_events(loop)
    probe = None
    if os.environ.get("CONSULT_SLOW_CALLBACK_MS"):
        probe = SlowCallbackProbe(float(os.environ["CONSULT_SLOW_CALLBACK_MS"]) / 1000)
        probe.install()
    if ssl_context is not None:
        share_tls_read_buffer(loop)
        trim_tls_connections()
        pace_tls_handshakes(loop)
    limiter = ConnectionLimiter(
        settings.max_connections_per_address, proxy.parse_networks(settings.trusted_proxies)
    )
    kwargs = handler_kwargs(settings, access_log_class)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout, **kwargs)
    await runner.setup()
    server = runner.server
    assert server is not None
    # The translation catalogues are parsed on first use (Babel reads every .po file: ~30 ms of
    # CPU for Chinese), which was the first patient's hello, holding every call's signaling while
    # a clinic's phones connected: read them now, before the first connection.
    for locale in i18n.LOCALES:
        i18n.catalogue(locale)
    # What start-up loaded (modules, templates, catalogues, settings) lives as long as the process:
    # moved out of the collector's way, a full collection scans only what calls and requests made.
    gc.freeze()
    freezer = GcFreezer()
    freezer.install(loop)

    def protocol() -> EdgeRequestHandler:
        return EdgeRequestHandler(server, loop=loop, limiter=limiter, **kwargs)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    listener = None
    try:
        listener = await loop.create_server(
            protocol,
            host=settings.host,
            port=settings.port,
            ssl=ssl_context,
            ssl_handshake_timeout=settings.header_timeout_seconds if ssl_context else None,
            # asyncio accepts up to `backlog` connections per iteration: a small batch here,
            # then the kernel's queue is set to BACKLOG below.
            backlog=ACCEPTS_PER_TICK,
            reuse_address=True,
        )
        for sock in listener.sockets:
            with socket.socket(fileno=os.dup(sock.fileno())) as same:
                same.listen(BACKLOG)
        log.info(
            "listening on %s:%s; header timeout %g s, %s connections per address, %d file descriptors",
            settings.host,
            settings.port,
            settings.header_timeout_seconds,
            settings.max_connections_per_address or "unlimited",
            soft,
        )
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if listener is not None:
            listener.close()
        await runner.cleanup()
        freezer.uninstall()
        unpace_tls_handshakes(loop)
        if probe is not None:
            probe.uninstall()
        uncap_io_events(loop)
