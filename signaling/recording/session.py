"""A visit's recorder: one receive-only aiortc leg per participant, each written to its file.

Each participant's browser opens a second, send-only RTCPeerConnection to the server (see
docs/recording.md); the call itself stays peer to peer. The server answers with recvonly
transceivers and never decodes: encoded frames go from aiortc's jitter buffer straight to
the participant's `ParticipantWriter` (see passthrough.py), and a task of the session hands
the queued frames to a worker thread for muxing every `DRAIN_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import sys
import termios
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.sdp import SessionDescription, candidate_from_sdp

from signaling.recording import passthrough
from signaling.recording.errors import RecordingError, check_offer
from signaling.recording.writer import ParticipantWriter, RecordingFile

log = logging.getLogger(__name__)

# VP8 first: every browser sends it and WebM holds it; H.264 only if VP8 is not offered.
VIDEO_CODECS = ("video/VP8", "video/H264", "video/rtx")
AUDIO_CODECS = ("audio/opus",)
_CODEC_NAMES = {"vp8": "vp8", "h264": "h264"}
# How often queued frames are muxed (in a worker thread): one hand-off per session per tick
# instead of one per frame. Measured at 25 visits (docs/recording.md): every 0.1 s still
# stalled the event loop enough for the kernel to drop datagrams; every 0.5 s did not.
DRAIN_S = 0.5
# Receive buffer asked for each leg's UDP sockets: ~3 s of a 1.5 Mbit/s leg, so that a pause
# of the event loop (garbage collection, a burst of new legs) does not make the kernel drop
# media. The kernel caps it at net.core.rmem_max (docs/recording.md).
RCVBUF_BYTES = 1 << 20
# The REMB the recorder sends instead of aiortc's estimate (passthrough.skip_bandwidth_estimation):
# a ceiling above what a recording leg sends (the page caps it at 600 kbit/s), once a second.
REMB_BPS = 2_500_000
# Finishing a leg reads its sockets' backlog first (_read_to_end): for as long as the reading
# makes progress (packets handled within the last END_STALL_S), at most END_READ_S in all.
# A flat 10 s cut the last seconds of legs on a machine that gave the workers 15-30 % of a
# core: they were reading, only slowly.
END_STALL_S = 5.0
END_READ_S = 120.0
REMB_INTERVAL_S = 1.0


def _unread(sock: Any) -> int:
    """Size of the next datagram waiting in `sock` (0: none, or the socket is closed)."""
    fd = sock.fileno()
    if fd < 0:
        return 0
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def drain(writers: Iterable[ParticipantWriter]) -> None:
    """Mux what each writer queued (blocking: run it in a thread)."""
    for writer in writers:
        writer.drain()


def _ice_server(entry: RTCIceServer | Mapping[str, Any]) -> RTCIceServer:
    if isinstance(entry, RTCIceServer):
        return entry
    return RTCIceServer(
        urls=entry["urls"], username=entry.get("username"), credential=entry.get("credential")
    )


class _TrackSink:
    def __init__(self, writer: ParticipantWriter, kind: str) -> None:
        self.writer = writer
        self.kind = kind

    def on_frame(self, codec: RTCRtpCodecParameters, data: bytes, timestamp: int) -> None:
        self.writer.write(self.kind, codec.clockRate, data, timestamp)


@dataclass
class _Leg:
    role: str
    pc: RTCPeerConnection
    writer: ParticipantWriter
    video: RTCRtpReceiver | None = None
    receivers: list[RTCRtpReceiver] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    finished: asyncio.Future[RecordingFile | None] | None = None
    last_pli: float = 0.0
    plis: int = 0
    sockets: list[Any] = field(default_factory=list)
    # aioice's queues of datagrams read from the sockets, not yet handled (DTLS, SRTP, RTP).
    ice_queues: list[Any] = field(default_factory=list)


def _preferences(kind: str, names: Iterable[str]) -> list[Any]:
    capabilities = RTCRtpReceiver.getCapabilities(kind)
    assert capabilities is not None
    return [c for name in names for c in capabilities.codecs if c.mimeType.lower() == name.lower()]


def _in_offer_order(preferences: list[Any], sdp: str, kind: str) -> list[Any]:
    """`preferences` reordered as the offer lists their codecs: the browser's choice stands (a
    page that puts H.264 first is recorded in H.264, as it sends it on the call)."""
    try:
        media = next(m for m in SessionDescription.parse(sdp).media if m.kind == kind)
    except (StopIteration, ValueError, KeyError, IndexError):
        return preferences  # no such m-line, or unparsable: setRemoteDescription will say so
    order = [c.mimeType.lower() for c in media.rtp.codecs]

    def rank(codec: Any) -> int:
        name = codec.mimeType.lower()
        return order.index(name) if name in order else len(order)

    return sorted(preferences, key=rank)


class RecordingSession:
    """Records every participant of one visit room, each to their own file in `directory`.

    `ice_servers` is required on purpose: aiortc's default configuration would contact a
    public STUN server. Pass `[]` when the server's own addresses are reachable by clients.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        ice_servers: Iterable[RTCIceServer | Mapping[str, Any]],
        relay_only: bool = False,
        pli_interval_s: float = 5.0,
        video_wait_s: float = 3.0,
        label: str = "",
        drain: bool = True,
    ) -> None:
        """`drain=False`: the caller muxes the queued frames (`writers()`, every `DRAIN_S`), as a
        recording worker does for all its legs in one thread hand-off."""
        self.directory = Path(directory)
        self._drains = drain
        self.ice_servers = [_ice_server(s) for s in ice_servers]
        self.relay_only = relay_only
        self.pli_interval_s = pli_interval_s
        self.video_wait_s = video_wait_s
        self.label = label
        self.files: list[RecordingFile] = []
        self._legs: dict[str, _Leg] = {}
        # Legs that ended on their own (ICE failed) and are being finished in the background.
        self._finishing: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._lock = asyncio.Lock()
        self._drainer: asyncio.Task[None] | None = None

    # ----- public API ------------------------------------------------------------------------

    async def add_participant_offer(self, role: str, sdp: str) -> str:
        """Accept a participant's send-only offer; return the SDP answer.

        A new offer for a role that already has a leg (the phone reconnected) finishes the old
        leg's file first; the new leg writes a new file.
        """
        check_offer(role, sdp)
        async with self._lock:
            if self._closed:
                raise RecordingError("recording is closed")
            old = self._legs.pop(role, None)
            if old is not None:
                await self._finish(old)
            leg = self._new_leg(role)
            self._legs[role] = leg
            if self._drainer is None and self._drains:
                self._drainer = asyncio.get_running_loop().create_task(self._drain_forever())
            try:
                answer = await self._negotiate(leg, sdp)
            except Exception as exc:
                self._legs.pop(role, None)
                await self._finish(leg)
                raise RecordingError(f"unusable offer: {exc}") from exc
            return answer

    async def add_ice_candidate(self, role: str, candidate: Mapping[str, Any] | None) -> None:
        """A trickled browser candidate (`RTCIceCandidate.toJSON()`), or None at the end."""
        leg = self._legs.get(role)
        if leg is None:
            raise RecordingError("no recording leg for this role")
        if candidate is None or not candidate.get("candidate"):
            await leg.pc.addIceCandidate(None)
            return
        line = str(candidate["candidate"])
        parsed = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
        parsed.sdpMid = candidate.get("sdpMid")
        parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
        await leg.pc.addIceCandidate(parsed)

    async def close(self) -> list[RecordingFile]:
        """Finish every leg; return all files this session wrote (idempotent)."""
        async with self._lock:
            self._closed = True
            legs = list(self._legs.values())
            self._legs.clear()
        for leg in legs:
            await self._finish(leg)
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        return list(self.files)

    def status(self) -> dict[str, Any]:
        """Live counters per role (for logs and benchmarks)."""
        return {
            role: {
                "connection": leg.pc.connectionState,
                "plis": leg.plis,
                "tracks": {k: s.as_dict() for k, s in leg.writer.stats.items()},
            }
            for role, leg in self._legs.items()
        }

    def writers(self) -> list[ParticipantWriter]:
        """The writers of the live legs (whose queued frames `drain()` muxes)."""
        return [leg.writer for leg in self._legs.values()]

    async def _drain_forever(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_S)
            writers = self.writers()
            if writers:
                try:
                    await asyncio.to_thread(self._drain, writers)
                except Exception:
                    log.exception("recording %s: muxing failed", self.label)

    @staticmethod
    def _drain(writers: list[ParticipantWriter]) -> None:
        drain(writers)

    # ----- legs ------------------------------------------------------------------------------

    def _new_leg(self, role: str) -> _Leg:
        config = RTCConfiguration(
            iceServers=list(self.ice_servers),
            iceTransportPolicy=RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL,
        )
        pc = RTCPeerConnection(configuration=config)
        # The writer learns the negotiated video codec once the offer is applied.
        writer = ParticipantWriter(
            self.directory, role, audio=True, video_codec="vp8", video_wait_s=self.video_wait_s
        )
        return _Leg(role=role, pc=pc, writer=writer)

    async def _negotiate(self, leg: _Leg, sdp: str) -> str:
        pc = leg.pc
        audio = pc.addTransceiver("audio", direction="recvonly")
        audio.setCodecPreferences(_preferences("audio", AUDIO_CODECS))
        video = pc.addTransceiver("video", direction="recvonly")
        video.setCodecPreferences(_in_offer_order(_preferences("video", VIDEO_CODECS), sdp, "video"))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))

        leg.writer.expect_audio = self._receiving(audio)
        video_codec = self._negotiated_codec(video) if self._receiving(video) else None
        leg.writer.video_codec = video_codec
        leg.writer.stats["video"].codec = video_codec
        if not leg.writer.expect_audio and video_codec is None:
            raise RecordingError("the offer sends neither audio nor video")
        for transceiver, kind in ((audio, "audio"), (video, "video")):
            if not self._receiving(transceiver):
                continue
            receiver = transceiver.receiver
            passthrough.attach(receiver, _TrackSink(leg.writer, kind))
            if kind == "video":
                passthrough.skip_bandwidth_estimation(receiver)
            else:
                passthrough.audio_in_order(receiver)
            leg.receivers.append(receiver)
            passthrough.on_first_packet(receiver, lambda k=kind: leg.writer.note_first_packet(k))
        leg.video = video.receiver if video_codec else None

        @pc.on("connectionstatechange")
        def on_state() -> None:
            log.info("recording %s/%s: connection %s", self.label, leg.role, pc.connectionState)
            if pc.connectionState == "failed" and self._legs.get(leg.role) is leg:
                # No ICE restart in aiortc: the leg ends here; the browser may offer again.
                self._legs.pop(leg.role, None)
                task = asyncio.get_running_loop().create_task(self._finish(leg))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)

        await pc.setLocalDescription(await pc.createAnswer())
        leg.sockets, leg.ice_queues = self._enlarge_receive_buffers(pc)
        if leg.video is not None:
            self._spawn(leg, self._keyframes(leg))
        return pc.localDescription.sdp

    def _enlarge_receive_buffers(self, pc: RTCPeerConnection) -> tuple[list[Any], list[Any]]:
        """Enlarge the leg's UDP receive buffers; return its sockets and aioice's queues."""
        # Best effort through aioice internals: a smaller buffer is not an error.
        sockets: list[Any] = []
        queues: list[Any] = []
        for transceiver in pc.getTransceivers():
            try:
                connection = transceiver.receiver.transport.transport.iceGatherer._connection
                queue = getattr(connection, "_queue", None)
                if queue is not None and all(queue is not q for q in queues):
                    queues.append(queue)
                for protocol in connection._protocols:
                    sock = protocol.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
                    if sock not in sockets:
                        sockets.append(sock)
            except (AttributeError, OSError) as exc:
                log.warning("recording %s: could not enlarge a receive buffer: %s", self.label, exc)
        return sockets, queues

    async def _read_to_end(self, leg: _Leg) -> None:
        """Wait until the leg's sockets hold no unread datagram and aioice's queue between the
        sockets and the RTP receivers is empty (twice in a row, 50 ms apart).

        A server running behind real time (a burst of legs, a loaded machine) would otherwise
        close the sockets with the last seconds of media still in them, unrecorded. The
        browser closes its recording connection on `ended`, so the sockets go quiet soon; the
        wait lasts as long as the backlog is being read (packets handled within `END_STALL_S`),
        at most `END_READ_S`.
        """
        if not leg.sockets or leg.pc.connectionState in ("failed", "closed"):
            return
        started = time.monotonic()
        quiet = 0
        handled = self._packets_handled(leg)
        progress_at = started
        while True:
            try:
                unread = sum(_unread(s) for s in leg.sockets) + sum(q.qsize() for q in leg.ice_queues)
            except OSError:
                return
            quiet = quiet + 1 if unread == 0 else 0
            if quiet >= 2:  # twice in a row: what was queued has gone through the loop too
                break
            now = time.monotonic()
            count = self._packets_handled(leg)
            if count != handled:
                handled, progress_at = count, now
            if now - progress_at > END_STALL_S or now - started > END_READ_S:
                log.warning(
                    "recording %s/%s: sockets still not read after %.1f s (no packet handled for"
                    " %.1f s); the rest is not recorded",
                    self.label,
                    leg.role,
                    now - started,
                    now - progress_at,
                )
                return
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        if took > 1.0:
            log.info("recording %s/%s: read %.1f s of backlog before closing", self.label, leg.role, took)

    @staticmethod
    def _packets_handled(leg: _Leg) -> int:
        return sum(passthrough.receive_counts(r)[0] for r in leg.receivers)

    @staticmethod
    def _receiving(transceiver: RTCRtpTransceiver) -> bool:
        # The offer's direction for this m-line, seen from the server (private in aiortc).
        offered = getattr(transceiver, "_offerDirection", None)
        return transceiver.mid is not None and offered in ("recvonly", "sendrecv")

    @staticmethod
    def _negotiated_codec(transceiver: RTCRtpTransceiver) -> str | None:
        for codec in getattr(transceiver, "_codecs", []):
            name = _CODEC_NAMES.get(codec.name.lower())
            if name:
                return name
        return None

    def _spawn(self, leg: _Leg, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        leg.tasks.add(task)
        task.add_done_callback(leg.tasks.discard)

    async def _keyframes(self, leg: _Leg) -> None:
        """Ask for keyframes: until the first one (the file starts there), then every
        `pli_interval_s` so that a long recording stays seekable and recovers from damage.
        Also sends the fixed REMB (see `REMB_BPS`)."""
        receiver = leg.video
        assert receiver is not None
        last_remb = 0.0
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            if now - last_remb >= REMB_INTERVAL_S:
                ssrcs = [source.source for source in receiver.getSynchronizationSources()]
                if await passthrough.send_remb(receiver, REMB_BPS, ssrcs):
                    last_remb = now
            writer = leg.writer
            if writer.video_started:
                last = writer.last_keyframe_at or 0.0
                due = now - last >= self.pli_interval_s and now - leg.last_pli >= self.pli_interval_s
            else:
                due = now - leg.last_pli >= 0.5
            if not due:
                continue
            sources = receiver.getSynchronizationSources()
            for source in sources:
                await receiver._send_rtcp_pli(source.source)
            if sources:
                leg.last_pli = now
                leg.plis += 1

    async def _finish(self, leg: _Leg) -> RecordingFile | None:
        """Close the leg's connection, then its file (idempotent; concurrent callers share it)."""
        if leg.finished is not None:
            return await asyncio.shield(leg.finished)
        leg.finished = asyncio.get_running_loop().create_future()
        for task in list(leg.tasks):
            task.cancel()
        await self._read_to_end(leg)
        try:
            # Stops the receivers, which joins their decoder threads: no more writes after.
            await leg.pc.close()
        except Exception:
            log.exception("recording %s/%s: error closing the connection", self.label, leg.role)
        # The frames the jitter buffers still hold (the last video frame, more behind a gap).
        for receiver in leg.receivers:
            try:
                passthrough.flush(receiver)
                stats = leg.writer.stats[receiver.track.kind]
                stats.rtp_received, stats.rtp_lost = passthrough.receive_counts(receiver)
                stats.rtp_left = passthrough.buffered_packets(receiver)
                if stats.rtp_lost or stats.rtp_left:
                    log.info(
                        "recording %s/%s: %s: %d RTP packets never came, %d of incomplete frames unwritten",
                        self.label,
                        leg.role,
                        stats.kind,
                        stats.rtp_lost,
                        stats.rtp_left,
                    )
            except Exception:
                log.exception("recording %s/%s: could not flush a jitter buffer", self.label, leg.role)
        result: RecordingFile | None = None
        try:
            result = await asyncio.to_thread(leg.writer.close)
        except Exception:
            log.exception("recording %s/%s: error finishing the file", self.label, leg.role)
        if result is not None:
            self.files.append(result)
        leg.finished.set_result(result)
        return result
