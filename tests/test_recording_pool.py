"""Recording legs in worker processes (signaling.recording.pool): real worker processes, real
aiortc clients sending media to them, real files; one worker killed with SIGKILL mid-visit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from aiortc.codecs import vpx

from signaling.recording import RecordingError
from signaling.recording.pool import WORKER_DIED, RecordingPool
from tests.test_recording import Client, decode_all

pytestmark = pytest.mark.netns  # real WebRTC media on the bridge


async def wait_for(condition, what: str, timeout: float = 40.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def frames(status: dict, role: str) -> int:
    return status.get(role, {}).get("tracks", {}).get("video", {}).get("frames", 0)


async def test_legs_spread_over_workers_and_write_the_same_files(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    directory.mkdir()
    pool = RecordingPool(2)
    session = pool.session(directory, ice_servers=[], label="visit-1")
    clients = {"host": Client(time.time()), "guest": Client(time.time())}
    try:
        async with asyncio.timeout(90):
            for role, client in clients.items():
                await client.connect(session, role)
            # Least loaded: one leg per worker, two processes besides this one.
            assert pool.loads() == [1, 1]
            pids = {session.status()[role]["worker"] for role in clients}
            assert len(pids) == 2 and os.getpid() not in pids
            await wait_for(lambda: all(frames(session.status(), r) > 20 for r in clients), "frames written")
            # The recorder's fixed REMB (instead of aiortc's per-packet estimate) reached the
            # senders: their VP8 encoders took it as their target (clamped to aiortc's maximum).
            senders = [s for c in clients.values() for s in c.pc.getSenders() if s.kind == "video"]
            encoders = [s._RTCRtpSender__encoder for s in senders]
            await wait_for(lambda: all(e and e.target_bitrate == vpx.MAX_BITRATE for e in encoders), "REMB")
            for client in clients.values():
                await client.close()
            files = await session.close()
    finally:
        await pool.close()
    assert sorted(f.role for f in files) == ["guest", "host"]
    for f in files:
        assert f.complete and f.error is None
        assert f.path.parent == directory and f.path.suffix == ".webm"
        tracks = {t["kind"]: t for t in f.tracks}
        info = decode_all(f.path)
        assert info["video"] == tracks["video"]["frames"] > 20
        assert info["audio"] >= tracks["audio"]["frames"] - 1 > 20
        assert f.size == f.path.stat().st_size
    assert pool.workers == []


async def test_a_killed_worker_cuts_its_leg_only_and_is_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    directory.mkdir()
    pool = RecordingPool(2)
    session = pool.session(directory, ice_servers=[], label="visit-2")
    clients = {"host": Client(time.time()), "guest": Client(time.time())}
    try:
        async with asyncio.timeout(120):
            for role, client in clients.items():
                await client.connect(session, role)
            await wait_for(lambda: all(frames(session.status(), r) > 20 for r in clients), "frames written")
            victim = session.status()["guest"]["worker"]
            survivor = session.status()["host"]["worker"]
            os.kill(victim, signal.SIGKILL)
            # The pool notices, starts a replacement; the host's leg keeps recording meanwhile.
            await wait_for(lambda: pool.restarts == 1 and victim not in pool.pids(), "a new worker")
            assert survivor in pool.pids()
            before = frames(session.status(), "host")
            await wait_for(lambda: frames(session.status(), "host") > before + 20, "the host's leg going on")
            # The browser's recording connection fails and it offers again: a live worker takes it.
            await clients["guest"].close()
            clients["guest"] = Client(time.time())
            await clients["guest"].connect(session, "guest")
            assert session.status()["guest"]["worker"] not in (victim, None)
            await wait_for(lambda: frames(session.status(), "guest") > 20, "the new guest leg writing")
            for client in clients.values():
                await client.close()
            files = await session.close()
    finally:
        await pool.close()
    by_role: dict[str, list] = {}
    for f in files:
        by_role.setdefault(f.role, []).append(f)
    [host] = by_role["host"]
    assert host.complete and decode_all(host.path)["video"] > 40
    cut, new = by_role["guest"]
    # The killed worker's file: reported, marked incomplete with the reason, playable up to the kill.
    assert not cut.complete and cut.error == WORKER_DIED
    assert cut.size == cut.path.stat().st_size > 0
    assert decode_all(cut.path)["video"] > 10
    assert new.complete and new.path != cut.path and decode_all(new.path)["video"] > 20


async def test_pooled_session_refusals(tmp_path: Path) -> None:
    pool = RecordingPool(1)
    session = pool.session(tmp_path, ice_servers=[])
    try:
        with pytest.raises(RecordingError):
            await session.add_participant_offer("../host", "v=0\r\n")
        with pytest.raises(RecordingError):
            await session.add_participant_offer("host", "not sdp")
        with pytest.raises(RecordingError):
            await session.add_ice_candidate("host", None)
        # An unusable offer is refused by the worker, which stays up.
        with pytest.raises(RecordingError):
            await session.add_participant_offer("host", "v=0\r\n")
        assert pool.restarts == 0 and pool.loads() == [0]
        await session.close()
        with pytest.raises(RecordingError):
            await session.add_participant_offer("host", "v=0\r\n")
    finally:
        await pool.close()
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


async def test_a_worker_behind_real_time_reads_its_sockets_to_the_end(tmp_path: Path) -> None:
    """A worker paused 1.5 s (a loaded machine) has the media of that time unread in its
    sockets when the visit ends; finishing the leg reads it before closing, so the file still
    holds every frame sent."""
    directory = tmp_path / "rec"
    directory.mkdir()
    pool = RecordingPool(1)
    session = pool.session(directory, ice_servers=[], label="visit-3")
    client = Client(time.time())
    try:
        async with asyncio.timeout(90):
            await client.connect(session, "guest")
            await wait_for(lambda: frames(session.status(), "guest") > 20, "frames written")
            [worker] = pool.pids()
            os.kill(worker, signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)  # the client keeps sending into the paused worker's sockets
                client.audio.hold = client.video.hold = True
                await asyncio.sleep(0.3)
            finally:
                os.kill(worker, signal.SIGCONT)
            files = await session.close()  # at once: the backlog is still in the sockets
            await client.close()
    finally:
        await pool.close()
    [f] = files
    tracks = {t["kind"]: t for t in f.tracks}
    # As for an in-process leg (test_the_last_frames_of_a_leg_are_kept): at most the frame
    # that was in the encoder when the client held is missing.
    assert client.audio.sent - 1 <= tracks["audio"]["frames"] <= client.audio.sent, tracks
    video = tracks["video"]["frames"] + tracks["video"]["dropped_before_keyframe"]
    assert client.video.sent - 1 <= video <= client.video.sent, tracks
