"""Recording without transcoding: aiortc clients send synthetic media to a RecordingSession.

Runs inside the test run's private network namespace (tests/netns.py): aioice gathers the
bridge address 10.99.0.1, and nothing can leave the machine. The clients encode (aiortc's own
VP8 and Opus encoders); the server side must only mux.
"""

from __future__ import annotations

import asyncio
import fractions
import itertools
import math
import os
import re
import shutil
import stat
import struct
import time
from pathlib import Path
from typing import Any

import av
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs import vpx
from aiortc.mediastreams import MediaStreamTrack

from signaling.recording import RecordingError, RecordingFile, RecordingSession, counters
from signaling.recording.bitstream import opus_duration_samples, vp8_keyframe

pytestmark = pytest.mark.netns  # real WebRTC media, coturn or the server on the bridge


FPS = 20
FLASH = (2.0, 2.5)  # seconds after the clients' shared start: white video and a 1 kHz tone


class SyntheticVideo(MediaStreamTrack):
    """A live 'camera': frame n is captured at start + n/FPS; late readers skip ahead, as a
    real camera does, so RTP timestamps stay tied to capture time."""

    kind = "video"

    def __init__(self, start: float, switch_at: float | None = None) -> None:
        super().__init__()
        self.start = start
        self.switch_at = switch_at
        self.n: int | None = None
        self.sent = 0
        self.first: float | None = None  # capture time of the first and after the last frame
        self.end = 0.0
        self.hold = False  # True: no more frames (recv() waits until the connection closes)

    async def recv(self) -> av.VideoFrame:
        if self.hold:
            await asyncio.Event().wait()
        if self.n is None:
            self.n = max(0, math.ceil((time.time() - self.start) * FPS))
        else:
            self.n += 1
        t = self.n / FPS
        await asyncio.sleep(max(0.0, self.start + t - time.time()))
        big = self.switch_at is not None and t >= self.switch_at
        width, height = (640, 480) if big else (320, 240)
        frame = av.VideoFrame(width, height, "yuv420p")
        luma = 235 if FLASH[0] <= t < FLASH[1] else 40
        y, u, v = frame.planes
        row = bytes([luma]) * y.line_size
        band = bytes([luma // 2 + 60]) * y.line_size
        pos = self.n * 4 % height
        y.update(b"".join(band if pos <= r < pos + 16 else row for r in range(height)))
        u.update(bytes([128]) * u.buffer_size)
        v.update(bytes([128]) * v.buffer_size)
        frame.pts = self.n * 90000 // FPS
        frame.time_base = fractions.Fraction(1, 90000)
        self.sent += 1
        if self.first is None:
            self.first = self.start + t
        self.end = self.start + t + 1 / FPS
        return frame


class SyntheticAudio(MediaStreamTrack):
    kind = "audio"
    SAMPLES = 960  # 20 ms at 48 kHz

    def __init__(self, start: float) -> None:
        super().__init__()
        self.start = start
        self.n: int | None = None
        self.sent = 0
        self.first: float | None = None
        self.end = 0.0
        self.hold = False
        self.silence = bytes(self.SAMPLES * 2)
        self.tone = b"".join(
            struct.pack("<h", int(12000 * math.sin(2 * math.pi * 1000 * i / 48000)))
            for i in range(self.SAMPLES)
        )

    async def recv(self) -> av.AudioFrame:
        if self.hold:
            await asyncio.Event().wait()
        if self.n is None:
            self.n = max(0, math.ceil((time.time() - self.start) * 50))
        else:
            self.n += 1
        t = self.n / 50
        await asyncio.sleep(max(0.0, self.start + t - time.time()))
        frame = av.AudioFrame(format="s16", layout="mono", samples=self.SAMPLES)
        frame.planes[0].update(self.tone if FLASH[0] <= t < FLASH[1] else self.silence)
        frame.sample_rate = 48000
        frame.pts = self.n * self.SAMPLES
        frame.time_base = fractions.Fraction(1, 48000)
        self.sent += 1
        if self.first is None:
            self.first = self.start + t
        self.end = self.start + t + 0.02
        return frame


class Client:
    """A participant's send-only recording leg, as the browser will open it."""

    def __init__(self, start: float, switch_at: float | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.video = SyntheticVideo(start, switch_at)
        self.audio = SyntheticAudio(start)
        self.pc.addTransceiver(self.audio, direction="sendonly")
        self.pc.addTransceiver(self.video, direction="sendonly")

    async def connect(self, session: RecordingSession, role: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await session.add_participant_offer(role, self.pc.localDescription.sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def close(self) -> None:
        await self.pc.close()

    @property
    def sent_seconds(self) -> float:
        """Capture time spanned by the media this client sent (both tracks)."""
        first = min(t.first for t in (self.audio, self.video) if t.first is not None)
        return max(self.audio.end, self.video.end) - first


def decode_all(path: Path) -> dict[str, Any]:
    """Decode every frame of a recording; return counts, first times and the sync markers."""
    result: dict[str, Any] = {"video": 0, "audio": 0, "sizes": [], "start": {}, "flash": {}, "end": 0.0}
    with av.open(str(path)) as container:
        streams = [s.type for s in container.streams]
        result["streams"] = streams
        for frame in container.decode(*container.streams):
            kind = "video" if isinstance(frame, av.VideoFrame) else "audio"
            t = float(frame.pts * frame.time_base)
            result[kind] += 1
            result["start"].setdefault(kind, t)
            if kind == "video":
                end = t + 1 / FPS
                size = (frame.width, frame.height)
                if not result["sizes"] or result["sizes"][-1] != size:
                    result["sizes"].append(size)
                plane = frame.planes[0]
                # Mean of the first row: 235 during the flash, 40 otherwise.
                if "video" not in result["flash"] and bytes(plane)[0] > 150:
                    result["flash"]["video"] = t
            else:
                end = t + frame.samples / frame.sample_rate
                if "audio" not in result["flash"]:
                    samples = struct.unpack(f"<{frame.samples}f", bytes(frame.planes[0])[: 4 * frame.samples])
                    loud = next((i for i, s in enumerate(samples) if abs(s) > 0.1), None)
                    if loud is not None:
                        result["flash"]["audio"] = t + loud / frame.sample_rate
            result["end"] = max(result["end"], end)
    return result


@pytest.fixture
def no_decoders(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count every aiortc VP8/Opus decoder created in this process (the clients only encode)."""
    made = {"vp8": 0, "opus": 0}
    from aiortc.codecs import opus

    for name, cls in (("vp8", vpx.Vp8Decoder), ("opus", opus.OpusDecoder)):
        original = cls.__init__

        def counting(self: Any, *a: Any, _name: str = name, _orig: Any = original, **kw: Any) -> None:
            made[_name] += 1
            _orig(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", counting)
    return made


async def record(
    tmp_path: Path, seconds: float, *, switch_at: float | None = None, snapshot_at: float | None = None
) -> tuple[list[RecordingFile], dict[str, Client], Path | None]:
    session = RecordingSession(tmp_path / "rec", ice_servers=[], label="visit-1", pli_interval_s=2.0)
    (tmp_path / "rec").mkdir()
    start = time.time() + 0.5
    clients = {"host": Client(start, switch_at), "guest": Client(start)}
    snapshot: Path | None = None
    async with asyncio.timeout(30):
        await asyncio.gather(*(c.connect(session, role) for role, c in clients.items()))
        t0 = time.time()
        if snapshot_at is not None:
            await asyncio.sleep(snapshot_at)
            # What a kill -9 would leave: exactly the bytes the OS has at this moment.
            live = session._legs["host"].writer.path
            assert live is not None
            snapshot = tmp_path / "snapshot.webm"
            shutil.copyfile(live, snapshot)
        await asyncio.sleep(seconds - (time.time() - t0))
        for c in clients.values():
            await c.close()
        files = await session.close()
    return files, clients, snapshot


async def test_two_participants_recorded_without_decoding(
    tmp_path: Path, no_decoders: dict[str, int]
) -> None:
    before = counters.taps, counters.frames
    files, clients, snapshot = await record(tmp_path, 5.0, switch_at=3.0, snapshot_at=3.0)

    assert sorted(f.role for f in files) == ["guest", "host"]
    for f in files:
        info = decode_all(f.path)
        client = clients[f.role]
        sent = client.sent_seconds
        assert sorted(info["streams"]) == ["audio", "video"]
        # Decodes completely: every frame written comes back out of the decoder.
        tracks = {t["kind"]: t for t in f.tracks}
        assert info["video"] == tracks["video"]["frames"] > 0.8 * FPS * 4
        assert info["audio"] >= tracks["audio"]["frames"] - 1 > 0.8 * 50 * 4
        assert tracks["video"]["dropped_before_keyframe"] == 0
        # No loss on the way: aiortc's jitter buffers still hold the last frames at close
        # (1 video, 4 audio), and the last frame recv()'d may not have been sent yet.
        assert client.video.sent - 2 <= tracks["video"]["frames"] <= client.video.sent
        assert client.audio.sent - 6 <= tracks["audio"]["frames"] <= client.audio.sent
        # Duration within 0.5 s of the sending time (connection set-up is part of neither).
        assert abs(info["end"] - sent) < 0.5, (info["end"], sent)
        assert abs(f.duration_s - sent) < 0.5
        # Where each track starts depends on when the first keyframe arrives (later on a loaded
        # machine); synchronisation itself is what the flash below measures.
        assert abs(info["start"]["video"] - info["start"]["audio"]) < 0.5, info["start"]
        # Lip sync: the white flash and the tone were captured at the same instant.
        assert abs(info["flash"]["video"] - info["flash"]["audio"]) < 0.1, info["flash"]
        assert f.size == f.path.stat().st_size and re.fullmatch(r"[0-9a-f]{64}", f.sha256)

    host = next(f for f in files if f.role == "host")
    host_info = decode_all(host.path)
    assert host_info["sizes"] == [(320, 240), (640, 480)]
    assert next(t["sizes"] for t in host.tracks if t["kind"] == "video") == [[320, 240], [640, 480]]

    # The copy taken mid-recording (a crash) decodes up to about a second before the cut.
    assert snapshot is not None
    cut = decode_all(snapshot)
    assert cut["video"] > 0 and cut["audio"] > 0
    assert 3.0 - 2.0 <= cut["end"] <= 3.0 + 0.5, cut["end"]

    # Nothing on the server decoded: 2 legs x 2 tracks went through the taps, every frame
    # written came through them, and no aiortc decoder was ever created in this process.
    assert no_decoders == {"vp8": 0, "opus": 0}
    assert counters.taps - before[0] == 4
    written = sum(t["frames"] + t["dropped_before_keyframe"] for f in files for t in f.tracks)
    assert counters.frames - before[1] == written


async def test_the_last_frames_of_a_leg_are_kept(tmp_path: Path) -> None:
    """Every frame sent before the end is in the file: aiortc's jitter buffers hold the last
    audio frames (4) and video frame until later packets come, which never do once the
    participant stops; closing the session must still write them."""
    session = RecordingSession(tmp_path / "rec", ice_servers=[], label="visit-2")
    (tmp_path / "rec").mkdir()
    client = Client(time.time() + 0.5)
    async with asyncio.timeout(30):
        await client.connect(session, "guest")
        await asyncio.sleep(3.5)
        client.audio.hold = client.video.hold = True
        await asyncio.sleep(1.0)  # what was sent has arrived; nothing more comes
        files = await session.close()
        await client.close()
    [f] = files
    tracks = {t["kind"]: t for t in f.tracks}
    # The frame recv()'d just before the hold may be in the encoder still: at most 1 short.
    assert client.audio.sent - 1 <= tracks["audio"]["frames"] <= client.audio.sent, tracks
    video = tracks["video"]["frames"] + tracks["video"]["dropped_before_keyframe"]
    assert client.video.sent - 1 <= video <= client.video.sent, tracks
    info = decode_all(f.path)
    assert info["video"] == tracks["video"]["frames"]


def lose_packets(client: Client) -> dict[str, Any]:
    """Make `client` lose, for good, the next RTP packet of each kind it sends once `arm` is
    set (a datagram lost in the network, its retransmissions too): a gap in the server's jitter
    buffers near the end of the leg. Returns the control dict (`arm`, `lost`: kind -> seq)."""
    from aiortc.rtp import RtpPacket, is_rtcp

    senders = {s._ssrc: s.kind for s in client.pc.getSenders()}
    rtx = {s._rtx_ssrc for s in client.pc.getSenders()}
    transport = client.pc.getSenders()[0].transport
    original = transport._send_rtp
    control: dict[str, Any] = {"arm": False, "lost": {}}

    async def send(data: bytes) -> None:
        if control["arm"] and not is_rtcp(data):
            packet = RtpPacket.parse(data)
            kind = senders.get(packet.ssrc)
            if packet.ssrc in rtx:
                return  # a retransmission (of the lost packet, or late anyway): never arrives
            if kind is not None and kind not in control["lost"]:
                control["lost"][kind] = packet.sequence_number
                return
            if kind is not None and control["lost"][kind] == packet.sequence_number:
                return  # retransmitted without RTX
        await original(data)

    transport._send_rtp = send
    return control


async def test_frames_behind_a_lost_packet_at_the_end_are_kept(tmp_path: Path) -> None:
    """A packet lost shortly before the hang-up leaves a gap in the server's jitter buffers;
    aiortc releases nothing behind it until the buffer overflows, which it never does once the
    participant stops. Every complete frame received before the end is still written: all but
    the lost audio packet, and all but the video frame the lost packet belonged to."""
    session = RecordingSession(tmp_path / "rec", ice_servers=[], label="visit-gap")
    (tmp_path / "rec").mkdir()
    client = Client(time.time() + 0.5)
    async with asyncio.timeout(30):
        await client.connect(session, "guest")
        control = lose_packets(client)
        await asyncio.sleep(3.5)
        control["arm"] = True
        await asyncio.sleep(0.4)  # ~20 audio packets and ~8 video frames after the gaps
        client.audio.hold = client.video.hold = True
        await asyncio.sleep(1.0)
        files = await session.close()
        await client.close()
    assert set(control["lost"]) == {"audio", "video"}, control
    [f] = files
    tracks = {t["kind"]: t for t in f.tracks}
    # One audio packet lost; the frame recv()'d just before the hold may be in the encoder.
    assert client.audio.sent - 2 <= tracks["audio"]["frames"] <= client.audio.sent - 1, tracks
    video = tracks["video"]["frames"] + tracks["video"]["dropped_before_keyframe"]
    assert client.video.sent - 2 <= video <= client.video.sent - 1, tracks
    assert tracks["audio"]["rtp_left"] == 0
    # At most the other packets of the video frame that lost one stay unwritten.
    assert tracks["video"]["rtp_left"] < 10, tracks
    with av.open(str(f.path)) as container:
        demuxed = [p.stream.type for p in container.demux() if p.size]
    assert demuxed.count("audio") == tracks["audio"]["frames"]
    assert demuxed.count("video") == tracks["video"]["frames"]


async def test_reordered_audio_is_written_in_order_and_whole(tmp_path: Path) -> None:
    """Audio packets that arrive out of order (held back by the network behind the next 1-3) are
    all written, in the order they were captured."""
    from aiortc.rtp import RtpPacket, is_rtcp

    session = RecordingSession(tmp_path / "rec", ice_servers=[], label="visit-order")
    (tmp_path / "rec").mkdir()
    client = Client(time.time() + 0.5)
    async with asyncio.timeout(30):
        await client.connect(session, "guest")
        [audio] = [s._ssrc for s in client.pc.getSenders() if s.kind == "audio"]
        transport = client.pc.getSenders()[0].transport
        original = transport._send_rtp
        late: list[bytes] = []
        counts = {"audio": 0, "swapped": 0}

        async def send(data: bytes) -> None:
            if is_rtcp(data) or RtpPacket.parse(data).ssrc != audio:
                await original(data)
                return
            counts["audio"] += 1
            n = counts["audio"]
            if 50 < n <= 150 and n % 25 == 0:
                late.append(data)  # sent after the next 3
                return
            await original(data)
            if late and n % 25 == 3:
                await original(late.pop())
                counts["swapped"] += 1

        transport._send_rtp = send
        await asyncio.sleep(4.0)
        client.audio.hold = client.video.hold = True
        await asyncio.sleep(1.0)
        files = await session.close()
        await client.close()
    assert counts["swapped"] >= 4, counts
    [f] = files
    tracks = {t["kind"]: t for t in f.tracks}
    assert client.audio.sent - 1 <= tracks["audio"]["frames"] <= client.audio.sent, tracks
    with av.open(str(f.path)) as container:
        times = [p.pts for p in container.demux(audio=0) if p.size]
    steps = [b - a for a, b in itertools.pairwise(times)]
    assert [s for s in steps[5:] if not 15 <= s <= 25] == [], steps


async def test_files_are_private_and_named_by_the_server(tmp_path: Path) -> None:
    files, *_ = await record(tmp_path, 1.5)
    assert len(files) == 2
    for f in files:
        assert f.path.parent == tmp_path / "rec"
        assert re.fullmatch(rf"{f.role}-\d{{8}}T\d{{6}}Z-[0-9a-f]{{12}}\.webm", f.path.name)
        assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600


async def test_reoffer_finishes_the_old_leg(tmp_path: Path) -> None:
    (tmp_path / "rec").mkdir()
    session = RecordingSession(tmp_path / "rec", ice_servers=[])
    async with asyncio.timeout(30):
        first = Client(time.time())
        await first.connect(session, "guest")
        await asyncio.sleep(1.5)
        # The phone reconnects: a new leg, the old file is finished and kept.
        second = Client(time.time())
        await second.connect(session, "guest")
        await asyncio.sleep(1.5)
        await first.close()
        await second.close()
        files = await session.close()
    assert [f.role for f in files] == ["guest", "guest"]
    assert len({f.path for f in files}) == 2
    for f in files:
        assert decode_all(f.path)["video"] > 0
    assert await session.close() == files  # idempotent


async def test_refusals(tmp_path: Path) -> None:
    session = RecordingSession(tmp_path, ice_servers=[])
    with pytest.raises(RecordingError):
        await session.add_participant_offer("../host", "v=0\r\n")
    with pytest.raises(RecordingError):
        await session.add_participant_offer("host", "not sdp")
    with pytest.raises(RecordingError):
        await session.add_ice_candidate("host", None)
    await session.close()
    with pytest.raises(RecordingError):
        await session.add_participant_offer("host", "v=0\r\n")
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


def test_bitstream_helpers() -> None:
    # RFC 6716 TOC: config 12 (hybrid 10 ms) code 0; config 31 (CELT 20 ms) code 3 with 3 frames.
    assert opus_duration_samples(bytes([12 << 3])) == 480
    assert opus_duration_samples(bytes([(31 << 3) | 3, 3])) == 3 * 960
    assert opus_duration_samples(b"") == 0
    key = (
        bytes([0x50, 0x2A, 0x00, 0x9D, 0x01, 0x2A])
        + (640).to_bytes(2, "little")
        + (480).to_bytes(2, "little")
    )
    assert vp8_keyframe(key) == (True, (640, 480))
    assert vp8_keyframe(bytes([0x51, 0, 0])) == (False, None)


def _offer(video_payloads: str, rtpmaps: str) -> str:
    return (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        f"m=video 9 UDP/TLS/RTP/SAVPF {video_payloads}\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
        "a=sendonly\r\na=rtcp-mux\r\n" + rtpmaps
    )


def test_the_server_answers_in_the_offers_codec_order() -> None:
    """A page that puts H.264 first (iPhones; web/static/call-media.js) is recorded in H.264, one
    that puts VP8 first in VP8: the answer keeps the offer's order, not the server's."""
    from signaling.recording.session import VIDEO_CODECS, _in_offer_order, _preferences

    preferences = _preferences("video", VIDEO_CODECS)
    h264_first = _offer(
        "102 96",
        "a=rtpmap:102 H264/90000\r\na=fmtp:102 packetization-mode=1;profile-level-id=42e01f\r\n"
        "a=rtpmap:96 VP8/90000\r\n",
    )
    vp8_first = _offer("96 102", "a=rtpmap:96 VP8/90000\r\na=rtpmap:102 H264/90000\r\n")
    assert _in_offer_order(preferences, h264_first, "video")[0].mimeType == "video/H264"
    assert _in_offer_order(preferences, vp8_first, "video")[0].mimeType == "video/VP8"
    reordered = _in_offer_order(preferences, h264_first, "video")
    assert sorted(map(repr, reordered)) == sorted(map(repr, preferences))  # nothing lost
    assert _in_offer_order(preferences, "not sdp", "video") == preferences
