"""The recording writer on its own (no WebRTC): the event loop's hand-off of frames to the muxing
thread loses none, and a write that fails leaves a file described as incomplete."""

from __future__ import annotations

import itertools
import os
import sys
import threading
from pathlib import Path

import av
import pytest

from signaling.recording.writer import ParticipantWriter

# Opus TOC: config 31 (CELT, 20 ms), one frame; the muxer does not decode the payload.
OPUS = bytes([31 << 3]) + bytes(40)


def demuxed_packets(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for p in container.demux() if p.size)


@pytest.fixture
def tight_thread_switching():
    """Let threads switch every 10 µs, so the appender runs inside the worker's drain."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


@pytest.mark.parametrize("trial", range(3))
def test_frames_appended_while_the_worker_drains_are_all_muxed(tmp_path, tight_thread_switching, trial):
    # A camera that is slow to send its first keyframe: audio piles up, then the worker opens
    # the file and sorts the backlog while the event loop (here a thread) keeps appending.
    writer = ParticipantWriter(tmp_path, "host", audio=True, video_codec="vp8", video_wait_s=0.0)
    backlog, live = 20_000, 20_000
    for i in range(backlog):
        writer.write("audio", 48000, OPUS, i * 960)
    started = threading.Event()

    def event_loop() -> None:
        started.set()
        for i in range(backlog, backlog + live):
            writer.write("audio", 48000, OPUS, i * 960)

    appender = threading.Thread(target=event_loop)
    appender.start()
    started.wait()
    while appender.is_alive():
        writer.drain()
    appender.join()
    result = writer.close()
    assert result is not None and result.complete
    audio = writer.stats["audio"]
    assert audio.frames + audio.mux_errors == backlog + live, "frames vanished in the hand-off"
    assert audio.mux_errors == 0
    assert demuxed_packets(result.path) == backlog + live


def test_a_write_that_fails_leaves_an_incomplete_file_with_its_reason(tmp_path, caplog):
    writer = ParticipantWriter(tmp_path, "guest", audio=True, video_codec=None)
    for i in range(100):
        writer.write("audio", 48000, OPUS, i * 960)
    writer.drain()
    assert writer.path is not None and writer.stats["audio"].frames == 100
    # The disk fills up: from now on every write to the file fails as on a full disk (ENOSPC).
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, writer._file.fileno())
    finally:
        os.close(full)
    for i in range(100, 3000):
        writer.write("audio", 48000, OPUS, i * 960)
    writer.drain()
    result = writer.close()
    assert result is not None, "the file must still be described, so that it gets a row"
    assert result.complete is False
    assert "No space left on device" in (result.error or "")
    assert result.as_dict()["complete"] is False
    assert result.size == result.path.stat().st_size > 0
    assert any("No space left" in r.getMessage() for r in caplog.records)


def test_a_late_server_keeps_the_senders_timing_and_a_clock_jump_reanchors(tmp_path):
    """Frames handled ever later (a loaded server, 2.5 s behind after 10 s) keep the sender's RTP
    timing: no holes in the file. A jump of the RTP clock (a restarted sender) re-anchors."""
    now = [100.0]
    writer = ParticipantWriter(tmp_path, "guest", audio=True, video_codec=None, monotonic=lambda: now[0])
    writer.note_first_packet("audio")
    for i in range(500):  # 10 s of 20 ms packets, each handled 5 ms later than the one before
        now[0] = 100.0 + i * 0.025
        writer.write("audio", 48000, OPUS, i * 960)
    assert writer.stats["audio"].resyncs == 0
    now[0] += 0.02
    writer.write("audio", 48000, OPUS, 500 * 960 + 48000 * 30)  # the RTP clock jumps 30 s
    assert writer.stats["audio"].resyncs == 1
    result = writer.close()
    assert result is not None and result.complete
    with av.open(str(result.path)) as container:
        pts = [p.pts for p in container.demux() if p.size]
    assert len(pts) == 501
    steps = {b - a for a, b in itertools.pairwise(pts[:-1])}
    assert steps == {20}, steps  # every 20 ms, although the server fell behind
    assert pts[-1] == round((now[0] - 100.0) * 1000)  # after the jump: re-anchored at its arrival
