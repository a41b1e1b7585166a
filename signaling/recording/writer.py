"""One participant's leg written to one Matroska/WebM file, straight from encoded frames.

`write()` runs on the event loop (see passthrough.py): it only stamps the frame and appends
it to a deque. `drain()` runs in a worker thread (the session calls it every few tens of ms)
and does the muxing and file I/O, so a slow disk never stalls the event loop. Nothing here
decodes or encodes: VP8/H.264 frames and Opus packets are muxed as they came.

Timing: each track's RTP clock is anchored to the server's monotonic clock at the arrival of
its first packet; a frame's time is `anchor + rtp_ticks / clock_rate`. Audio and video of one
browser share its capture clock, so this keeps them in sync to within the difference of their
network and encoder delays (a few tens of ms). A discontinuity of the RTP clock (more than
`RESYNC_S` between consecutive frames: sender restarted, SSRC changed) or a time more than
`RESYNC_S` ahead of the arrival re-anchors the track. A time *behind* the arrival does not: that
is this server running late (a loaded machine), and the sender's own clock is the better one;
re-anchoring there cut the file's timeline into 2 s holes while every frame was still in it.

Crash safety: the file is written progressively (clusters of at most `CLUSTER_MS`, each written
out as it closes; the OS has the bytes even if the process is killed), so a file cut by
`kill -9` plays up to about the last second before the crash. A clean close adds the cues
(seek index) and the duration. A write that fails (disk full) stops the leg; the file is still
described on close, with `complete = False` and the reason in `error`.

Hand-off: the event loop only ever appends to the deque and the worker only ever pops from its
left (both atomic), so no frame can be lost between them without a lock on the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from signaling.recording.bitstream import keyframe_info, opus_duration_samples

log = logging.getLogger(__name__)

MS = Fraction(1, 1000)
CLUSTER_MS = 1000
# Longest time the muxer holds packets of one track waiting for the other (interleaving).
INTERLEAVE_US = 1_000_000
RESYNC_S = 2.0
# Placeholder size when the container has to open before any video keyframe (the decoder
# reads the real size from each keyframe; Matroska's value is only a hint).
DEFAULT_SIZE = (640, 480)


@dataclass
class TrackStats:
    kind: str
    codec: str | None = None
    frames: int = 0
    bytes: int = 0
    keyframes: int = 0
    # Video frames dropped because no keyframe had been seen yet.
    dropped_before_keyframe: int = 0
    mux_errors: int = 0
    resyncs: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    # RTP packets the leg received, and those it never got (sequence gaps), set at its end;
    # packets left in aiortc's jitter buffer when the leg ended (behind a gap: not written).
    rtp_received: int = 0
    rtp_lost: int = 0
    rtp_left: int = 0
    first_pts_ms: int | None = None
    last_end_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "codec": self.codec,
            "frames": self.frames,
            "bytes": self.bytes,
            "keyframes": self.keyframes,
            "dropped_before_keyframe": self.dropped_before_keyframe,
            "mux_errors": self.mux_errors,
            "resyncs": self.resyncs,
            "rtp_received": self.rtp_received,
            "rtp_lost": self.rtp_lost,
            "rtp_left": self.rtp_left,
            "sizes": [list(s) for s in self.sizes],
            "start_s": None if self.first_pts_ms is None else self.first_pts_ms / 1000,
        }


@dataclass(frozen=True)
class RecordingFile:
    """What a finished leg left on disk."""

    role: str
    path: Path
    started_at: float  # unix time of the file's time zero
    duration_s: float
    size: int
    sha256: str
    tracks: tuple[dict[str, Any], ...]
    # False when a write failed (disk full, I/O error): the file holds what was written before.
    complete: bool = True
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "path": str(self.path),
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "size": self.size,
            "sha256": self.sha256,
            "tracks": list(self.tracks),
            "complete": self.complete,
            "error": self.error,
        }


@dataclass
class _Pending:
    kind: str
    t: float
    data: bytes
    key: bool
    duration_ms: int


class ParticipantWriter:
    def __init__(
        self,
        directory: Path,
        role: str,
        *,
        audio: bool,
        video_codec: str | None,
        video_wait_s: float = 3.0,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.role = role
        self.expect_audio = audio
        self.video_codec = video_codec  # "vp8" or "h264"; None: no video negotiated
        self.video_wait_s = video_wait_s
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._anchor: dict[str, float] = {}
        self._last_ts: dict[str, int] = {}  # RTP time of each track's previous frame
        self._queue: deque[_Pending] = deque()
        self._first_frame_at: float | None = None
        self._t0: float | None = None
        self._container: Any = None
        self._file: Any = None
        self._streams: dict[str, Any] = {}
        self._last_pts: dict[str, int] = {}
        self._video_started = False
        self._failed = False
        self._error: str | None = None
        self._closed = False
        self.path: Path | None = None
        self.started_at: float | None = None
        self.last_keyframe_at: float | None = None
        self.stats = {"audio": TrackStats("audio", "opus"), "video": TrackStats("video", video_codec)}

    # ----- called from the event loop ------------------------------------------------------

    def note_first_packet(self, kind: str) -> None:
        self._anchor.setdefault(kind, self._monotonic())

    @property
    def video_started(self) -> bool:
        return self._video_started

    def write(self, kind: str, clock_rate: int, data: bytes, timestamp: int) -> None:
        if self._closed or self._failed:
            return
        now = self._monotonic()
        stats = self.stats[kind]
        anchor = self._anchor.setdefault(kind, now - timestamp / clock_rate)
        t = anchor + timestamp / clock_rate
        last = self._last_ts.get(kind)
        self._last_ts[kind] = timestamp
        if t - now > RESYNC_S or (last is not None and abs(timestamp - last) > RESYNC_S * clock_rate):
            self._anchor[kind] = now - timestamp / clock_rate
            t = now
            stats.resyncs += 1
        key = False
        duration_ms = 0
        if kind == "video":
            key, size = keyframe_info(self.video_codec or "", data)
            if not self._video_started:
                if not key:
                    stats.dropped_before_keyframe += 1
                    return
                self._video_started = True
            if key:
                self.last_keyframe_at = now
                stats.keyframes += 1
                if size and (not stats.sizes or stats.sizes[-1] != size):
                    stats.sizes.append(size)
        else:
            duration_ms = opus_duration_samples(data) // 48
        if self._first_frame_at is None:
            self._first_frame_at = now
        # deque.append is atomic: no lock shared with the muxing thread on this path.
        self._queue.append(_Pending(kind, t, bytes(data), key, duration_ms))

    # ----- called from a worker thread ---------------------------------------------------------

    def drain(self) -> None:
        """Mux everything queued so far (opening the file once it can be)."""
        with self._lock:
            self._drain_locked(final=False)

    def _take(self) -> list[_Pending]:
        """Everything queued so far, removed from the queue one atomic popleft at a time: a
        frame the event loop appends meanwhile is either taken here or stays for the next
        drain (copying then clearing the deque would drop it)."""
        taken: list[_Pending] = []
        while True:
            try:
                taken.append(self._queue.popleft())
            except IndexError:
                return taken

    def _drain_locked(self, final: bool) -> None:
        if self._failed:
            self._take()  # a failed leg keeps nothing (write() stops queueing once it sees it)
            return
        if self._container is None:
            if not self._queue or not (final or self._ready(self._monotonic())):
                return
            # Audio queued while waiting for the first keyframe goes first, in time order.
            pending = sorted(self._take(), key=lambda p: p.t)
            try:
                self._open(pending[0].t if pending else self._monotonic())
            except (OSError, av.FFmpegError) as exc:
                self._fail(f"could not open the recording file: {exc}")
                return
        else:
            pending = self._take()
        for item in pending:
            if self._failed:
                return
            self._mux(item)

    def _ready(self, now: float) -> bool:
        # Wait for the first video keyframe (it gives the picture size), but not forever:
        # a participant with the camera off still gets an audio recording.
        if self.video_codec is None or self._video_started:
            return True
        return self._first_frame_at is not None and now - self._first_frame_at >= self.video_wait_s

    def _open(self, t0: float) -> None:
        matroska = self.video_codec == "h264"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall()))
        name = f"{self.role}-{stamp}-{secrets.token_hex(6)}.{'mkv' if matroska else 'webm'}"
        path = self.directory / name
        # Exclusive create, private from the first byte, never through a symlink.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self.path = path
        try:
            container = av.open(
                self._file,
                "w",
                format="matroska" if matroska else "webm",
                options={
                    "cluster_time_limit": str(CLUSTER_MS),
                    "flush_packets": "1",
                    "max_interleave_delta": str(INTERLEAVE_US),
                },
            )
            if self.video_codec is not None:
                sizes = self.stats["video"].sizes
                width, height = sizes[0] if sizes else DEFAULT_SIZE
                stream = container.add_mux_stream(self.video_codec, width=width, height=height)
                stream.time_base = MS
                self._streams["video"] = stream
            if self.expect_audio:
                # An Opus stream with a codec context makes PyAV write the OpusHead codec
                # private data that browsers require; its encoder is opened, never fed.
                stream = container.add_stream("libopus", rate=48000, layout="stereo")
                stream.time_base = MS
                self._streams["audio"] = stream
        except Exception as exc:
            self._fail(f"could not open the recording file: {exc}")
            raise
        self._container = container
        self._t0 = t0
        self.started_at = self._wall() - (self._monotonic() - self._t0)

    def _mux(self, item: _Pending) -> None:
        stream = self._streams.get(item.kind)
        if stream is None:
            return
        stats = self.stats[item.kind]
        assert self._t0 is not None
        pts = max(0, round((item.t - self._t0) * 1000))
        last = self._last_pts.get(item.kind)
        if last is not None and pts <= last:
            pts = last + 1
        packet = av.Packet(item.data)
        packet.stream = stream
        packet.pts = packet.dts = pts
        packet.time_base = MS
        if item.duration_ms:
            packet.duration = item.duration_ms
        if item.key or item.kind == "audio":
            packet.is_keyframe = True
        try:
            self._container.mux(packet)
        except av.FFmpegError:
            stats.mux_errors += 1
            log.warning("recording %s: dropped a %s packet the muxer refused", self.path, item.kind)
            return
        except OSError as exc:
            self._fail(f"write failed: {exc}")
            return
        self._last_pts[item.kind] = pts
        stats.frames += 1
        stats.bytes += len(item.data)
        if stats.first_pts_ms is None:
            stats.first_pts_ms = pts
        stats.last_end_ms = max(stats.last_end_ms, pts + item.duration_ms)

    def _fail(self, why: str) -> None:
        self._failed = True
        self._error = self._error or why
        log.error("recording %s (%s) stopped: %s", self.path, self.role, why)

    # ----- finishing (blocking: run it in a thread) ------------------------------------------

    def close(self) -> RecordingFile | None:
        """Finish the file (cues, duration), fsync it and describe it; None if nothing came.

        Call it after the leg's connection is closed (no more `write()`)."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            self._drain_locked(final=True)
            container, self._container = self._container, None
            if container is not None:
                try:
                    container.close()
                except (av.FFmpegError, OSError) as exc:
                    log.exception("recording %s: could not write the trailer", self.path)
                    self._fail(f"could not write the trailer: {exc}")
            if self._file is not None:
                try:
                    self._file.flush()
                    os.fsync(self._file.fileno())
                    if self.path is not None:  # its name too (a shared directory's server)
                        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                        try:
                            os.fsync(dir_fd)
                        finally:
                            os.close(dir_fd)
                except OSError as exc:
                    self._fail(f"could not flush the file: {exc}")
                finally:
                    with contextlib.suppress(OSError):
                        self._file.close()
            if self.path is None:
                return None
            digest = hashlib.sha256()
            size = 0
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            tracks = tuple(s.as_dict() for k, s in self.stats.items() if k in self._streams)
            ends = [s.last_end_ms for k, s in self.stats.items() if k in self._streams and s.frames]
            starts = [s.first_pts_ms for k, s in self.stats.items() if s.first_pts_ms is not None]
            duration = (max(ends) - min(starts)) / 1000 if ends and starts else 0.0
            return RecordingFile(
                role=self.role,
                path=self.path,
                started_at=self.started_at or self._wall(),
                duration_s=duration,
                size=size,
                sha256=digest.hexdigest(),
                tracks=tracks,
                complete=not self._failed,
                error=self._error,
            )
