"""A Python client for the signaling protocol, for tests, benchmarks and probes.

`SignalingClient` speaks docs/protocol.md over an aiohttp WebSocket. `PeerSession` runs a real
aiortc RTCPeerConnection over it (impolite side offers, trickled candidates, end-of-candidates)
and counts the video frames it receives, so a test can assert that media actually flowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
from aiortc import (
    RTCConfiguration,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.contrib.media import MediaStreamError
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.sdp import candidate_from_sdp

log = logging.getLogger(__name__)


class ConnectionClosed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"signaling connection closed (code {code})")
        self.code = code


class SignalingClient:
    """One participant's signaling socket.

    Messages not yet asked for are buffered, so `next_message(type="clock")` does not lose a
    `peer_joined` that arrived first.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._buffer: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] | None = None

    @classmethod
    async def connect(
        cls,
        session: aiohttp.ClientSession,
        url: str,
        *,
        origin: str | None = None,
        **kwargs: Any,
    ) -> SignalingClient:
        headers = {"Origin": origin} if origin else {}
        ws = await session.ws_connect(url, headers=headers, autoping=True, **kwargs)
        return cls(ws)

    async def hello(
        self,
        token: str,
        *,
        version: int = 1,
        timeout_s: float = 5,
        join: bool = True,
        instance: str | None = None,
    ) -> dict[str, Any]:
        """Send hello and return the welcome (raises ErrorReply on an error frame).

        A guest then sends `join` at once unless `join=False`: this client has no pre-call
        check, so it is in the call as soon as it is admitted (docs/protocol.md)."""
        hello: dict[str, Any] = {"type": "hello", "version": version, "token": token}
        if instance is not None:
            hello["instance"] = instance
        await self.send(hello)
        message = await self.next_message(timeout=timeout_s)
        if message["type"] != "welcome":
            raise ErrorReply(message)
        self.welcome = message
        if join and message.get("role") == "guest":
            await self.send({"type": "join"})
        return message

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def next_message(
        self,
        type: str | None = None,
        timeout: float = 5,  # noqa: ASYNC109 - the documented test-client API
    ) -> dict[str, Any]:
        """The next message (of `type`, if given); raises TimeoutError or ConnectionClosed."""
        for i, message in enumerate(self._buffer):
            if type is None or message["type"] == type:
                return self._buffer.pop(i)
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise ConnectionClosed(self.ws.close_code)
                message = json.loads(msg.data)
                if type is None or message["type"] == type:
                    return message
                self._buffer.append(message)

    def buffered(self) -> list[dict[str, Any]]:
        return list(self._buffer)

    async def wait_closed(self, timeout_s: float = 5) -> int | None:
        """Read (and buffer) until the server closes; return the close code."""
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._buffer.append(json.loads(msg.data))
                    continue
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                    continue
                return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


class ErrorReply(Exception):
    """The server answered with something other than what was expected (usually an error)."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(f"unexpected reply: {message}")
        self.message = message
        self.code = message.get("code")


def rtc_configuration(welcome: dict[str, Any]) -> RTCConfiguration:
    """The RTCConfiguration the server asked for. Always explicit: aiortc's default would
    contact a public STUN server."""
    servers = [
        RTCIceServer(
            urls=server["urls"],
            username=server.get("username"),
            credential=server.get("credential"),
        )
        for server in welcome["ice_servers"]
    ]
    policy = (
        RTCIceTransportPolicy.RELAY
        if welcome["ice_transport_policy"] == "relay"
        else RTCIceTransportPolicy.ALL
    )
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


class PeerSession:
    """A real RTCPeerConnection negotiated over a `SignalingClient`.

    Perfect negotiation, reduced to what aiortc supports: the impolite side (the host) makes
    every offer; the polite side answers. aiortc has no rollback, so the polite side never
    offers and glare cannot happen. aiortc puts all its candidates in the SDP; it still sends
    end-of-candidates so a browser peer stops waiting, and accepts trickled remote candidates.
    """

    def __init__(self, client: SignalingClient) -> None:
        assert client.welcome is not None, "call hello() first"
        self.client = client
        self.polite: bool = client.welcome["polite"]
        self.pc = RTCPeerConnection(rtc_configuration(client.welcome))
        self.pc.addTrack(VideoStreamTrack())
        self.frames_received = 0
        self.connected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    def _on_track(self, track: Any) -> None:
        if track.kind == "video":
            task = asyncio.get_running_loop().create_task(self._count(track))
            self._tasks.add(task)

    async def _count(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames_received += 1

    async def start(self) -> None:
        """Make the offer if this side is impolite; call once both parties are present."""
        if not self.polite:
            await self.pc.setLocalDescription(await self.pc.createOffer())
            await self._send_description()

    async def _send_description(self) -> None:
        description = self.pc.localDescription
        await self.client.send(
            {
                "type": "signal",
                "data": {"description": {"type": description.type, "sdp": description.sdp}},
            }
        )
        await self.client.send({"type": "signal", "data": {"candidate": None}})

    async def handle_signal(self, data: dict[str, Any]) -> None:
        description = data.get("description")
        if description is not None:
            offer = description["type"] == "offer"
            if offer and not self.polite:
                return  # glare: the impolite side ignores the other offer
            await self.pc.setRemoteDescription(
                RTCSessionDescription(sdp=description["sdp"], type=description["type"])
            )
            if offer:
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self._send_description()
        elif "candidate" in data:
            await self.pc.addIceCandidate(parse_candidate(data["candidate"]))

    async def run(self, until_frames: int, timeout_s: float) -> None:
        """Pump signaling messages until `until_frames` video frames have arrived."""
        async with asyncio.timeout(timeout_s):
            while self.frames_received < until_frames:
                try:
                    message = await self.client.next_message(type="signal", timeout=0.2)
                except TimeoutError:
                    continue
                await self.handle_signal(message["data"])

    async def close(self) -> None:
        for sender in self.pc.getSenders():
            if sender.track is not None:
                sender.track.stop()
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)


def parse_candidate(candidate: dict[str, Any] | None) -> RTCIceCandidate | None:
    """RTCIceCandidateInit JSON (as a browser sends it) to aiortc; None = end-of-candidates."""
    if candidate is None or not candidate.get("candidate"):
        return None
    line = candidate["candidate"]
    if line.startswith("candidate:"):
        line = line[len("candidate:") :]
    parsed = candidate_from_sdp(line)
    parsed.sdpMid = candidate.get("sdpMid")
    parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
    return parsed
