"""Benchmark: concurrent recorded visits through the real Consult server, against two baselines
fed the same input in the same run, with frame loss counted for every side.

What is measured (every figure in the JSON says which side and which step it comes from):

- Consult (the product): `python -m consult serve --no-tls` as a subprocess (after `init` and
  `demo`, `CONSULT_RECORDING_POLICY=always`; a fresh data directory and server per run). For
  each step the bench writes N confirmed visits with both consents stored into its database;
  per visit the doctor (host token) and the patient (signed call link) join over the
  WebSocket, the host admits, and on the server's `recording` message each participant opens
  its recording leg (`record_offer` / `record_answer` / `record_candidate null`) from an
  aiortc peer sending a pre-encoded 640x480 20 fps VP8 clip and 20 ms Opus packets. The
  server writes the files by passthrough (no decoding); the host's `end` finishes them and the
  application stores a `recordings` row per file. The P2P call leg is not run (it never
  touches the server).
- Baseline `realtime_mediarecorder`: a bare aiohttp process with one aiortc
  RTCPeerConnection per participant and aiortc's `MediaRecorder` per track (one per track:
  with both in one recorder the file loses its video when audio arrives first). It decodes
  VP8 and Opus and re-encodes them, libvpx with REALTIME settings (`deadline=realtime`,
  `cpu-used=8`, `lag-in-frames=0`, the clip's bit rate) set on the recorder's stream before
  its encoder opens; libopus at its defaults.
- Baseline `pyav_remux`: the same bare process and aiortc receive path, each encoded frame
  taken from aiortc's jitter buffer (the same tap as Consult's, `signaling.recording.passthrough`)
  and muxed at once into Matroska by PyAV on the event loop (per-frame `mux()`, no batching,
  no worker thread, no keyframe or timestamp handling beyond RTP time).

Per side and step: CPU of the recording server process and its children (Consult's recording
workers; utime + stime of all their threads from /proc/PID/stat, over `--duration` s after a 2 s
warm-up), as % of one core, divided by the
number of streams (`cpu_pct_per_stream`; one stream = one participant's leg: VGA video + Opus
audio; a visit has 2). Frame loss: frames the bench's clients sent against frames found by
demuxing every written file with PyAV, per stream, with no allowance for Consult (it writes
the frames aiortc's jitter buffers still hold when a leg closes); the baselines are allowed
those (1 video frame, 4 audio packets per stream), which aiortc never releases to them. A step
is lossless when no stream lost a frame and every expected file exists. The clients skip
frames rather than burst when they fall behind (as a camera does); skipped frames are not
"sent". A frame counts as sent when aiortc's sender took it from the client's track; when the
clients stop, the bench waits until every sender has asked for its next frame (it does so only
after handing every packet of the previous one to its socket: `senders_done_s`), then 2.5 s for
packets in flight and the server's receiver reports, and only then ends the visits: a starved
load generator still packetizing a counted frame is not taken for a loss, and a frame really
sent and not written still is. For a lossy Consult stream stderr shows the recorder's counters
(per track `rtp_received`, `rtp_lost` — sequence gaps — and `rtp_left`, packets of incomplete
frames not written), the client's RTP packets sent (`client_rtp_sent`), audio holes and how many
video frames are missing before the file's first frame and after its last.

Stepping: each side tries its steps in increasing order and stops at the first lossy step;
`max_visits_without_loss` is the highest step such that it AND every lower step lost nothing
(0 if the lowest step lost frames), taken over all runs (the minimum of the runs'). A run is
lossy when any step it tried lost a frame. Consult runs `--runs` times; each baseline runs
once, after Consult, with its own steps. The ratios compare per-stream CPU at the highest
lossless step of each side (the lowest step if none was lossless; flagged in the JSON):
`ratio_vs_realtime_mediarecorder` = baseline per-stream CPU / Consult's (Consult's: median of
the runs), likewise `ratio_vs_pyav_remux`; `ratios_at_sustained_steps` says whether both sides
of a ratio had a lossless step (if not, a starved process shows less CPU than it needs).
`ratios_at_schedule`: the same ratios from CPU per stream divided by `clients_sent_ratio`
(`cpu_pct_per_stream_at_schedule`), what each side would cost at the clients' full schedule: on
a loaded machine the sender falls behind and every side then shows less CPU than it needs.
Per step, also: `clients_sent_ratio`, `clients_cpu_pct` (the load generator's CPU, % of one
core: near 100 it is starved), `udp_rcvbuf_drops` (datagrams the kernel dropped in the receive
buffers during the measurement) and `udp_rcvbuf_drops_after_stop` (from the clients' stop until
the files are in), `softnet_drops` (packets dropped before any socket, machine-wide),
for Consult `rtcp` (packets the server's receivers reported lost) and
`udp_unread_bytes_at_end` (bytes still unread in the UDP sockets when the visit is ended:
a server behind real time).

Everything happens in a private network namespace (entered at start, needs root; media on the
bridge address 10.99.0.1, nothing can leave the machine). The load generator (the aiortc
clients) runs in the bench process on the same cores: on a loaded machine a lossy step can be
the sender's fault; `clients_sent_ratio` (frames sent / frames scheduled) shows it. Load
averages are printed before and after; the last line of stdout is one JSON object.

    .venv/bin/python bench/recording.py                 # 3 runs, steps 10,25,50; ~10 minutes
    .venv/bin/python bench/recording.py --quick         # 1 run, small steps; ~2 minutes
    .venv/bin/python bench/recording.py --runs 10 --steps 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from common import (
    BRIDGE_ADDR,
    ConsultServer,
    ServerStartError,
    enter_private_netns,
    free_port,
    loadavg,
)  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Frames aiortc's jitter buffers keep when a leg closes (video: 1, audio: prefetch 4).
HOLDBACK = {"video": 1, "audio": 4}


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Consult's recording workers are its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU of `pid`, its live descendants, and its children already reaped (cutime + cstime)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        if p == pid:
            total += (int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


def rss_mib(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total or float("nan")


def udp_errors() -> int:
    """Datagrams the kernel dropped in this network namespace (full receive buffers)."""
    lines = [
        line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")
    ]
    stats = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return stats["RcvbufErrors"]


def softnet_drops() -> int:
    """Packets the kernel dropped before any socket (per-CPU input backlog full), machine-wide."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())


def udp_unread_bytes() -> int:
    """Bytes waiting unread in this namespace's UDP sockets (/proc/net/udp rx_queue): what a
    server that fell behind real time still has to read."""
    total = 0
    for name in ("udp", "udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                total += int(line.split()[4].split(":")[1], 16)
    return total


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ----- baseline server processes -----------------------------------------------------------------


def enlarge_receive_buffers(pc: RTCPeerConnection) -> None:
    """The same 1 MiB UDP receive buffers Consult's recorder asks for: without them a
    baseline's loss would be the kernel's small default buffer, not its own cost."""
    import socket

    from signaling.recording.session import RCVBUF_BYTES

    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        for protocol in connection._protocols:
            sock = protocol.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)


class RealtimeRecorderSession:
    """aiortc's MediaRecorder per track: decodes every frame and re-encodes it, libvpx with
    realtime settings (MediaRecorder has no codec options: they are set on its stream after
    `addTrack`, before the encoder opens on the first frame)."""

    def __init__(self, directory: Path, kbps: int) -> None:
        self.directory = directory
        self.kbps = kbps
        self.pcs: list[RTCPeerConnection] = []
        self.recorders: list[Any] = []
        self.files: list[dict[str, str]] = []

    async def add_participant_offer(self, role: str, sdp: str) -> str:
        from aiortc.contrib.media import MediaRecorder

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        tracks: list[MediaStreamTrack] = []
        pc.on("track", tracks.append)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        for track in tracks:
            path = self.directory / f"{role}-{track.kind}.webm"
            recorder = MediaRecorder(str(path))
            recorder.addTrack(track)
            if track.kind == "video":
                stream = recorder._MediaRecorder__tracks[track].stream  # no public way in aiortc
                stream.bit_rate = self.kbps * 1000
                stream.codec_context.options = {
                    "deadline": "realtime",
                    "cpu-used": "8",
                    "lag-in-frames": "0",
                }
            await recorder.start()
            self.recorders.append(recorder)
            self.files.append({"role": role, "path": str(path)})
        await pc.setLocalDescription(await pc.createAnswer())
        enlarge_receive_buffers(pc)
        return pc.localDescription.sdp

    async def close(self) -> list[dict[str, str]]:
        for pc in self.pcs:
            await pc.close()
        # Let each recorder finish what it has queued (its task ends when its track does)
        # before stopping it: frames it is behind on are not counted as lost.
        tasks = [c.task for r in self.recorders for c in r._MediaRecorder__tracks.values() if c.task]
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log(f"a MediaRecorder task failed: {task.exception()!r}")
        for recorder in self.recorders:
            await recorder.stop()
        return self.files


class _RemuxSink:
    """One track of a plain remux: each encoded frame muxed at once, RTP time as pts."""

    def __init__(self, container: Any, stream: Any, kind: str) -> None:
        self.container, self.stream, self.kind = container, stream, kind
        self.last = -1

    def on_frame(self, codec: Any, data: bytes, timestamp: int) -> None:
        if self.container is None:
            return
        pts = max(self.last + 1, timestamp * 1000 // codec.clockRate)
        packet = av.Packet(data)
        packet.stream = self.stream
        packet.pts = packet.dts = pts
        packet.time_base = fractions.Fraction(1, 1000)
        if self.kind == "audio" or not data[0] & 1:
            packet.is_keyframe = True
        with contextlib.suppress(av.FFmpegError):
            self.container.mux(packet)
            self.last = pts


class RemuxSession:
    """The same aiortc receive path as Consult's, each frame remuxed by PyAV into Matroska
    right on the event loop: what a plain, unbatched remux costs."""

    def __init__(self, directory: Path, width: int, height: int) -> None:
        self.directory = directory
        self.size = (width, height)
        self.pcs: list[RTCPeerConnection] = []
        self.containers: list[Any] = []
        self.sinks: list[_RemuxSink] = []
        self.files: list[dict[str, str]] = []

    async def add_participant_offer(self, role: str, sdp: str) -> str:
        from signaling.recording import passthrough

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        audio = pc.addTransceiver("audio", direction="recvonly")
        video = pc.addTransceiver("video", direction="recvonly")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        path = self.directory / f"{role}.mkv"
        container = av.open(str(path), "w", format="matroska")
        vstream = container.add_mux_stream("vp8", width=self.size[0], height=self.size[1])
        astream = container.add_stream("libopus", rate=48000, layout="stereo")
        for stream in (vstream, astream):
            stream.time_base = fractions.Fraction(1, 1000)
        self.containers.append(container)
        for transceiver, stream, kind in ((audio, astream, "audio"), (video, vstream, "video")):
            sink = _RemuxSink(container, stream, kind)
            self.sinks.append(sink)
            passthrough.attach(transceiver.receiver, sink)
        self.files.append({"role": role, "path": str(path)})
        await pc.setLocalDescription(await pc.createAnswer())
        enlarge_receive_buffers(pc)
        return pc.localDescription.sdp

    async def close(self) -> list[dict[str, str]]:
        for pc in self.pcs:
            await pc.close()
        for sink in self.sinks:
            sink.container = None
        for container in self.containers:
            container.close()
        return self.files


async def serve(args: argparse.Namespace) -> None:
    sessions: dict[str, Any] = {}

    def session_for(visit: str) -> Any:
        if visit not in sessions:
            d = args.dir / visit
            d.mkdir(mode=0o700)
            sessions[visit] = (
                RealtimeRecorderSession(d, args.kbps)
                if args.serve == "realtime_mediarecorder"
                else RemuxSession(d, args.width, args.height)
            )
        return sessions[visit]

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        answer = await session_for(request.match_info["visit"]).add_participant_offer(
            body["role"], body["sdp"]
        )
        return web.json_response({"sdp": answer})

    async def close(request: web.Request) -> web.Response:
        session = sessions.pop(request.match_info["visit"], None)
        files = await session.close() if session is not None else []
        return web.json_response({"files": files})

    app = web.Application()
    app.router.add_post("/visits/{visit}/offer", offer)
    app.router.add_post("/visits/{visit}/close", close)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, args.port).start()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for session in sessions.values():
        await session.close()
    await runner.cleanup()


# ----- the load: pre-encoded media ---------------------------------------------------------------


def encode_clip(width: int, height: int, fps: int, kbps: int, seconds: int) -> dict[str, list[bytes]]:
    """VP8 with a keyframe every second (so a loop restart is clean) and 20 ms Opus packets."""
    video = av.CodecContext.create("libvpx", "w")
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.time_base = fractions.Fraction(1, fps)
    video.framerate = fps
    video.bit_rate = kbps * 1000
    video.gop_size = fps
    rate = f"{kbps}k"
    video.options = {
        "deadline": "realtime",
        "cpu-used": "8",
        "lag-in-frames": "0",
        "auto-alt-ref": "0",
        # Constant bit rate: a camera-like stream, not whatever VBR makes of synthetic content.
        "minrate": rate,
        "maxrate": rate,
        "bufsize": f"{kbps // 2}k",
    }
    # A camera-like picture: 16x16 patches with mild noise, scrolling down.
    rng = random.Random(1)
    patches = [[rng.randrange(60, 200) for _ in range(width // 16)] for _ in range(2 * height // 16)]
    texture = b"".join(
        bytes(min(235, patches[y // 16][x // 16] + rng.randrange(12)) for x in range(width))
        for y in range(2 * height)
    )
    frames: list[bytes] = []
    for n in range(seconds * fps):
        frame = av.VideoFrame(width, height, "yuv420p")
        y, u, v = frame.planes
        offset = (n * 8 * width) % (width * height)  # a texture scrolling down the picture
        y.update(texture[offset : offset + y.buffer_size])
        u.update(bytes([118 + n % 20]) * u.buffer_size)
        v.update(bytes([128]) * v.buffer_size)
        frame.pts = n
        frames += [bytes(p) for p in video.encode(frame)]
    frames += [bytes(p) for p in video.encode(None)]
    if frames[0][0] & 1:
        raise RuntimeError("the clip must start with a keyframe")

    audio = av.CodecContext.create("libopus", "w")
    audio.sample_rate, audio.layout, audio.format = 48000, "mono", "s16"
    audio.bit_rate = 32000
    audio.time_base = fractions.Fraction(1, 48000)
    packets: list[bytes] = []
    tone = b"".join(
        int(8000 * ((i // 24) % 2 * 2 - 1)).to_bytes(2, "little", signed=True) for i in range(960)
    )
    for n in range(seconds * 50):
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(tone if n % 50 < 25 else bytes(1920))
        frame.sample_rate = 48000
        frame.pts = n * 960
        packets += [bytes(p) for p in audio.encode(frame)]
    return {"video": frames, "audio": packets}


class PacketTrack(MediaStreamTrack):
    """Loops pre-encoded packets in real time; aiortc's RTCRtpSender sends av.Packet as is.

    Like a camera, a late sender skips the frames whose time has passed (more than two
    intervals late) instead of sending a catch-up burst: `sent` counts what was really sent,
    `scheduled` what the clock called for (their ratio is `clients_sent_ratio`)."""

    def __init__(self, kind: str, packets: list[bytes], rate: int, go: asyncio.Event, phase: int) -> None:
        super().__init__()
        self.kind = kind
        self.packets = packets
        self.interval = 1 / rate
        self.ticks = 90000 // rate if kind == "video" else 960
        self.time_base = fractions.Fraction(1, 90000 if kind == "video" else 48000)
        self.go = go
        self.phase = phase
        self.stopped = False
        self.parked = asyncio.Event()
        self.sent = 0
        self.n = 0  # the next frame's index in the schedule
        self.first_n: int | None = None
        self.last_n: int | None = None
        self.start = 0.0

    async def recv(self) -> av.Packet:
        if self.first_n is None and self.n == 0:
            await self.go.wait()
            self.start = time.monotonic()
        if self.stopped:
            # aiortc's sender asks for the next frame only after it handed every packet of the
            # previous one to the socket: from here on, everything counted in `sent` is sent.
            self.parked.set()
            await asyncio.Event().wait()  # the sender is torn down with the connection
            raise MediaStreamError
        late = time.monotonic() - (self.start + self.n * self.interval)
        if late > 2 * self.interval:
            self.n += int(late / self.interval)
        await asyncio.sleep(max(0.0, self.start + self.n * self.interval - time.monotonic()))
        packet = av.Packet(self.packets[(self.phase + self.n) % len(self.packets)])
        packet.pts = self.n * self.ticks
        packet.time_base = self.time_base
        if self.first_n is None:
            self.first_n = self.n
        self.last_n = self.n
        self.n += 1
        self.sent += 1
        return packet


class Participant:
    def __init__(
        self,
        clip: dict[str, list[bytes]],
        fps: int,
        go: asyncio.Event,
        rng: random.Random,
        config: RTCConfiguration | None = None,
    ) -> None:
        self.pc = RTCPeerConnection(config or RTCConfiguration(iceServers=[]))
        self.connected = asyncio.Event()
        self.rtp_sent: dict[str, int] = {}  # RTP packets per kind, once the tracks stopped
        self.pc.on("connectionstatechange", self._on_state)
        # Start at a random second of the clip (always a keyframe) so visits are not in step.
        second = rng.randrange(len(clip["video"]) // fps)
        self.tracks = {
            "audio": PacketTrack("audio", clip["audio"], 50, go, second * 50),
            "video": PacketTrack("video", clip["video"], fps, go, second * fps),
        }
        for track in self.tracks.values():
            self.pc.addTransceiver(track, direction="sendonly")

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    async def connect(self, http: aiohttp.ClientSession, url: str, role: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(url, json={"role": role, "sdp": self.pc.localDescription.sdp}) as resp:
            resp.raise_for_status()
            answer = (await resp.json())["sdp"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))


def stop_tracks(people: dict[Any, Participant], result: dict[str, Any]) -> None:
    """Stop every client track; record how much of the schedule the clients managed to send
    (below ~0.98 the load generator itself fell behind: a loss there may be the sender's)."""
    now = time.monotonic()
    scheduled = sent = 0.0
    for p in people.values():
        for track in p.tracks.values():
            track.stopped = True
            if track.start:
                scheduled += (now - track.start) / track.interval
                sent += track.sent
    result["clients_sent_ratio"] = round(sent / scheduled, 3) if scheduled else None
    # The CPU per stream the server would need at the full schedule (a starved sender sends
    # fewer frames, and the server then shows less CPU than a real load would cost it).
    per_stream, ratio = result.get("cpu_pct_per_stream"), result["clients_sent_ratio"]
    if per_stream is not None and ratio:
        result["cpu_pct_per_stream_at_schedule"] = round(per_stream / ratio, 3)


async def senders_done(people: dict[Any, Participant], timeout: float = 30.0) -> float:  # noqa: ASYNC109
    """Wait until every client's sender has sent the last frame counted in `sent` (a starved
    load generator can still be packetizing frames it counted when the tracks were stopped);
    return how long that took. A sender that never gets there (its connection broke) is not
    waited for beyond `timeout`: its frames then show as lost."""
    t = time.monotonic()
    waits = [track.parked.wait() for p in people.values() for track in p.tracks.values()]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*waits)
    return round(time.monotonic() - t, 2)


async def rtcp_loss(people: dict[Any, Participant]) -> dict[str, int]:
    """Packets the clients sent, and how many of them the server's receivers say (RTCP receiver
    reports, counted from RTP sequence numbers) never reached them: loss before the receiver
    (network, kernel, DTLS/SRTP) as opposed to loss inside it (jitter buffer) or the writer."""
    out = {"packets_sent": 0, "reported_lost": 0, "streams_reporting_loss": 0}
    for p in people.values():
        for sender in p.pc.getSenders():
            lost = 0
            for stat in (await sender.getStats()).values():
                if stat.type == "outbound-rtp":
                    out["packets_sent"] += stat.packetsSent
                    p.rtp_sent[sender.kind] = stat.packetsSent
                elif stat.type == "remote-inbound-rtp":
                    lost = max(lost, stat.packetsLost)
            out["reported_lost"] += lost
            out["streams_reporting_loss"] += lost > 0
    return out


def account_loss(
    result: dict[str, Any],
    people: dict[tuple[int, str], Participant],
    written: dict[tuple[int, str], dict[str, int]],
    expected_files: int,
    files: int,
    details: dict[tuple[int, str], dict[str, Any]] | None = None,
    holdback: dict[str, int] = HOLDBACK,
) -> None:
    """Frames sent against frames demuxed from the files, per stream; fills `result`."""
    lost = {"audio": 0, "video": 0}
    lossy: list[dict[str, Any]] = []
    for key, p in people.items():
        missing = {}
        for kind in ("audio", "video"):
            got = written.get(key, {}).get(kind, 0)
            missing[kind] = max(0, p.tracks[kind].sent - got - holdback[kind])
            lost[kind] += missing[kind]
        if any(missing.values()):
            entry = {"visit": key[0], "role": key[1], "sent": {k: t.sent for k, t in p.tracks.items()}}
            entry["missing"] = missing
            entry.update((details or {}).get(key, {}))
            lossy.append(entry)
    if lossy:
        log(f"{len(lossy)} streams lost frames:", json.dumps(lossy[:10]))
    result["frames_sent"] = {k: sum(p.tracks[k].sent for p in people.values()) for k in ("audio", "video")}
    result["frames_written"] = {k: sum(w.get(k, 0) for w in written.values()) for k in ("audio", "video")}
    result["frames_lost"] = lost
    result["streams_with_loss"] = len(lossy)
    result["files"] = files
    result["lossless"] = not lossy and files == expected_files


def measure(result: dict[str, Any], pid: int, streams: int, cpu0: float, t0: float, self0: float) -> None:
    cpu1, t1, self1 = tree_cpu_seconds(pid), time.monotonic(), time.process_time()
    result["server_processes"] = len(process_tree(pid))
    result["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
    result["cpu_pct_per_stream"] = round(result["server_cpu_pct"] / streams, 3)
    result["clients_cpu_pct"] = round(100 * (self1 - self0) / (t1 - t0), 1)
    result["server_rss_mib"] = round(rss_mib(pid), 1)


async def run_baseline_step(
    base: str, pid: int, visits: int, clip: dict[str, list[bytes]], fps: int, duration: float, tag: str
) -> dict[str, Any]:
    go = asyncio.Event()
    rng = random.Random(visits)
    roles = ("host", "guest")
    people = {(v, r): Participant(clip, fps, go, rng) for v in range(visits) for r in roles}
    result: dict[str, Any] = {"visits": visits}
    listed: dict[tuple[int, str], list[str]] = {}
    async with aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(8)

        async def connect(key: tuple[int, str]) -> None:
            async with sem:
                await people[key].connect(http, f"{base}/visits/{tag}-{key[0]}/offer", key[1])

        try:
            t = time.monotonic()
            await asyncio.gather(*(connect(k) for k in people))
            async with asyncio.timeout(60):
                await asyncio.gather(*(p.connected.wait() for p in people.values()))
            result["connect_s"] = round(time.monotonic() - t, 2)
            await asyncio.sleep(0.5)  # as for Consult: let the receivers start
            go.set()
            await asyncio.sleep(2.0)  # warm-up
            cpu0, t0, self0 = tree_cpu_seconds(pid), time.monotonic(), time.process_time()
            drops0 = udp_errors()
            await asyncio.sleep(duration)
            measure(result, pid, 2 * visits, cpu0, t0, self0)
            result["udp_rcvbuf_drops"] = udp_errors() - drops0
            stop_tracks(people, result)
            result["senders_done_s"] = await senders_done(people)
            await asyncio.sleep(1.0)  # in-flight packets land
            for v in range(visits):
                async with http.post(f"{base}/visits/{tag}-{v}/close") as resp:
                    for f in (await resp.json())["files"]:
                        listed.setdefault((v, f["role"]), []).append(f["path"])
        finally:
            await asyncio.gather(*(p.pc.close() for p in people.values()), return_exceptions=True)
    written: dict[tuple[int, str], dict[str, int]] = {}
    holes: dict[tuple[int, str], dict[str, Any]] = {}
    files = 0
    for key, paths in listed.items():
        counts = written.setdefault(key, {"audio": 0, "video": 0})
        for path in paths:
            try:
                counted, found = await asyncio.to_thread(count_written, Path(path))
                if found:
                    holes[key] = {"audio_holes_and_end": found[:20]}
            except (av.FFmpegError, OSError) as exc:
                log(f"{path}: {exc}")
                continue
            files += 1
            for kind in ("audio", "video"):
                counts[kind] += counted.get(kind, 0)
    per_stream = len(next(iter(listed.values()))) if listed else 1
    account_loss(result, people, written, 2 * visits * per_stream, files, holes)
    return result


def start_server(args: argparse.Namespace, mode: str, directory: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port(HOST)
    argv = [sys.executable, __file__, "--serve", mode, "--port", str(port), "--dir", str(directory)]
    argv += ["--kbps", str(args.kbps), "--width", str(args.width), "--height", str(args.height)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"{mode} server did not start")
    return proc, f"http://{HOST}:{port}"


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_baseline(
    args: argparse.Namespace, mode: str, steps: list[int], workdir: Path, clip: dict[str, list[bytes]]
) -> dict[str, Any]:
    """One baseline side, stepping up until its first lossy step."""
    side: dict[str, Any] = {"steps": []}
    proc, base = await asyncio.to_thread(start_server, args, mode, workdir / mode)
    try:
        for n in steps:
            r = await run_baseline_step(base, proc.pid, n, clip, args.fps, args.duration, f"{mode}-{n}")
            log(mode, json.dumps(r))
            side["steps"].append(r)
            if not r["lossless"] or proc.poll() is not None:
                break
    finally:
        stop_server(proc)
    return summarize_side(side)


def summarize_side(side: dict[str, Any]) -> dict[str, Any]:
    """`max_visits_without_loss`: highest step with it and every lower step lossless; the
    per-stream CPU at that step (at the lowest step, flagged, if none was lossless)."""
    ok = 0
    at: dict[str, Any] | None = None
    for r in side["steps"]:
        if not r["lossless"]:
            break
        ok, at = r["visits"], r
    side["max_visits_without_loss"] = ok
    side["sustained"] = at is not None
    at = at or (side["steps"][0] if side["steps"] else None)
    side["cpu_pct_per_stream"] = at["cpu_pct_per_stream"] if at else None
    side["cpu_pct_per_stream_at_schedule"] = at.get("cpu_pct_per_stream_at_schedule") if at else None
    side["cpu_measured_at_visits"] = at["visits"] if at else None
    side["frames_lost"] = {k: sum(r["frames_lost"][k] for r in side["steps"]) for k in ("audio", "video")}
    side["frames_sent"] = {k: sum(r["frames_sent"][k] for r in side["steps"]) for k in ("audio", "video")}
    return side


# ----- through the real Consult server ----------------------------------------------------------

CONSULT_VISIT_S = 3 * 3600  # longer than any run: visits end only when the host says so


def consult_env() -> dict[str, str]:
    return {
        "CONSULT_RECORDING_POLICY": "always",
        "CONSULT_ARGON2_TIME_COST": "1",
        "CONSULT_ARGON2_MEMORY_KIB": "1024",
        "CONSULT_VISIT_SECONDS_OVERRIDE": str(CONSULT_VISIT_S),
    }


def seed_recorded_visits(db_path: Path, count: int, first_slot: int, anchor: int) -> list[dict[str, Any]]:
    """`count` confirmed visits that started a minute ago, policy `always` with both consents
    stored (what the consent POSTs of both pages leave), spread over the demo doctors."""
    import secrets
    import sqlite3

    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        doctors = conn.execute(
            "SELECT d.user_id, MIN(dd.department_id) FROM doctors d JOIN users u ON u.id = d.user_id"
            " JOIN doctor_departments dd ON dd.doctor_id = d.user_id WHERE u.active = 1"
            " GROUP BY d.user_id ORDER BY d.user_id"
        ).fetchall()
        patient_id = conn.execute(
            "SELECT id FROM users WHERE role = 'patient' ORDER BY id LIMIT 1"
        ).fetchone()[0]
        if not doctors:
            raise RuntimeError("no active doctor with a department: did `consult demo` run?")
        now = time.time()
        visits: list[dict[str, Any]] = []
        conn.execute("BEGIN")
        for i in range(count):
            doctor_id, department_id = doctors[i % len(doctors)]
            # One slot per (doctor, start): distinct start seconds keep the unique index happy.
            starts = anchor - 60 - (first_slot + i)
            ends = starts + 3600
            public_id, nonce = secrets.token_urlsafe(12), secrets.token_urlsafe(8)
            cur = conn.execute(
                "INSERT INTO visits (public_id, patient_id, doctor_id, department_id, starts_at, ends_at,"
                " status, fee_minor, currency, created, updated, call_nonce, recording,"
                " recording_consent_patient, recording_consent_doctor)"
                " VALUES (?, ?, ?, ?, ?, ?, 'confirmed', 5000, 'CNY', ?, ?, ?, 'always', 1, 1)",
                [public_id, patient_id, doctor_id, department_id, starts, ends, now, now, nonce],
            )
            visits.append(
                {
                    "id": cur.lastrowid,
                    "public_id": public_id,
                    "nonce": nonce,
                    "doctor_id": doctor_id,
                    "starts_at": starts,
                    "ends_at": ends,
                }
            )
        conn.execute("COMMIT")
        return visits
    finally:
        conn.close()


def recording_rows(db_path: Path, visit_ids: list[int]) -> list[dict[str, Any]]:
    import sqlite3

    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        marks = ",".join("?" * len(visit_ids))
        return [
            dict(r)
            for r in conn.execute(
                "SELECT visit_id, role, path, tracks, duration_s, size, complete FROM recordings"  # noqa: S608
                f" WHERE visit_id IN ({marks}) ORDER BY id",
                visit_ids,
            )
        ]
    finally:
        conn.close()


class Seat:
    """One participant's signaling socket, read continuously (so heartbeats are answered and
    nothing the server sends waits in the socket)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.welcome: dict[str, Any] = client.welcome
        self.messages: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.closed: int | None = None
        self.task = asyncio.get_running_loop().create_task(self._pump())

    @classmethod
    async def join(cls, http: aiohttp.ClientSession, url: str, token: str) -> Seat:
        from signaling.client import SignalingClient

        client = await SignalingClient.connect(http, url)
        await client.hello(token, timeout_s=30)
        return cls(client)

    async def _pump(self) -> None:
        from signaling.client import ConnectionClosed

        try:
            while True:
                self.messages.append(await self.client.next_message(timeout=24 * 3600))
                self.changed.set()
        except ConnectionClosed as exc:
            self.closed = exc.code if exc.code is not None else -1
            self.changed.set()

    async def send(self, message: dict[str, Any]) -> None:
        await self.client.send(message)

    async def expect(self, kind: str, timeout: float = 60) -> dict[str, Any]:  # noqa: ASYNC109
        from signaling.client import ErrorReply

        async with asyncio.timeout(timeout):
            while True:
                for i, message in enumerate(self.messages):
                    if message["type"] == kind:
                        return self.messages.pop(i)
                    if message["type"] == "error":
                        raise ErrorReply(self.messages.pop(i))
                if self.closed is not None:
                    raise RuntimeError(f"signaling socket closed ({self.closed}) waiting for {kind}")
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.close()


def count_written(
    path: Path, ends: dict[str, bytes] | None = None
) -> tuple[dict[str, int], list[list[float]]]:
    """Frames per kind in a recorded file, counted by demuxing it with PyAV; and where the
    audio has holes (`[at_s, missing_ms]`, for a diagnosis of lost frames). `ends` gets the
    file's first and last video frames (to tell loss at the start from loss at the end)."""
    counts = {"audio": 0, "video": 0}
    holes: list[list[float]] = []
    last_audio: float | None = None
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size == 0 or packet.pts is None:
                continue
            counts[packet.stream.type] = counts.get(packet.stream.type, 0) + 1
            if packet.stream.type == "video" and ends is not None:
                ends.setdefault("first", bytes(packet))
                ends["last"] = bytes(packet)
            if packet.stream.type == "audio":
                t = float(packet.pts * packet.time_base)
                if last_audio is not None and t - last_audio > 0.030:
                    holes.append([round(last_audio, 2), round((t - last_audio) * 1000 - 20)])
                last_audio = t
    if last_audio is not None:
        holes.append([round(last_audio, 2), -1])  # the end of the audio, for reference
    return counts, holes


def video_gaps(track: PacketTrack, ends: dict[str, bytes], clip: dict[str, list[bytes]]) -> list[int] | None:
    """Video frames sent but missing before the file's first frame and after its last one
    (modulo the clip's length; the clip's VP8 frames are all distinct)."""
    frames = clip["video"]
    if "first" not in ends or track.first_n is None or track.last_n is None:
        return None
    try:
        first, last = frames.index(ends["first"]), frames.index(ends["last"])
    except ValueError:
        return None
    at_start = (first - track.phase - track.first_n) % len(frames)
    at_end = (track.phase + track.last_n - last) % len(frames)
    return [at_start, at_end]


def decode_check(path: Path) -> dict[str, int]:
    """Decode one file completely (a sample per step). `errors` counts packets the decoder
    refused: expected only after frames the clients skipped (a gap in the VP8 chain)."""
    counts = {"audio": 0, "video": 0, "errors": 0}
    with av.open(str(path)) as container:
        for packet in container.demux():
            try:
                frames = packet.decode()
            except av.FFmpegError:
                counts["errors"] += 1
                continue
            for frame in frames:
                counts["video" if isinstance(frame, av.VideoFrame) else "audio"] += 1
    return counts


async def run_consult_step(
    server: Any,
    settings: Any,
    visits: int,
    clip: dict[str, list[bytes]],
    fps: int,
    duration: float,
    slot: tuple[int, int],
) -> dict[str, Any]:
    from consult.calls import links as calllinks
    from consult.calls import policy as calls
    from signaling.client import rtc_configuration

    data_dir: Path = server.data_dir
    db_path = data_dir / "consult.db"
    seeded = await asyncio.to_thread(seed_recorded_visits, db_path, visits, *slot)
    go = asyncio.Event()
    rng = random.Random(visits)
    seats: dict[tuple[int, str], Seat] = {}
    people: dict[tuple[int, str], Participant] = {}
    result: dict[str, Any] = {"visits": visits}
    ws_base = f"ws://{server.host}:{server.port}"
    async with aiohttp.ClientSession() as http:

        async def record_leg(v: int, role: str) -> None:
            seat = seats[(v, role)]
            p = Participant(clip, fps, go, rng, rtc_configuration(seat.welcome))
            people[(v, role)] = p
            await p.pc.setLocalDescription(await p.pc.createOffer())
            await seat.send({"type": "record_offer", "sdp": p.pc.localDescription.sdp})
            answer = await seat.expect("record_answer")
            await p.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            # aiortc put all its candidates in the offer; end-of-candidates as a browser sends it.
            await seat.send({"type": "record_candidate", "candidate": None})

        async def open_visit(v: int) -> None:
            visit = seeded[v]
            url = f"{ws_base}{calls.WS_PATH.format(room_id=visit['public_id'])}"
            host_token = calls.make_host_token(settings, visit["public_id"], visit["doctor_id"], time.time())
            patient_token = calllinks.make_token(
                settings, visit["public_id"], "patient", visit["nonce"], visit["starts_at"], visit["ends_at"]
            )
            seats[(v, "host")] = host = await Seat.join(http, url, host_token)
            seats[(v, "guest")] = guest = await Seat.join(http, url, patient_token)
            await guest.expect("waiting")
            await host.expect("peer_joined")
            await host.send({"type": "admit"})
            await asyncio.gather(host.expect("recording"), guest.expect("recording"))
            await asyncio.gather(record_leg(v, "host"), record_leg(v, "guest"))

        sem = asyncio.Semaphore(8)

        async def open_limited(v: int) -> None:
            async with sem:
                await open_visit(v)

        t = time.monotonic()
        try:
            await asyncio.gather(*(open_limited(v) for v in range(visits)))
            async with asyncio.timeout(60):
                await asyncio.gather(*(p.connected.wait() for p in people.values()))
            result["connect_s"] = round(time.monotonic() - t, 2)
            await asyncio.sleep(0.5)  # let the server's receivers start before the first keyframe
            go.set()
            softnet0 = softnet_drops()
            await asyncio.sleep(2.0)  # warm-up
            cpu0, t0, self0 = tree_cpu_seconds(server.pid), time.monotonic(), time.process_time()
            drops0 = udp_errors()
            await asyncio.sleep(duration)
            measure(result, server.pid, 2 * visits, cpu0, t0, self0)
            result["udp_rcvbuf_drops"] = udp_errors() - drops0
            stop_tracks(people, result)
            drops_end0 = udp_errors()
            result["senders_done_s"] = await senders_done(people)
            await asyncio.sleep(1.0)  # in-flight packets land
            await asyncio.sleep(1.5)  # and the server's next RTCP receiver reports (every ~1 s)
            result["rtcp"] = await rtcp_loss(people)
            result["softnet_drops"] = softnet_drops() - softnet0
            result["udp_unread_bytes_at_end"] = udp_unread_bytes()
            # The host ends each visit: the room finishes the files (recording_stopped), the
            # application stores their rows, then both sockets get `ended`.
            for v in range(visits):
                await seats[(v, "host")].send({"type": "end"})
            await asyncio.gather(*(s.expect("ended", timeout=60) for s in seats.values()))
            ids = [visit["id"] for visit in seeded]
            # A recorder behind real time reads its backlog before closing (for up to 120 s).
            deadline = time.monotonic() + 150
            while True:
                rows = await asyncio.to_thread(recording_rows, db_path, ids)
                if len(rows) >= 2 * visits and all(r["complete"] for r in rows):
                    result["udp_rcvbuf_drops_after_stop"] = udp_errors() - drops_end0
                    break
                if time.monotonic() > deadline:
                    log(f"only {len(rows)} recording rows of {2 * visits} after 150 s")
                    break
                await asyncio.sleep(0.25)
        finally:
            await asyncio.gather(*(p.pc.close() for p in people.values()), return_exceptions=True)
            await asyncio.gather(*(s.close() for s in seats.values()), return_exceptions=True)
    # Which participant each row belongs to: the visit, and the seat of its role.
    index = {visit["id"]: v for v, visit in enumerate(seeded)}
    seat_of = {"doctor": "host", "patient": "guest"}
    written: dict[tuple[int, str], dict[str, int]] = {}
    reports: dict[tuple[int, str], list[dict[str, Any]]] = {}
    holes: dict[tuple[int, str], list[list[float]]] = {}
    video_ends: dict[tuple[int, str], dict[str, bytes]] = {}
    mismatches = 0
    for row in rows:
        key = (index[row["visit_id"]], seat_of[row["role"]])
        ends = video_ends.setdefault(key, {})
        counted, found = await asyncio.to_thread(count_written, data_dir / row["path"], ends)
        holes.setdefault(key, []).extend(found)
        tracks = json.loads(row["tracks"])
        reports.setdefault(key, []).extend(tracks)
        reported = {t["kind"]: t["frames"] for t in tracks}
        mismatches += any(counted.get(k, 0) != reported.get(k, 0) for k in ("audio", "video"))
        previous = written.setdefault(key, {"audio": 0, "video": 0})  # a restarted leg: two files
        for kind in ("audio", "video"):
            previous[kind] += counted.get(kind, 0)
    keep = (
        "kind",
        "frames",
        "keyframes",
        "dropped_before_keyframe",
        "resyncs",
        "mux_errors",
        "rtp_received",
        "rtp_lost",
        "rtp_left",
    )
    details = {
        key: {
            "tracks": [{k: t.get(k) for k in keep} for t in reports.get(key, [])],
            "audio_holes_and_end": holes.get(key, []),
            "video_missing_at_start_end": video_gaps(
                people[key].tracks["video"], video_ends.get(key, {}), clip
            ),
            "client_rtp_sent": people[key].rtp_sent,
        }
        for key in people
    }
    # No allowance for Consult: it writes what aiortc's jitter buffers hold at the end too.
    account_loss(result, people, written, 2 * visits, len(rows), details, {"audio": 0, "video": 0})
    result["rows_vs_demux_mismatches"] = mismatches
    if rows:
        result["sample_decoded"] = await asyncio.to_thread(decode_check, data_dir / rows[0]["path"])
    for visit in seeded:  # keep the data dir small across steps
        shutil.rmtree(data_dir / "recordings" / visit["public_id"], ignore_errors=True)
    return result


async def consult_run(
    args: argparse.Namespace, run: int, clip: dict[str, list[bytes]], workdir: Path
) -> dict[str, Any]:
    """One run through Consult: a fresh server and data directory, steps up to the first loss."""
    from consult.core.config import ensure_secrets, load_settings

    side: dict[str, Any] = {"run": run, "steps": []}
    server = ConsultServer(
        workdir / f"data-{run}",
        log_dir=workdir / f"logs-{run}",
        host=BRIDGE_ADDR,
        env=consult_env(),
        startup_timeout=90,
    )
    await asyncio.to_thread(server.init, demo=True)
    # The keys the server signs with: its data dir's secrets.json (generated by init).
    settings = ensure_secrets(load_settings(env={}, data_dir=server.data_dir, tls=False))
    try:
        await server.astart()
    except ServerStartError as exc:
        raise SystemExit(str(exc)) from None
    log(f"run {run}: consult server pid {server.pid} on {server.origin}")
    slot = 0
    anchor = int(time.time())  # visit start times: distinct per (doctor, start) across steps
    try:
        for n in args.steps:
            r = await run_consult_step(server, settings, n, clip, args.fps, args.duration, (slot, anchor))
            slot += n
            log(f"run {run}:", json.dumps(r))
            side["steps"].append(r)
            if not server.running:
                raise RuntimeError(f"the Consult server died\n{server.logs()}")
            if not r["lossless"]:
                break
        side["server_tracebacks"] = server.stderr_path.read_text(errors="replace").count("Traceback")
        if side["server_tracebacks"]:
            log(f"server log has {side['server_tracebacks']} tracebacks:\n{server.logs()}")
    finally:
        await server.astop()
        shutil.rmtree(workdir / f"data-{run}", ignore_errors=True)
    side = summarize_side(side)
    side["lossy"] = any(not r["lossless"] for r in side["steps"])
    return side


def ratio(baseline: dict[str, Any], ours: float | None, key: str = "cpu_pct_per_stream") -> float | None:
    theirs = baseline.get(key)
    return round(theirs / ours, 1) if theirs and ours else None


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    clip = await asyncio.to_thread(encode_clip, args.width, args.height, args.fps, args.kbps, 3)
    kbps = sum(map(len, clip["video"])) * 8 / 3 / 1000
    log(f"clip: {len(clip['video'])} VP8 frames ({kbps:.0f} kbit/s), {len(clip['audio'])} Opus packets")
    if len(set(clip["video"])) != len(clip["video"]):
        log("the clip's VP8 frames are not all distinct: video_missing_at_start_end is unreliable")
    workdir = Path(tempfile.mkdtemp(prefix="recbench-"))
    try:
        runs = [await consult_run(args, i + 1, clip, workdir) for i in range(args.runs)]
        realtime = await run_baseline(args, "realtime_mediarecorder", args.mediarecorder_steps, workdir, clip)
        remux = await run_baseline(args, "pyav_remux", args.remux_steps, workdir, clip)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    per_stream = sorted(r["cpu_pct_per_stream"] for r in runs if r["cpu_pct_per_stream"] is not None)
    ours = per_stream[len(per_stream) // 2] if per_stream else None
    # The same at the clients' full schedule (CPU / clients_sent_ratio): on a loaded machine a
    # starved sender sends a fraction of its frames and every side then looks cheaper than it is.
    at_schedule = [r.get("cpu_pct_per_stream_at_schedule") for r in runs]
    scheduled = sorted(x for x in at_schedule if x is not None)
    ours_scheduled = scheduled[len(scheduled) // 2] if scheduled else None

    def brief(side: dict[str, Any]) -> dict[str, Any]:
        keys = (
            "max_visits_without_loss",
            "sustained",
            "cpu_pct_per_stream",
            "cpu_pct_per_stream_at_schedule",
            "cpu_measured_at_visits",
        )
        out = {k: side[k] for k in keys}
        out.update(frames_sent=side["frames_sent"], frames_lost=side["frames_lost"])
        out["steps"] = [
            {
                k: r.get(k)
                for k in (
                    "visits",
                    "server_cpu_pct",
                    "cpu_pct_per_stream",
                    "cpu_pct_per_stream_at_schedule",
                    "server_processes",
                    "clients_cpu_pct",
                    "frames_lost",
                    "udp_rcvbuf_drops",
                    "udp_rcvbuf_drops_after_stop",
                    "softnet_drops",
                    "senders_done_s",
                    "udp_unread_bytes_at_end",
                    "clients_sent_ratio",
                    "lossless",
                )
            }
            for r in side["steps"]
        ]
        return out

    return {
        "runs": len(runs),
        "lossy_runs": sum(r["lossy"] for r in runs),
        "max_visits_without_loss": min((r["max_visits_without_loss"] for r in runs), default=None),
        "ratio_vs_realtime_mediarecorder": ratio(realtime, ours),
        "ratio_vs_pyav_remux": ratio(remux, ours),
        # False: a side had no lossless step, its CPU was taken at its lowest (lossy) step,
        # where a starved process also shows less CPU than it would need.
        "ratios_at_sustained_steps": {
            "realtime_mediarecorder": realtime["sustained"] and all(r["sustained"] for r in runs),
            "pyav_remux": remux["sustained"] and all(r["sustained"] for r in runs),
        },
        "consult_cpu_pct_per_stream": ours,
        "ratios_at_schedule": {
            "realtime_mediarecorder": ratio(realtime, ours_scheduled, "cpu_pct_per_stream_at_schedule"),
            "pyav_remux": ratio(remux, ours_scheduled, "cpu_pct_per_stream_at_schedule"),
        },
        "consult_cpu_pct_per_stream_at_schedule": ours_scheduled,
        # The load generator shares the cores: its CPU (% of one core, the bench process) at
        # Consult's steps, so that the server's figures can be read against what was left.
        "sender_cpu_pct_max": max(
            (s.get("clients_cpu_pct") or 0 for r in runs for s in r["steps"]), default=None
        ),
        "consult_steps": args.steps,
        "consult_runs": [
            {**brief(r), "run": r["run"], "lossy": r["lossy"], "server_tracebacks": r["server_tracebacks"]}
            for r in runs
        ],
        "realtime_mediarecorder": brief(realtime),
        "pyav_remux": brief(remux),
        "holdback_allowed_per_stream": {"consult": {"audio": 0, "video": 0}, "baselines": HOLDBACK},
        "video": f"{args.width}x{args.height}@{args.fps} VP8 ~{kbps:.0f} kbit/s + Opus 20 ms",
        "cores": os.cpu_count(),
        "duration_s": args.duration,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: sorted({int(x) for x in s.split(",")})  # noqa: E731
    parser.add_argument(
        "--runs", type=int, help="Consult runs (each a fresh server), counted in lossy_runs (default 3)"
    )
    parser.add_argument(
        "--steps",
        type=ints,
        help="Consult's visit counts, tried in order up to the first loss (default 10,25,50)",
    )
    parser.add_argument(
        "--mediarecorder-steps",
        type=ints,
        help="visits through the realtime MediaRecorder baseline (default 1,2,4)",
    )
    parser.add_argument(
        "--remux-steps", type=ints, help="visits through the PyAV remux baseline (default 5,10,25,50)"
    )
    parser.add_argument("--duration", type=float, help="seconds of CPU measurement per step (default 10)")
    parser.add_argument(
        "--quick", action="store_true", help="a short run: 1 run, steps 5,10, baselines 1 and 5,10, 5 s each"
    )
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=int, default=20)
    parser.add_argument("--kbps", type=int, default=1200, help="target VP8 bit rate of the clip")
    parser.add_argument("--serve", choices=["realtime_mediarecorder", "pyav_remux"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        args.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(serve(args))
        return
    quick = {"runs": 1, "steps": [5, 10], "mediarecorder_steps": [1], "remux_steps": [5, 10], "duration": 5.0}
    full = {
        "runs": 3,
        "steps": [10, 25, 50],
        "mediarecorder_steps": [1, 2, 4],
        "remux_steps": [5, 10, 25, 50],
        "duration": 10.0,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    enter_private_netns()  # before any thread: every child inherits the namespace
    before = loadavg()
    print(f"load average before: {before}", flush=True)
    result = asyncio.run(bench(args))
    after = loadavg()
    print(f"load average after: {after}", flush=True)
    result["loadavg_before"], result["loadavg_after"] = before, after
    print(json.dumps(result))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
