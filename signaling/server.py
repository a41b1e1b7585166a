"""The aiohttp side: origin check, WebSocket upgrade, hello handshake, room registry.

`SignalingServer.setup(app)` is the only thing an application calls; everything it needs to
know about tokens and persistence comes from the `RoomPolicy` it passes in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import WSMessage, WSMsgType, web

from signaling.config import SignalingConfig
from signaling.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_PROTOCOL,
    CLOSE_REFUSED,
    Connection,
    RateLimiter,
    SendWatchdog,
    TeardownPacer,
)
from signaling.events import EventDispatcher
from signaling.policy import ROLES, PeerInfo, Refused, RoomEvent, RoomPolicy
from signaling.protocol import PROTOCOL_VERSION, ProtocolError, parse, too_large
from signaling.room import RecordingDir, Room
from signaling.seats import SeatRegistry

if TYPE_CHECKING:
    from signaling.recording.pool import RecordingPool

log = logging.getLogger(__name__)

# What ends reading a socket (as it ends ``async for msg in ws``).
_SOCKET_ENDS = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _origin_key(scheme: str, netloc: str) -> str:
    host, _, port = netloc.lower().rpartition(":") if ":" in netloc else (netloc.lower(), "", "")
    if not port or port == _DEFAULT_PORTS.get(scheme):
        return host
    return f"{host}:{port}"


class SignalingServer:
    def __init__(
        self,
        policy: RoomPolicy,
        config: SignalingConfig | None = None,
        clock: Callable[[], float] = time.time,
        *,
        recording_dir: RecordingDir | None = None,
        recording_pool: RecordingPool | None = None,
    ) -> None:
        """`recording_dir(room_id)` gives the directory of a room's recordings (the application
        creates it, private); without it, this server refuses every record_offer.
        `recording_pool`: recording legs run in its worker processes (signaling.recording.pool);
        without it, in this process."""
        self.policy = policy
        self.recording_dir = recording_dir
        self.recording_pool = recording_pool
        self.config = config or SignalingConfig()
        self.clock = clock
        self.rooms: dict[str, Room] = {}
        self.connections: set[Connection] = set()
        # Rate limits, telemetry throttles and error counts per seat, across reconnects.
        self.seats = SeatRegistry(self.config)
        self.events = EventDispatcher(policy, over_budget=self._over_budget)
        self.watchdog = SendWatchdog(interval_s=min(1.0, self.config.send_timeout_s / 4))
        self.teardowns = TeardownPacer(self.config.teardowns_per_tick)
        self._opening: dict[str, asyncio.Task[Room]] = {}
        # aiohttp would close an over-long frame with 1009 itself; reading up to a larger
        # limit lets us answer a merely too-long message with an error frame instead.
        self._read_limit = max(4 * self.config.max_message_bytes, 64 * 1024)

    # ----- wiring ----------------------------------------------------------------------------

    def setup(self, app: web.Application, path: str = "/ws/rooms/{room_id}") -> None:
        app.router.add_get(path, self.handle, name="signaling")
        app.cleanup_ctx.append(self._lifecycle)
        app.on_shutdown.append(self._on_shutdown)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        yield
        await self.aclose()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Sockets first (GOING_AWAY tells clients to reconnect later, not that the visit is
        # over), then timers; the visit clock is persisted and resumes after a restart.
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, "server shutdown")
        for room in list(self.rooms.values()):
            await room.shutdown()
        if self.connections:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in self.connections])

    async def aclose(self) -> None:
        """Stop everything this server started (idempotent)."""
        await self._on_shutdown(web.Application())
        for task in list(self._opening.values()):
            task.cancel()
        self.rooms.clear()
        await self.watchdog.aclose()
        await self.events.aclose()

    def emit(self, event: RoomEvent) -> None:
        self.events.emit(event)

    def _over_budget(self, event: RoomEvent) -> None:
        room = self.rooms.get(event.room_id)
        if room is not None:
            room.over_budget(event.role)
        else:
            self.seats.get(event.room_id, event.role).muted = True

    # ----- origin ----------------------------------------------------------------------------

    def origin_allowed(self, request: web.BaseRequest) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            # Browsers always send Origin on a WebSocket upgrade; its absence means a
            # non-browser client, which cross-site request forgery cannot drive. The token
            # still has to be valid.
            return True
        if self.config.allowed_origins:
            return origin in self.config.allowed_origins
        parts = urlsplit(origin)
        if not parts.scheme or not parts.netloc:
            return False  # includes the literal "null" of sandboxed frames
        return _origin_key(parts.scheme, parts.netloc) == _origin_key(request.scheme, request.host)

    # ----- rooms -----------------------------------------------------------------------------

    async def get_room(self, room_id: str) -> Room:
        """The live room, or a new one loaded from the policy's persisted state.

        Concurrent first joins share one load (one Room per id). An ended room is returned
        but not registered, so that stale links cost a state lookup, not memory.
        """
        while True:
            room = self.rooms.get(room_id)
            if room is not None:
                return room
            task = self._opening.get(room_id)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._open_room(room_id))
                self._opening[room_id] = task
                task.add_done_callback(lambda _t: self._opening.pop(room_id, None))
                return await asyncio.shield(task)
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is None:
                return task.result()

    async def _open_room(self, room_id: str) -> Room:
        room = Room(
            room_id,
            policy=self.policy,
            config=self.config,
            emit=self.emit,
            clock=self.clock,
            on_idle=self._forget_room,
            recording_dir=self.recording_dir,
            recording_pool=self.recording_pool,
            delivered=self.events.delivered,
            seats=self.seats,
        )
        await room.load()
        if not room.ended:
            self.rooms[room_id] = room
            self.emit(RoomEvent("room_opened", room_id, None, self.clock(), {}))
        return room

    def live_rooms(self) -> frozenset[str]:
        """Ids of the rooms this process holds or is opening: their own timers end them."""
        return frozenset(self.live_room_ids())

    def live_room_ids(self) -> list[str]:
        """The same ids as a list (a copy, a room may appear twice), for a caller that walks them
        in turns on the event loop: hashing 10,000 ids into a set is a stall of its own."""
        return [*self.rooms, *self._opening]

    def _forget_room(self, room: Room) -> None:
        if self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]

    # ----- one connection --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self.origin_allowed(request):
            raise web.HTTPForbidden(text="Origin not allowed")
        room_id = request.match_info["room_id"]
        config = self.config
        ws = web.WebSocketResponse(
            heartbeat=config.heartbeat_s,
            max_msg_size=self._read_limit,
            timeout=config.send_timeout_s,
            # permessage-deflate keeps zlib state per socket (hundreds of KiB); signaling
            # messages are small and rare, so memory matters more than bytes.
            compress=False,
        )
        await ws.prepare(request)
        conn = Connection(
            ws,
            request,
            send_timeout_s=config.send_timeout_s,
            queue_max=config.send_queue_max,
            rate_limiter=RateLimiter(config.rate_limit_per_s, config.rate_limit_burst),
            watchdog=self.watchdog,
        )
        self.connections.add(conn)
        try:
            room = await self._handshake(request, room_id, conn)
            if room is not None:
                # From here on the seat's bucket, shared by its connections: reconnecting
                # does not refill it.
                conn.limiter = self.seats.get(room_id, conn.role).limiter
                await self._read_loop(conn, room)
        finally:
            try:
                # When many sockets close at once, their teardowns (leaving the room, its events,
                # aiohttp's end of the response) take turns: see TeardownPacer.
                await self.teardowns.turn()
            finally:
                if conn.room is not None:
                    await conn.room.leave(conn, "disconnected")
                await conn.wait_closed()
                # Counted open (consult_websocket_connections) until its teardown is done.
                self.connections.discard(conn)
        return ws

    def _reject(self, conn: Connection, code: str, message: str, close_code: int) -> None:
        conn.send({"type": "error", "code": code, "message": message})
        conn.close(close_code, code)

    async def _handshake(self, request: web.Request, room_id: str, conn: Connection) -> Room | None:
        try:
            async with asyncio.timeout(self.config.hello_timeout_s):
                hello = await self._read_hello(conn)
        except TimeoutError:
            self._reject(conn, "hello_timeout", "No hello received in time.", CLOSE_PROTOCOL)
            return None
        if hello is None:
            return None
        peer = PeerInfo(remote=request.remote, user_agent=request.headers.get("User-Agent"))
        try:
            admission = await self.policy.admit(room_id, hello["token"], peer)
        except Refused as refused:
            self._reject(conn, refused.code, refused.message, CLOSE_REFUSED)
            seat = self.seats.get(room_id, None)
            data = seat.take_error(refused.code, self.config.error_events_per_code)
            if data is not None and not seat.muted:
                self.emit(RoomEvent("error", room_id, None, self.clock(), data))
            return None
        if admission.room_id != room_id or admission.role not in ROLES:
            # A policy bug must not let a token into another room or invent a third role.
            self._reject(conn, "invalid_role", "This link cannot join this room.", CLOSE_REFUSED)
            return None
        conn.instance = hello.get("instance")
        while True:
            room = await self.get_room(room_id)
            result = await room.join(conn, admission)
            if result == "joined":
                return room
            if result == "refused":
                return None
            # "gone": the room emptied and left the registry between lookup and join.

    async def _read_hello(self, conn: Connection) -> dict[str, Any] | None:
        """Read until a valid hello; answer recoverable errors, give up on fatal ones."""
        while True:
            msg = await conn.ws.receive()
            if msg.type is not WSMsgType.TEXT:
                if msg.type is WSMsgType.BINARY:
                    self._reject(conn, "binary", "Binary frames are not supported.", CLOSE_PROTOCOL)
                return None
            try:
                if too_large(msg.data, self.config.max_message_bytes):
                    raise ProtocolError("too_large", "The message is too large.")
                message = parse(msg.data)
            except ProtocolError as exc:
                self._reject(conn, exc.code, exc.message, CLOSE_PROTOCOL)
                return None
            if message["type"] != "hello":
                self._reject(conn, "hello_required", "The first message must be hello.", CLOSE_PROTOCOL)
                return None
            if message["version"] != PROTOCOL_VERSION:
                self._reject(
                    conn,
                    "unsupported_version",
                    f"This server speaks protocol version {PROTOCOL_VERSION}.",
                    CLOSE_PROTOCOL,
                )
                return None
            return message

    async def _read_loop(self, conn: Connection, room: Room) -> None:
        """Each message to its room until the socket closes (as ``async for`` over it would).

        Nothing of one message is held while the next is awaited. A connection in a call waits a
        second or more between messages, so whatever its frame held then (the frame, the parsed
        message, the ``async for`` step) outlived the collector's young passes and was scanned
        again by its middle ones: with 2,000 participants relaying, ~7,300 objects every 0.36 s,
        3-5 ms passes that made the relay's slowest messages (bench/signaling.py).
        """
        receive = conn.ws.receive
        limited = False  # one rate_limited error per burst, not one per dropped message
        while True:
            msg = await receive()
            if msg.type in _SOCKET_ENDS:
                return
            limited = await self._handle_frame(conn, room, msg, limited)
            del msg

    async def _handle_frame(self, conn: Connection, room: Room, msg: WSMessage, limited: bool) -> bool:
        """One frame read in a call; returns whether the connection is now being rate-limited."""
        if conn.closing:
            return limited  # replaced, ended or left: drain until the close completes
        if not conn.limiter.allow():
            if not limited:
                self._send_error(conn, room, "rate_limited", "Too many messages; slow down.")
            return True
        if msg.type is WSMsgType.BINARY:
            self._send_error(conn, room, "binary", "Binary frames are not supported.")
            return False
        if msg.type is not WSMsgType.TEXT:
            return False
        max_bytes = self.config.max_message_bytes
        try:
            if too_large(msg.data, max_bytes):
                raise ProtocolError("too_large", f"Messages are limited to {max_bytes} bytes.")
            message = parse(msg.data)
        except ProtocolError as exc:
            self._send_error(conn, room, exc.code, exc.message)
            return False
        try:
            await room.handle(conn, message)
        except Exception:
            # A bug handling one message must not take the room (or the peer) down.
            log.exception("room %s failed to handle %s", room.room_id, message["type"])
            self._send_error(conn, room, "internal", "The server could not handle that.")
        return False

    def _send_error(self, conn: Connection, room: Room, code: str, message: str) -> None:
        conn.send({"type": "error", "code": code, "message": message})
        room.record_error(conn, code)
