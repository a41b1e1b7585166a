"""Benchmark: N concurrent recorded visits through the real Consult server, against aiortc's
MediaRecorder.

Default mode (through Consult): `python -m consult --data-dir D serve --no-tls` runs as a
subprocess (after `init` and `demo`, with `CONSULT_RECORDING_POLICY=always`). For each step the
bench writes N confirmed visits with both consents already stored (`visits.recording`,
`recording_consent_patient`, `recording_consent_doctor`) into its database, and for each visit
two lightweight participants join over the WebSocket with the documented protocol
(docs/protocol.md): the doctor with a host token minted by `consult.calls.make_host_token`, the
patient with a signed call link token (`consult.calllinks.make_token`), both signed with the
data directory's secrets.json. The host admits the patient; on the server's `recording`
message each participant opens its recording leg (`record_offer` / `record_answer` /
`record_candidate null`) from an aiortc peer that sends a pre-encoded 640x480 VP8 clip and
Opus audio (encoded once at start and looped, so the load generator stays cheap). The P2P
call leg between the two participants is not run: it does not touch the server's media path
(the recorder is a separate send-only leg per participant), so it adds nothing to the load
under test. At the end the host sends `end`; the room finishes the files and the application
stores a `recordings` row per file. Frames written are counted by demuxing every file with
PyAV (and checked against the rows' tracks JSON). The server's CPU is read from
/proc/PID/stat (utime + stime, all its threads) over a measurement window.

`--direct`: the older mode, a tiny server subprocess hosting one
`signaling.recording.RecordingSession` per visit directly, offers over plain HTTP.

Baseline (both modes, same run): the same input through aiortc's `MediaRecorder` in another
subprocess (`--serve baseline`), which decodes and re-encodes.

Frame loss: frames each client sent against frames in the files, allowing for the frames
aiortc's jitter buffers still hold when a leg closes (1 video, 4 audio per participant).

The whole run happens in a private network namespace (re-entered at start, needs root): aioice
skips 127.0.0.1, so the bridge address 10.99.0.1 (bench/common.py) carries the media, and no
packet can leave the machine. The last line of stdout is one JSON object.

    .venv/bin/python bench/recording.py                       # steps 10,20,25,30 via Consult
    .venv/bin/python bench/recording.py --steps 25 --duration 10
    .venv/bin/python bench/recording.py --direct              # RecordingSession without the app
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
from common import BRIDGE_ADDR, ConsultServer, ServerStartError, enter_private_netns  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Frames aiortc's jitter buffers keep when a leg closes (video: 1, audio: prefetch 4).
HOLDBACK = {"video": 1, "audio": 4}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def udp_errors() -> int:
    """Datagrams the kernel dropped in this network namespace (full receive buffers)."""
    lines = [
        line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")
    ]
    stats = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return stats["RcvbufErrors"]


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ----- server processes ------------------------------------------------------------------------


class BaselineSession:
    """aiortc's MediaRecorder per participant: decodes and re-encodes every frame.

    One recorder per track: with both tracks in one MediaRecorder the file loses its video
    when audio arrives first (docs/recording.md), which would flatter the baseline.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pcs: list[RTCPeerConnection] = []
        self.recorders: list[Any] = []

    async def add_participant_offer(self, role: str, sdp: str) -> str:
        from aiortc.contrib.media import MediaRecorder

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        tracks: list[MediaStreamTrack] = []
        pc.on("track", tracks.append)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        for track in tracks:
            recorder = MediaRecorder(str(self.directory / f"{role}-{track.kind}.webm"))
            recorder.addTrack(track)
            await recorder.start()
            self.recorders.append(recorder)
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    async def close(self) -> list[Any]:
        for recorder in self.recorders:
            await recorder.stop()
        for pc in self.pcs:
            await pc.close()
        return []


async def serve(mode: str, port: int, directory: Path) -> None:
    from signaling.recording import RecordingSession

    sessions: dict[str, Any] = {}
    if os.environ.get("BENCH_SWITCH"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH"]))

    def session_for(visit: str) -> Any:
        if visit not in sessions:
            d = directory / visit
            d.mkdir(mode=0o700)
            sessions[visit] = (
                RecordingSession(d, ice_servers=[], label=visit) if mode == "ours" else BaselineSession(d)
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
        return web.json_response({"files": [f.as_dict() for f in files]})

    lag = {"max_ms": 0.0, "over_50ms": 0, "gc_max_ms": 0.0, "gc_total_ms": 0.0}

    async def watch_loop() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            late = (time.monotonic() - t - 0.01) * 1000
            lag["max_ms"] = max(lag["max_ms"], late)
            lag["over_50ms"] += late > 50

    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            ms = (time.perf_counter() - gc_start[0]) * 1000
            lag["gc_max_ms"] = max(lag["gc_max_ms"], ms)
            lag["gc_total_ms"] += ms

    import gc

    gc.callbacks.append(on_gc)
    watcher = asyncio.get_running_loop().create_task(watch_loop())

    async def stats(request: web.Request) -> web.Response:
        result = dict(lag)
        if request.query.get("reset"):
            lag.update({"max_ms": 0.0, "over_50ms": 0, "gc_max_ms": 0.0, "gc_total_ms": 0.0})
        return web.json_response(result)

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/visits/{visit}/offer", offer)
    app.router.add_post("/visits/{visit}/close", close)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    watcher.cancel()
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
    """Loops pre-encoded packets in real time; aiortc's RTCRtpSender sends av.Packet as is."""

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
        self.sent = 0
        self.start = 0.0

    async def recv(self) -> av.Packet:
        if self.sent == 0:
            await self.go.wait()
            self.start = time.monotonic()
        if self.stopped:
            await asyncio.Event().wait()  # the sender is torn down with the connection
            raise MediaStreamError
        await asyncio.sleep(max(0.0, self.start + self.sent * self.interval - time.monotonic()))
        packet = av.Packet(self.packets[(self.phase + self.sent) % len(self.packets)])
        packet.pts = self.sent * self.ticks
        packet.time_base = self.time_base
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


async def run_step(
    base: str, pid: int, visits: int, clip: dict[str, list[bytes]], fps: int, duration: float, tag: str
) -> dict[str, Any]:
    go = asyncio.Event()
    rng = random.Random(visits)
    roles = ("host", "guest")
    people = {(v, r): Participant(clip, fps, go, rng) for v in range(visits) for r in roles}
    result: dict[str, Any] = {"visits": visits}
    async with aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(8)

        async def connect(key: tuple[int, str]) -> None:
            async with sem:
                await people[key].connect(http, f"{base}/visits/{tag}-{key[0]}/offer", key[1])

        t = time.monotonic()
        await asyncio.gather(*(connect(k) for k in people))
        async with asyncio.timeout(60):
            await asyncio.gather(*(p.connected.wait() for p in people.values()))
        result["connect_s"] = round(time.monotonic() - t, 2)
        await asyncio.sleep(0.5)  # let the server's receivers start before the first keyframe
        go.set()
        await asyncio.sleep(2.0)  # warm-up
        cpu0, t0, self0 = cpu_seconds(pid), time.monotonic(), time.process_time()
        drops0 = udp_errors()
        async with http.get(f"{base}/stats?reset=1") as resp:
            await resp.read()
        await asyncio.sleep(duration)
        cpu1, t1, self1 = cpu_seconds(pid), time.monotonic(), time.process_time()
        result["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
        result["server_cpu_pct_per_visit"] = round(result["server_cpu_pct"] / visits, 2)
        result["clients_cpu_pct"] = round(100 * (self1 - self0) / (t1 - t0), 1)
        result["server_rss_mib"] = round(rss_mib(pid), 1)
        result["udp_rcvbuf_drops"] = udp_errors() - drops0
        async with http.get(f"{base}/stats") as resp:
            result["server_loop"] = await resp.json()
        for p in people.values():
            for track in p.tracks.values():
                track.stopped = True
        await asyncio.sleep(1.0)  # in-flight packets land
        closes = await asyncio.gather(
            *(http.post(f"{base}/visits/{tag}-{v}/close") for v in range(visits)), return_exceptions=True
        )
        written: dict[tuple[int, str], dict[str, Any]] = {}
        for v, resp in enumerate(closes):
            if isinstance(resp, BaseException):
                continue
            async with resp:
                for f in (await resp.json())["files"]:
                    written[(v, f["role"])] = {t["kind"]: t for t in f["tracks"]}
        await asyncio.gather(*(p.pc.close() for p in people.values()))
    sent = {k: sum(p.tracks[k].sent for p in people.values()) for k in ("audio", "video")}
    result["frames_sent"] = sent
    if written or tag != "baseline":
        lost = {"audio": 0, "video": 0}
        for key, p in people.items():
            tracks = written.get(key, {})
            for kind in ("audio", "video"):
                got = tracks.get(kind, {}).get("frames", 0)
                lost[kind] += max(0, p.tracks[kind].sent - got - HOLDBACK[kind])
        result["frames_lost"] = lost
        result["files"] = len(written)
    return result


def start_server(mode: str, directory: Path) -> tuple[subprocess.Popen[str], str]:
    port = 18000 + os.getpid() % 1000 + (0 if mode == "ours" else 1)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port", str(port), "--dir", str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"{mode} server did not start")
    return proc, f"http://{HOST}:{port}"


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_baseline(
    args: argparse.Namespace, workdir: Path, clip: dict[str, list[bytes]]
) -> dict[str, Any]:
    proc, base = await asyncio.to_thread(start_server, "baseline", workdir / "baseline")
    try:
        b = await run_step(base, proc.pid, args.baseline_visits, clip, args.fps, args.duration, "baseline")
        log("baseline", json.dumps(b))
    finally:
        stop_server(proc)
    return b


async def bench_direct(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    clip = await asyncio.to_thread(encode_clip, args.width, args.height, args.fps, args.kbps, 3)
    kbps = sum(map(len, clip["video"])) * 8 / 3 / 1000
    log(f"clip: {len(clip['video'])} VP8 frames ({kbps:.0f} kbit/s), {len(clip['audio'])} Opus packets")
    workdir = Path(tempfile.mkdtemp(prefix="recbench-"))
    steps = sorted({*args.steps, args.visits})
    summary: dict[str, Any] = {"steps": []}
    try:
        proc, base = await asyncio.to_thread(start_server, "ours", workdir / "ours")
        max_ok = 0
        main: dict[str, Any] | None = None
        try:
            for n in steps:
                if time.monotonic() - t_start > args.budget_s and main is not None:
                    log(f"time budget spent; not trying {n} visits")
                    break
                r = await run_step(base, proc.pid, n, clip, args.fps, args.duration, f"s{n}")
                log(json.dumps(r))
                summary["steps"].append(r)
                lossless = sum(r["frames_lost"].values()) == 0 and r["files"] == 2 * n
                if n == args.visits:
                    main = r
                if lossless:
                    max_ok = max(max_ok, n)
                elif n >= args.visits:
                    break
                shutil.rmtree(workdir / "ours", ignore_errors=True)
                (workdir / "ours").mkdir()
        finally:
            stop_server(proc)
        b = await run_baseline(args, workdir, clip)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ours = main["server_cpu_pct_per_visit"] if main else float("nan")
    theirs = b["server_cpu_pct_per_visit"]
    return {
        "visits": main["visits"] if main else None,
        "server_cpu_pct_per_visit": ours,
        "baseline_cpu_pct_per_visit": theirs,
        "ratio": round(theirs / ours, 1) if ours else None,
        "max_visits_without_loss": max_ok,
        "frames_lost_at_visits": main["frames_lost"] if main else None,
        "video": f"{args.width}x{args.height}@{args.fps} VP8 ~{kbps:.0f} kbit/s + Opus 20 ms",
        "cores": os.cpu_count(),
        "mode": "direct",
    }


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


def count_written(path: Path) -> tuple[dict[str, int], list[list[float]]]:
    """Frames per kind in a recorded file, counted by demuxing it with PyAV; and where the
    audio has holes (`[at_s, missing_ms]`, for a diagnosis of lost frames)."""
    counts = {"audio": 0, "video": 0}
    holes: list[list[float]] = []
    last_audio: float | None = None
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size == 0 or packet.pts is None:
                continue
            counts[packet.stream.type] = counts.get(packet.stream.type, 0) + 1
            if packet.stream.type == "audio":
                t = float(packet.pts * packet.time_base)
                if last_audio is not None and t - last_audio > 0.030:
                    holes.append([round(last_audio, 2), round((t - last_audio) * 1000 - 20)])
                last_audio = t
    if last_audio is not None:
        holes.append([round(last_audio, 2), -1])  # the end of the audio, for reference
    return counts, holes


def decode_check(path: Path) -> dict[str, int]:
    """Decode one file completely (a sample per step): every frame must decode."""
    counts = {"audio": 0, "video": 0}
    with av.open(str(path)) as container:
        for frame in container.decode(*container.streams):
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
            await asyncio.sleep(2.0)  # warm-up
            cpu0, t0, self0 = cpu_seconds(server.pid), time.monotonic(), time.process_time()
            drops0 = udp_errors()
            await asyncio.sleep(duration)
            cpu1, t1, self1 = cpu_seconds(server.pid), time.monotonic(), time.process_time()
            result["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
            result["server_cpu_pct_per_visit"] = round(result["server_cpu_pct"] / visits, 2)
            result["clients_cpu_pct"] = round(100 * (self1 - self0) / (t1 - t0), 1)
            result["server_rss_mib"] = round(rss_mib(server.pid), 1)
            result["udp_rcvbuf_drops"] = udp_errors() - drops0
            for p in people.values():
                for track in p.tracks.values():
                    track.stopped = True
            await asyncio.sleep(1.0)  # in-flight packets land
            # The host ends each visit: the room finishes the files (recording_stopped), the
            # application stores their rows, then both sockets get `ended`.
            for v in range(visits):
                await seats[(v, "host")].send({"type": "end"})
            await asyncio.gather(*(s.expect("ended", timeout=60) for s in seats.values()))
            ids = [visit["id"] for visit in seeded]
            deadline = time.monotonic() + 60
            while True:
                rows = await asyncio.to_thread(recording_rows, db_path, ids)
                if len(rows) >= 2 * visits and all(r["complete"] for r in rows):
                    break
                if time.monotonic() > deadline:
                    log(f"only {len(rows)} recording rows of {2 * visits} after 60 s")
                    break
                await asyncio.sleep(0.25)
        finally:
            await asyncio.gather(*(p.pc.close() for p in people.values()), return_exceptions=True)
            await asyncio.gather(*(s.close() for s in seats.values()), return_exceptions=True)
    sent = {k: sum(p.tracks[k].sent for p in people.values()) for k in ("audio", "video")}
    result["frames_sent"] = sent
    # Which participant each row belongs to: the visit, and the seat of its role.
    index = {visit["id"]: v for v, visit in enumerate(seeded)}
    seat_of = {"doctor": "host", "patient": "guest"}
    written: dict[tuple[int, str], dict[str, int]] = {}
    reports: dict[tuple[int, str], list[dict[str, Any]]] = {}
    holes: dict[tuple[int, str], list[list[float]]] = {}
    mismatches = 0
    for row in rows:
        key = (index[row["visit_id"]], seat_of[row["role"]])
        counted, found = await asyncio.to_thread(count_written, data_dir / row["path"])
        holes.setdefault(key, []).extend(found)
        tracks = json.loads(row["tracks"])
        reports.setdefault(key, []).extend(tracks)
        reported = {t["kind"]: t["frames"] for t in tracks}
        mismatches += any(counted.get(k, 0) != reported.get(k, 0) for k in ("audio", "video"))
        previous = written.setdefault(key, {"audio": 0, "video": 0})  # a restarted leg: two files
        for kind in ("audio", "video"):
            previous[kind] += counted.get(kind, 0)
    lost = {"audio": 0, "video": 0}
    lossy: list[dict[str, Any]] = []
    for key, p in people.items():
        missing = {}
        for kind in ("audio", "video"):
            got = written.get(key, {}).get(kind, 0)
            missing[kind] = max(0, p.tracks[kind].sent - got - HOLDBACK[kind])
            lost[kind] += missing[kind]
        if any(missing.values()):
            keep = ("kind", "frames", "keyframes", "dropped_before_keyframe", "resyncs", "mux_errors")
            lossy.append(
                {
                    "visit": key[0],
                    "role": key[1],
                    "sent": {k: t.sent for k, t in p.tracks.items()},
                    "missing": missing,
                    "tracks": [{k: t.get(k) for k in keep} for t in reports.get(key, [])],
                    "audio_holes_and_end": holes.get(key, []),
                }
            )
    if lossy:
        log(f"{len(lossy)} participants lost frames:", json.dumps(lossy[:10]))
    result["participants_with_loss"] = len(lossy)
    result["frames_written"] = {k: sum(w[k] for w in written.values()) for k in ("audio", "video")}
    result["frames_lost"] = lost
    result["files"] = len(rows)
    result["rows_vs_demux_mismatches"] = mismatches
    if rows:
        result["sample_decoded"] = await asyncio.to_thread(decode_check, data_dir / rows[0]["path"])
    for visit in seeded:  # keep the data dir small across steps
        shutil.rmtree(data_dir / "recordings" / visit["public_id"], ignore_errors=True)
    return result


async def bench_consult(args: argparse.Namespace) -> dict[str, Any]:
    from consult.core.config import ensure_secrets, load_settings

    t_start = time.monotonic()
    clip = await asyncio.to_thread(encode_clip, args.width, args.height, args.fps, args.kbps, 3)
    kbps = sum(map(len, clip["video"])) * 8 / 3 / 1000
    log(f"clip: {len(clip['video'])} VP8 frames ({kbps:.0f} kbit/s), {len(clip['audio'])} Opus packets")
    workdir = Path(tempfile.mkdtemp(prefix="recbench-"))
    steps = sorted({*args.steps, args.visits})
    summary: dict[str, Any] = {"steps": []}
    server = ConsultServer(
        workdir / "data", log_dir=workdir / "logs", host=BRIDGE_ADDR, env=consult_env(), startup_timeout=60
    )
    try:
        await asyncio.to_thread(server.init, demo=True)
        # The keys the server signs with: its data dir's secrets.json (generated by init).
        settings = ensure_secrets(load_settings(env={}, data_dir=server.data_dir, tls=False))
        try:
            await server.astart()
        except ServerStartError as exc:
            raise SystemExit(str(exc)) from None
        log(f"consult server pid {server.pid} on {server.origin}")
        max_ok = 0
        main: dict[str, Any] | None = None
        slot = 0
        anchor = int(time.time())  # visit start times: distinct per (doctor, start) across steps
        try:
            for n in steps:
                if time.monotonic() - t_start > args.budget_s and main is not None:
                    log(f"time budget spent; not trying {n} visits")
                    break
                r = await run_consult_step(server, settings, n, clip, args.fps, args.duration, (slot, anchor))
                slot += n
                log(json.dumps(r))
                summary["steps"].append(r)
                lossless = sum(r["frames_lost"].values()) == 0 and r["files"] == 2 * n
                if n == args.visits:
                    main = r
                if lossless:
                    max_ok = max(max_ok, n)
                elif n >= args.visits:
                    break
                if not server.running:
                    raise RuntimeError(f"the Consult server died\n{server.logs()}")
            errors = server.stderr_path.read_text(errors="replace").count("Traceback")
            if errors:
                log(f"server log has {errors} tracebacks:\n{server.logs()}")
        finally:
            await server.astop()
        b = await run_baseline(args, workdir, clip)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ours = main["server_cpu_pct_per_visit"] if main else float("nan")
    theirs = b["server_cpu_pct_per_visit"]
    return {
        "visits": main["visits"] if main else None,
        "server_cpu_pct_per_visit": ours,
        "baseline_cpu_pct_per_visit": theirs,
        "ratio": round(theirs / ours, 1) if ours else None,
        "max_visits_without_loss": max_ok,
        "frames_lost_at_visits": main["frames_lost"] if main else None,
        "video": f"{args.width}x{args.height}@{args.fps} VP8 ~{kbps:.0f} kbit/s + Opus 20 ms",
        "cores": os.cpu_count(),
        "mode": "consult",
        "server_tracebacks": errors,
        "call_leg": "not run: only the recording legs load the server",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--visits", type=int, default=25, help="visits of the headline measurement")
    parser.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",")],
        help="visit counts tried in order, stopping at the first loss at or above --visits"
        " (default 10,20,25,30; with --direct 5,10,15,20,25,30)",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="host RecordingSession in a bare server process instead of going through Consult",
    )
    parser.add_argument("--duration", type=float, default=12, help="seconds of measurement per step")
    parser.add_argument("--baseline-visits", type=int, default=1, help="visits through MediaRecorder")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=int, default=20)
    parser.add_argument("--kbps", type=int, default=1200, help="target VP8 bit rate of the clip")
    parser.add_argument("--budget-s", type=float, default=300, help="stop stepping up after this long")
    parser.add_argument("--serve", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        args.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(serve(args.serve, args.port, args.dir))
        return
    enter_private_netns()  # before any thread: every child inherits the namespace
    if args.steps is None:
        args.steps = [5, 10, 15, 20, 25, 30] if args.direct else [10, 20, 25, 30]
    result = asyncio.run(bench_direct(args) if args.direct else bench_consult(args))
    print(json.dumps(result))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
