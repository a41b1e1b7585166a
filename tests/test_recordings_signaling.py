"""The signaling room's recording leg (record_offer / record_answer / record_candidate) with
aiortc clients standing in for the browsers: who may record, when, and the events."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiortc import RTCSessionDescription

from signaling import SignalingConfig, SignalingServer
from signaling.testing import InMemoryPolicy, make_admission
from tests.signaling_helpers import join, pair
from tests.test_recording import Client

pytestmark = pytest.mark.netns  # real WebRTC media, coturn or the server on the bridge


def recording_app(tmp_path: Path, *, host: bool = True, guest: bool = True, enabled: bool = True):
    policy = InMemoryPolicy()
    now = time.time()
    policy.register("host-r1", make_admission("r1", "host", now=now, recording=host))
    policy.register("guest-r1", make_admission("r1", "guest", now=now, recording=guest))
    app = web.Application()
    server = SignalingServer(
        policy, SignalingConfig(), recording_dir=(lambda room_id: tmp_path / room_id) if enabled else None
    )
    server.setup(app)
    return app, server, policy


async def offer(sc, client: Client) -> dict:
    await client.pc.setLocalDescription(await client.pc.createOffer())
    await sc.send({"type": "record_offer", "sdp": client.pc.localDescription.sdp})
    return await sc.next_message()


async def test_both_recorded_files_reported_when_the_visit_ends(aiohttp_client, tmp_path: Path):
    (tmp_path / "r1").mkdir()
    app, server, policy = recording_app(tmp_path)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    assert (await host.next_message("recording"))["active"] is True
    assert (await guest.next_message("recording"))["active"] is True
    legs = {"host": Client(time.monotonic()), "guest": Client(time.monotonic())}
    try:
        for sc, role in ((host, "host"), (guest, "guest")):
            answer = await offer(sc, legs[role])
            assert answer["type"] == "record_answer", answer
            await legs[role].pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        await asyncio.sleep(2.5)
        await host.send({"type": "end"})
        await host.next_message("ended")
        # The files are finished after the clients were told (closing takes a moment).
        for _ in range(200):
            if "ended" in policy.event_names():
                break
            await asyncio.sleep(0.05)
        await server.events.flush()
    finally:
        for leg in legs.values():
            await leg.close()
    names = policy.event_names("r1")
    assert names.count("recording_started") == 2
    assert names.index("recording_stopped") < names.index("ended")
    stopped = next(e for e in policy.events if e.name == "recording_stopped")
    files = stopped.data["files"]
    assert sorted(f["role"] for f in files) == ["guest", "host"]
    for f in files:
        assert Path(f["path"]).parent == tmp_path / "r1" and f["size"] > 0 and f["duration_s"] > 1


async def test_no_recording_without_both_consents(aiohttp_client, tmp_path: Path):
    app, _server, policy = recording_app(tmp_path, guest=False)
    client = await aiohttp_client(app)
    host, _guest = await pair(client)
    leg = Client(time.monotonic())
    try:
        error = await offer(host, leg)
        assert error["type"] == "error" and error["code"] == "recording_off"
        await host.send({"type": "record_candidate", "candidate": None})
        assert (await host.next_message("error"))["code"] == "recording_off"
    finally:
        await leg.close()
    assert "recording_started" not in policy.event_names()
    assert not (tmp_path / "r1").exists()


async def test_a_waiting_guest_is_not_recorded_and_bad_offers_are_refused(aiohttp_client, tmp_path: Path):
    app, _server, _policy = recording_app(tmp_path)
    client = await aiohttp_client(app)
    guest = await join(client, "guest")
    await guest.next_message("waiting")
    await guest.send({"type": "record_offer", "sdp": "v=0\r\n"})
    assert (await guest.next_message("error"))["code"] == "not_admitted"
    await guest.send({"type": "record_offer", "sdp": "hello"})
    assert (await guest.next_message("error"))["code"] == "bad_field"


async def test_a_server_without_recording_dir_never_records(aiohttp_client, tmp_path: Path):
    app, _server, _policy = recording_app(tmp_path, enabled=False)
    client = await aiohttp_client(app)
    host, _guest = await pair(client)
    await host.send({"type": "record_offer", "sdp": "v=0\r\n"})
    assert (await host.next_message("error"))["code"] == "recording_off"
