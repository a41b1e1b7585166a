"""One client connection: a single writer with a deadline, and a rate limiter.

Rooms never await a client's socket. They enqueue; this connection's writer task drains the
queue. A client whose queue overflows or whose socket does not accept a message within
`send_timeout_s` is dropped, so one slow phone cannot stall the other party or the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from signaling.policy import Admission

log = logging.getLogger(__name__)

# Close codes (documented in docs/protocol.md).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_ENDED: Final = 4000
CLOSE_REPLACED: Final = 4001
CLOSE_PROTOCOL: Final = 4002
CLOSE_REFUSED: Final = 4003

_CLOSE: Final = object()  # queue sentinel: close after everything queued before it


class RateLimiter:
    """Token bucket: `burst` messages at once, refilled at `rate` per second."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class SendWatchdog:
    """Enforces the send deadline of every connection with one periodic check.

    A timeout per message (asyncio.timeout) would put a TimerHandle in the event loop's heap
    for every relayed message; with thousands of sockets those linger there, get promoted to
    the oldest GC generation and trigger full collections of several hundred milliseconds.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._writing: set[Connection] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, conn: Connection) -> None:
        self._writing.add(conn)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def unwatch(self, conn: Connection) -> None:
        self._writing.discard(conn)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._writing:
                await asyncio.sleep(self.interval_s)
                now = loop.time()
                for conn in list(self._writing):
                    deadline = conn.send_deadline
                    if deadline is not None and now > deadline:
                        log.warning("dropping %s: send timed out", conn.remote)
                        self._writing.discard(conn)
                        conn.abort()
        finally:
            self._task = None

    async def aclose(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait({task})


class TeardownPacer:
    """Lets at most `per_tick` connections finish their teardown per event-loop iteration.

    asyncio runs every callback that is ready at the start of an iteration before it looks at
    timers or sockets again, so when a clinic's phones hang up together (or a proxy restarts)
    thousands of handlers would leave their rooms, record their events and finish their
    responses in one iteration: 2,000 of them held the loop, and every other call's relays and
    timers, for half a second. A handler awaits `turn()` before its teardown; beyond `per_tick`
    in one iteration the rest wait their turn in arrival order, with relays and timers running in
    between. When nothing is waiting, `turn()` returns at once (no extra loop round trip).
    With the loop's I/O events capped per iteration too (consult.ops.edge.cap_io_events), no
    iteration holds more than a bounded share of a burst.
    """

    def __init__(self, per_tick: int = 16) -> None:
        self.per_tick = max(1, per_tick)
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.done_this_tick = 0
        self.deferred = 0  # teardowns that waited a turn (for tests and diagnostics)
        self.most_in_a_tick = 0  # the most granted in one iteration (for tests)
        self._scheduled = False

    async def turn(self) -> None:
        if not self.waiting and self.done_this_tick < self.per_tick:
            self._grant(1)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        self.deferred += 1
        self._schedule()
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            # The handler was cancelled while it waited (aiohttp cancels the handler of a client
            # that went away when its server is told to, as its test server is): the teardown
            # in its `finally` still waits its turn, then the cancellation goes on. Cancelled
            # again, it gives up its place (_tick skips it).
            if not waiter.done():
                await waiter
            raise

    def _grant(self, n: int) -> None:
        self.done_this_tick += n
        self.most_in_a_tick = max(self.most_in_a_tick, self.done_this_tick)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        # Runs early in the next iteration (call_soon goes before what the selector reports).
        # The waiters released here resume in the iteration after, which is the one they are
        # counted against.
        self._scheduled = False
        self.done_this_tick = 0
        released = 0
        while self.waiting and released < self.per_tick:
            waiter = self.waiting.popleft()
            if waiter.done():
                continue  # its handler was cancelled meanwhile
            waiter.set_result(None)
            released += 1
        if released:
            self._grant(released)
        elif self.waiting:
            self._schedule()


class Seat(Protocol):
    """The room a connection was seated in, as far as the connection needs to know it.

    `signaling.room.Room` implements it; typing `Connection.room` with this protocol keeps this
    module below the room (the room imports the connection, never the other way round).
    """

    async def leave(self, conn: Connection, reason: str) -> None: ...


class Connection:
    """A client socket plus what the room needs to know about it.

    One lives as long as its socket, thousands at once: slotted (no instance dict), and its send
    queue exists only while something waits in it.
    """

    __slots__ = (
        "_close_reason",
        "_queue",
        "_queue_max",
        "_transport",
        "_watchdog",
        "_writer",
        "admission",
        "close_code",
        "closing",
        "instance",
        "limiter",
        "ready",
        "recording_told",
        "remote",
        "room",
        "send_deadline",
        "send_timeout_s",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.BaseRequest,
        *,
        send_timeout_s: float,
        queue_max: int,
        rate_limiter: RateLimiter,
        watchdog: SendWatchdog,
    ) -> None:
        self.ws = ws
        self._watchdog = watchdog
        # loop.time() by which the write in progress must have completed, else abort.
        self.send_deadline: float | None = None
        self._transport = request.transport
        self.remote = request.remote
        self.send_timeout_s = send_timeout_s
        self.limiter = rate_limiter
        # Set by the room on join; read by the server when the socket ends.
        self.room: Seat | None = None
        self.admission: Admission | None = None
        # A guest is ready once it sent `join` on this connection (its patient pressed Join):
        # before that the room relays no signal to or from it and the clock does not start.
        self.ready = False
        # The page instance this connection comes from (hello's `instance`): a new connection
        # of the same instance keeps its media; a new instance means a new peer connection.
        self.instance: str | None = None
        # Whether this connection was told `recording` (once per connection).
        self.recording_told = False
        self.closing = False
        self.close_code: int | None = None
        self._close_reason = ""
        self._queue_max = queue_max
        # Made on the first message that cannot be written at once, dropped when drained (an
        # empty deque is 760 bytes; most connections never need one).
        self._queue: deque[object] | None = None
        # The writer task exists only while there is something to write: an idle connection
        # then costs no task, and with 10,000 sockets fewer live objects means shorter
        # garbage-collector pauses.
        self._writer: asyncio.Task[None] | None = None

    @property
    def role(self) -> str | None:
        return self.admission.role if self.admission is not None else None

    def send(self, message: dict[str, Any]) -> bool:
        """Queue one message. Never blocks; drops the client if it is too far behind."""
        if self.closing:
            return False
        is_closing = getattr(self._transport, "is_closing", None)
        if is_closing is not None and is_closing():
            # The socket is going (the client hung up, or it was aborted): nothing can reach it,
            # so no encoding and no writer task (when a clinic hangs up at once, each leaving
            # participant would otherwise write `peer_away` to the other, leaving too).
            return False
        queue = self._queue
        if queue is not None and len(queue) >= self._queue_max:
            log.warning("dropping %s: send queue full", self.remote)
            self.abort()
            return False
        text = json.dumps(message, separators=(",", ":"))
        if self._writer is None and not queue and self._send_now(text):
            return True
        self._enqueue(text)
        self._wake_writer()
        return True

    def _send_now(self, text: str) -> bool:
        """Write `text` at once when nothing is waiting to go out (the common case: one relayed
        message every few seconds): no writer task, no watchdog entry, no loop round trip. With
        an empty transport buffer aiohttp's send never waits (it waits only while the transport
        is paused, which needs a full buffer), so the coroutine finishes in its first step.
        False: not written, queue it."""
        transport = self._transport
        buffered = getattr(transport, "get_write_buffer_size", None)
        if buffered is None or transport.is_closing() or buffered():  # type: ignore[union-attr]
            return False
        step = self.ws.send_str(text)
        try:
            step.send(None)
        except StopIteration:
            return True
        except Exception as exc:  # the socket died under us; the reader will notice too
            log.debug("send to %s failed: %r", self.remote, exc)
            self.closing = True
            return True
        # It waited after all (the transport paused: aiohttp writes the frame, then waits for
        # the buffer to drain): the frame is out; the next send finds the buffer full and queues.
        step.close()
        return True

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close after the messages already queued have been sent. Idempotent."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self._close_reason = reason
        self._enqueue(_CLOSE)
        self._wake_writer()

    def _enqueue(self, item: object) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(item)

    def abort(self) -> None:
        """Cut the TCP connection now; the reader loop then ends on its own."""
        self.closing = True
        self._queue = None
        if self._transport is not None:
            self._transport.abort()
        if self._writer is not None:
            self._writer.cancel()

    async def wait_closed(self) -> None:
        """Wait for the writer to finish (flush + close handshake, bounded by timeouts)."""
        if not self.closing:
            if self._writer is None and self.ws.closed:
                # The close handshake is already done (the client closed; aiohttp answered):
                # nothing left to send, so no writer task (a client hanging up costs one less
                # task, which adds up when a clinic's sockets all close at once).
                self.closing = True
                self._queue = None
                return
            self.close(CLOSE_NORMAL)
        if self._writer is not None:
            await asyncio.wait({self._writer})

    def _wake_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog.watch(self)
        try:
            while self._queue:
                item = self._queue.popleft()
                if not self._queue:
                    self._queue = None
                if item is _CLOSE:
                    # close() also waits for the client's close frame, up to the response's
                    # own timeout (send_timeout_s); the deadline covers sending ours.
                    self.send_deadline = loop.time() + 2 * self.send_timeout_s
                    await self.ws.close(
                        code=self.close_code or CLOSE_NORMAL,
                        message=self._close_reason.encode()[:120],
                    )
                    return
                assert isinstance(item, str)
                self.send_deadline = loop.time() + self.send_timeout_s
                await self.ws.send_str(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket died under us; the reader will notice too
            log.debug("writer for %s stopped: %r", self.remote, exc)
            self.closing = True
            self._queue = None
        finally:
            self.send_deadline = None
            self._watchdog.unwatch(self)
            if self._writer is asyncio.current_task():
                self._writer = None
