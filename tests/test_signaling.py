from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from pathlib import Path

import pytest

from signaling import (
    EVENT_NAMES,
    Admission,
    RoomEvent,
    RoomState,
    SignalingConfig,
    ice_servers,
    turn_credentials,
)
from signaling.client import PeerSession
from signaling.connection import Connection, RateLimiter, SendWatchdog
from signaling.protocol import CLIENT_TYPES, ERROR_CODES
from signaling.testing import InMemoryPolicy, make_admission
from tests.signaling_helpers import add_room, connect, join, make_app, make_policy, pair

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


async def test_pairing_waiting_admission_clock_and_relay(aiohttp_client):
    policy = make_policy(duration_s=600, warning_s=60)
    app, server = make_app(policy)
    client = await aiohttp_client(app)

    host = await join(client, "host")
    welcome = host.welcome
    assert welcome is not None
    assert welcome["role"] == "host" and welcome["polite"] is False
    assert welcome["peer_present"] is False and welcome["clock"] is None
    assert welcome["ice_servers"] == [] and welcome["ice_transport_policy"] == "all"

    guest = await join(client, "guest")
    assert guest.welcome is not None
    assert guest.welcome["polite"] is True and guest.welcome["admitted"] is False
    assert guest.welcome["peer_present"] is False  # the guest cannot see the host yet
    await guest.next_message("waiting")
    joined = await host.next_message("peer_joined")
    assert joined["role"] == "guest" and joined["admitted"] is False

    await host.send({"type": "admit"})
    await guest.next_message("admitted")
    assert (await guest.next_message("peer_joined"))["role"] == "host"
    await host.next_message("admitted")
    host_clock = await host.next_message("clock")
    guest_clock = await guest.next_message("clock")
    assert host_clock["ends_at"] == guest_clock["ends_at"]
    assert host_clock["ends_at"] - host_clock["started_at"] == 600

    offer = {"description": {"type": "offer", "sdp": "v=0\r\n"}}
    await host.send({"type": "signal", "data": offer})
    assert (await guest.next_message("signal"))["data"] == offer
    candidate = {"candidate": None}
    await guest.send({"type": "signal", "data": candidate})
    assert (await host.next_message("signal"))["data"] == candidate

    await guest.send({"type": "chat", "text": "hello doctor"})
    chat = await host.next_message("chat")
    assert chat["from"] == "guest" and chat["text"] == "hello doctor" and chat["at"] > 0

    await host.send({"type": "ping"})
    await host.next_message("pong")

    await server.events.flush()
    names = policy.event_names("r1")
    assert names[:1] == ["room_opened"]
    for name in ("joined", "waiting", "admitted", "clock_started", "chat"):
        assert name in names
    assert names.index("admitted") < names.index("clock_started")
    assert policy.states["r1"].started_at == host_clock["started_at"]


async def test_reconnect_replaces_the_old_connection(aiohttp_client):
    app, server = make_app(make_policy())
    client = await aiohttp_client(app)
    host, guest = await pair(client)

    # The patient's phone reloads: a second connection with the same token.
    guest2 = await join(client, "guest")
    assert guest2.welcome is not None
    assert guest2.welcome["admitted"] is True  # admission is remembered: no waiting room
    assert guest2.welcome["peer_present"] is True
    assert guest2.welcome["clock"] is not None
    await guest2.next_message("clock")
    assert (await guest.next_message("replaced"))["type"] == "replaced"
    assert await guest.wait_closed() == 4001
    rejoined = await host.next_message("peer_joined")
    assert rejoined["role"] == "guest" and rejoined["reconnected"] is True
    assert "waiting" not in [m["type"] for m in guest2.buffered()]

    await host.send({"type": "signal", "data": {"x": 1}})
    assert (await guest2.next_message("signal"))["data"] == {"x": 1}
    # The replaced socket's disconnect must not announce the new guest as gone.
    await host.send({"type": "ping"})
    await host.next_message("pong")
    assert "peer_left" not in [m["type"] for m in host.buffered()]
    await server.events.flush()
    assert "replaced" in server.policy.event_names()  # type: ignore[attr-defined]


async def test_invalid_token_is_refused(aiohttp_client):
    app, _ = make_app(make_policy())
    client = await aiohttp_client(app)
    sc = await connect(client)
    await sc.send({"type": "hello", "version": 1, "token": "nope"})
    error = await sc.next_message()
    assert error["type"] == "error" and error["code"] == "invalid_token"
    assert error["message"]
    assert await sc.wait_closed() == 4003


async def test_token_for_another_room_is_refused(aiohttp_client):
    app, _ = make_app(make_policy("r1"))
    client = await aiohttp_client(app)
    sc = await connect(client, "r2")
    await sc.send({"type": "hello", "version": 1, "token": "host-r1"})
    assert (await sc.next_message("error"))["code"] == "invalid_token"


async def test_a_third_role_is_refused(aiohttp_client):
    policy = make_policy()
    observer = make_admission("r1", "host")
    # Admission is typed, but a policy is application code: the server must not trust it.
    object.__setattr__(observer, "role", "observer")
    policy.register("observer-r1", observer)
    app, server = make_app(policy)
    client = await aiohttp_client(app)
    sc = await connect(client)
    await sc.send({"type": "hello", "version": 1, "token": "observer-r1"})
    assert (await sc.next_message("error"))["code"] == "invalid_role"
    assert await sc.wait_closed() == 4003
    assert server.rooms == {}


async def test_handshake_errors(aiohttp_client):
    app, _ = make_app(make_policy(), SignalingConfig(hello_timeout_s=0.3))
    client = await aiohttp_client(app)

    sc = await connect(client)
    await sc.send({"type": "hello", "version": 2, "token": "host-r1"})
    assert (await sc.next_message("error"))["code"] == "unsupported_version"
    assert await sc.wait_closed() == 4002

    sc = await connect(client)
    await sc.send({"type": "ping"})
    assert (await sc.next_message("error"))["code"] == "hello_required"
    assert await sc.wait_closed() == 4002

    sc = await connect(client)
    assert (await sc.next_message("error", timeout=2))["code"] == "hello_timeout"
    assert await sc.wait_closed() == 4002


async def test_waiting_room(aiohttp_client):
    app, _ = make_app(make_policy())
    client = await aiohttp_client(app)
    guest = await join(client, "guest")
    await guest.next_message("waiting")
    await guest.send({"type": "signal", "data": {}})
    assert (await guest.next_message("error"))["code"] == "peer_absent"

    host = await join(client, "host")
    assert host.welcome is not None
    assert host.welcome["peer_present"] is True  # the host sees who is waiting
    assert host.welcome["peer"] == {"role": "guest", "participant": "guest", "instance": None}
    # Not admitted yet: the guest learns nothing about the host, nothing is relayed.
    await host.send({"type": "signal", "data": {}})
    assert (await host.next_message("error"))["code"] == "peer_absent"
    await guest.send({"type": "ping"})
    await guest.next_message("pong")
    assert [m["type"] for m in guest.buffered()] == []

    # A waiting guest who leaves is announced to the host; the room stays usable.
    await guest.send({"type": "leave"})
    assert await guest.wait_closed() == 1000
    assert (await host.next_message("peer_left"))["role"] == "guest"
    await host.send({"type": "admit"})
    assert (await host.next_message("error"))["code"] == "peer_absent"


async def test_host_only_messages_from_guest_are_refused(aiohttp_client):
    app, server = make_app(make_policy())
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    for kind in ("admit", "end"):
        await guest.send({"type": kind})
        error = await guest.next_message("error")
        assert error["code"] == "forbidden"
    await guest.send({"type": "signal", "data": {"still": "here"}})
    assert (await host.next_message("signal"))["data"] == {"still": "here"}
    assert "r1" in server.rooms and not server.rooms["r1"].ended


async def test_host_can_end_the_visit(aiohttp_client):
    policy = make_policy()
    app, server = make_app(policy)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    await host.send({"type": "end"})
    for sc in (host, guest):
        assert (await sc.next_message("ended"))["reason"] == "host_ended"
        assert await sc.wait_closed() == 4000
    assert policy.states["r1"].end_reason == "host_ended"
    assert server.rooms == {}


async def test_warning_then_end_of_a_three_second_visit(aiohttp_client):
    policy = make_policy(duration_s=3, warning_s=1)
    app, server = make_app(policy)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for sc in (host, guest):
        warning = await sc.next_message("warning", timeout=4)
        assert warning["seconds_left"] == 1
    assert 1.5 < loop.time() - start < 2.6
    for sc in (host, guest):
        assert (await sc.next_message("ended", timeout=3))["reason"] == "time_limit"
        assert await sc.wait_closed() == 4000
    assert 2.5 < loop.time() - start < 3.8

    # The visit is over for good: rejoining is refused with a readable reason.
    late = await connect(client)
    await late.send({"type": "hello", "version": 1, "token": "guest-r1"})
    error = await late.next_message("error")
    assert error["code"] == "room_ended" and error["message"]
    assert await late.wait_closed() == 4000

    await server.events.flush()
    names = policy.event_names("r1")
    assert names.index("clock_started") < names.index("warning") < names.index("ended")
    assert policy.states["r1"].end_reason == "time_limit"


async def test_clock_resumes_after_a_server_restart(aiohttp_client):
    policy = make_policy(duration_s=600, warning_s=60)
    app1, _ = make_app(policy)
    client1 = await aiohttp_client(app1)
    host, guest = await pair(client1)
    await host.send({"type": "ping"})
    await host.next_message("pong")
    ends_at = policy.states["r1"].started_at + 600  # type: ignore[operator]

    # The app's shutdown closes sockets with GOING_AWAY (and waits for the clients' replies).
    codes = await asyncio.gather(host.wait_closed(), guest.wait_closed(), client1.server.close())
    assert codes[:2] == [1001, 1001]
    assert policy.states["r1"].ended_at is None  # a restart does not end the visit

    app2, _ = make_app(policy)
    client2 = await aiohttp_client(app2)
    guest = await join(client2, "guest")
    assert guest.welcome is not None
    assert guest.welcome["admitted"] is True
    assert guest.welcome["clock"]["ends_at"] == ends_at
    host = await join(client2, "host")
    assert host.welcome is not None and host.welcome["clock"]["ends_at"] == ends_at
    await host.send({"type": "signal", "data": {"again": True}})
    assert (await guest.next_message("signal"))["data"] == {"again": True}


async def test_a_restart_after_the_end_time_finds_the_room_ended(aiohttp_client):
    policy = make_policy(duration_s=600)
    policy.states["r1"] = RoomState(room_id="r1", started_at=1.0)
    app, _ = make_app(policy)
    client = await aiohttp_client(app)
    sc = await connect(client)
    await sc.send({"type": "hello", "version": 1, "token": "host-r1"})
    # Started long ago: the visit is over although nobody saw its timer fire.
    assert (await sc.next_message())["code"] == "room_ended"
    assert await sc.wait_closed() == 4000
    assert policy.states["r1"].ended_at == 601.0
    # Restored without a timer: the server that ran the clock stopped before it ran out.
    assert policy.states["r1"].end_reason == "server_restart"


async def test_bad_messages_get_error_frames_and_the_room_lives_on(aiohttp_client):
    app, server = make_app(make_policy(), SignalingConfig(max_message_bytes=1024))
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    cases = [
        ("{not json", "bad_json"),
        ("[1, 2]", "not_object"),
        ('{"no": "type"}', "bad_field"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "signal", "data": "sdp"}', "bad_field"),
        ('{"type": "chat", "text": 5}', "bad_field"),
        ('{"type": "chat", "text": "' + "x" * 2001 + '"}', "too_large"),
        ('{"type": "ice_state", "state": "connected", "rtt_ms": true}', "bad_field"),
        ('{"type": "hello", "version": 1, "token": "host-r1"}', "duplicate_hello"),
        (json.dumps({"type": "signal", "data": {"sdp": "a" * 2000}}), "too_large"),
    ]
    for raw, code in cases:
        await guest.send_raw(raw)
        error = await guest.next_message("error")
        assert error["code"] == code, raw
        assert error["message"]
    await guest.send_raw(b"\x00\x01")
    assert (await guest.next_message("error"))["code"] == "binary"

    await guest.send({"type": "signal", "data": {"after": "errors"}})
    assert (await host.next_message("signal"))["data"] == {"after": "errors"}
    assert not guest.ws.closed and server.rooms["r1"].slots["guest"] is not None


async def test_chat_length_limit(aiohttp_client):
    app, _ = make_app(make_policy())
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    await host.send({"type": "chat", "text": "x" * 2001})
    assert (await host.next_message("error"))["code"] == "bad_field"
    await host.send({"type": "chat", "text": "x" * 2000})
    assert len((await guest.next_message("chat"))["text"]) == 2000


async def test_rate_limit_answers_with_one_error_and_recovers(aiohttp_client):
    config = SignalingConfig(rate_limit_per_s=20, rate_limit_burst=10)
    app, _ = make_app(make_policy(), config)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    for i in range(30):
        await guest.send({"type": "signal", "data": {"i": i}})
    assert (await guest.next_message("error"))["code"] == "rate_limited"
    received = []
    with pytest.raises(TimeoutError):
        while True:
            received.append((await host.next_message("signal", timeout=0.3))["data"]["i"])
    # The guest's `join` (sent by the client after its hello) took one token of the burst.
    assert 9 <= len(received) < 30
    assert [m for m in guest.buffered() if m["type"] == "error"] == []  # only one error
    await asyncio.sleep(0.2)
    await guest.send({"type": "signal", "data": {"i": "later"}})
    assert (await host.next_message("signal"))["data"] == {"i": "later"}


async def test_bad_origin_is_refused_before_upgrade(aiohttp_client):
    app, _ = make_app(make_policy())
    client = await aiohttp_client(app)
    response = await client.get("/ws/rooms/r1", headers={"Origin": "https://evil.example"})
    assert response.status == 403
    null = await client.get("/ws/rooms/r1", headers={"Origin": "null"})
    assert null.status == 403
    # Same host as the Host header: accepted.
    host = f"{client.server.host}:{client.server.port}"
    sc = await join(client, "host", headers={"Origin": f"http://{host}"})
    assert sc.welcome is not None


async def test_allowed_origins_list(aiohttp_client):
    config = SignalingConfig(allowed_origins=("https://clinic.example",))
    app, _ = make_app(make_policy(), config)
    client = await aiohttp_client(app)
    host = f"{client.server.host}:{client.server.port}"
    response = await client.get("/ws/rooms/r1", headers={"Origin": f"http://{host}"})
    assert response.status == 403
    sc = await join(client, "host", headers={"Origin": "https://clinic.example"})
    assert sc.welcome is not None


async def test_joining_window(aiohttp_client):
    policy = InMemoryPolicy()
    now = 1_000_000.0
    early = make_admission("r1", "host", now=now)
    policy.register("early", early)
    policy.register("late", make_admission("r1", "guest", now=now - 10_000, window_s=60))
    app, _ = make_app(policy)
    client = await aiohttp_client(app)
    # make_admission(now=1e6) is long in the past: not_after has passed.
    sc = await connect(client)
    await sc.send({"type": "hello", "version": 1, "token": "late"})
    assert (await sc.next_message("error"))["code"] == "too_late"
    future = Admission("r1", "host", "dr", 4e9, 5e9, 60, 10)
    policy.register("future", future)
    sc = await connect(client)
    await sc.send({"type": "hello", "version": 1, "token": "future"})
    assert (await sc.next_message("error"))["code"] == "too_early"


async def test_failing_event_sink_does_not_break_the_room(aiohttp_client):
    class Broken(InMemoryPolicy):
        async def on_event(self, event: RoomEvent) -> None:
            raise RuntimeError("database is down")

    policy = Broken()
    policy.admissions = make_policy().admissions
    app, server = make_app(policy)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    await host.send({"type": "signal", "data": {"ok": 1}})
    assert (await guest.next_message("signal"))["data"] == {"ok": 1}
    await server.events.flush()


async def test_telemetry_is_recorded_as_events(aiohttp_client):
    policy = make_policy()
    app, server = make_app(policy)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    await guest.send({"type": "ice_state", "state": "connected", "pair_type": "relay", "rtt_ms": 12})
    await guest.send({"type": "ice_restart"})
    await guest.send({"type": "stats", "sample": {"fps": 20}})
    await guest.send({"type": "ping"})
    await guest.next_message("pong")
    await server.events.flush()
    by_name = {e.name: e for e in policy.events}
    assert by_name["ice_state"].data == {"state": "connected", "pair_type": "relay", "rtt_ms": 12}
    assert by_name["ice_state"].role == "guest"
    assert by_name["stats"].data == {"sample": {"fps": 20}}
    assert "ice_restart" in by_name
    assert host.buffered() == []  # telemetry is not relayed


async def test_slow_client_is_dropped_not_waited_for():
    class StuckSocket:
        async def send_str(self, data: str) -> None:
            await asyncio.sleep(3600)

    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    class Request:
        transport = Transport()
        remote = "10.0.0.9"

    conn = Connection(
        StuckSocket(),  # type: ignore[arg-type]
        Request(),  # type: ignore[arg-type]
        send_timeout_s=0.1,
        queue_max=4,
        rate_limiter=RateLimiter(10, 10),
        watchdog=SendWatchdog(interval_s=0.02),
    )
    assert conn.send({"type": "pong"})  # enqueuing never blocks
    await asyncio.sleep(0.3)
    assert Request.transport.aborted and conn.closing
    assert not conn.send({"type": "pong"})


async def test_full_send_queue_drops_the_client():
    class StuckSocket:
        async def send_str(self, data: str) -> None:
            await asyncio.sleep(3600)

    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    class Request:
        transport = Transport()
        remote = None

    conn = Connection(
        StuckSocket(),  # type: ignore[arg-type]
        Request(),  # type: ignore[arg-type]
        send_timeout_s=60,
        queue_max=2,
        rate_limiter=RateLimiter(10, 10),
        watchdog=SendWatchdog(interval_s=0.02),
    )
    results = [conn.send({"type": "pong"}) for _ in range(5)]
    assert results[-1] is False and Request.transport.aborted
    await conn.wait_closed()


async def test_shutdown_cancels_room_timers(aiohttp_client):
    app, server = make_app(make_policy(duration_s=600))
    client = await aiohttp_client(app)
    await pair(client)
    timer = server.rooms["r1"]._timer
    assert timer is not None and not timer.done()
    await client.close()
    assert timer.done() and server.connections == set()


@pytest.mark.netns  # real aiortc media over the bridge address
async def test_media_flows_between_two_aiortc_peers(aiohttp_client):
    app, _ = make_app(make_policy())
    client = await aiohttp_client(app)
    host_sc, guest_sc = await pair(client)
    host = PeerSession(host_sc)
    guest = PeerSession(guest_sc)
    try:
        await host.start()
        await asyncio.gather(host.run(5, timeout_s=30), guest.run(5, timeout_s=30))
        assert host.frames_received >= 5 and guest.frames_received >= 5
        assert host.pc.connectionState == "connected"
    finally:
        await host.close()
        await guest.close()


def test_turn_rest_credentials_formula():
    username, password = turn_credentials("s3cret", "u42", 1_700_000_000)
    assert username == "1700000000:u42"
    expected = base64.b64encode(hmac.new(b"s3cret", b"1700000000:u42", hashlib.sha1).digest()).decode()
    assert password == expected

    config = SignalingConfig(
        turn_urls=("turn:turn.example:3478?transport=udp",),
        stun_urls=("stun:turn.example:3478",),
        turn_secret="s3cret",
        turn_ttl_s=600,
    )
    servers = ice_servers(config, "u42", now=1_700_000_000.7)
    assert servers[0]["username"] == "1700000600:u42"
    assert servers[0]["urls"] == ["turn:turn.example:3478?transport=udp"]
    assert servers[0]["credential"] == turn_credentials("s3cret", "u42", 1_700_000_600)[1]
    assert servers[1] == {"urls": ["stun:turn.example:3478"]}


def test_no_ice_servers_without_configuration():
    assert ice_servers(SignalingConfig(), "u", now=0) == []


def test_configuration_is_validated():
    with pytest.raises(ValueError):
        SignalingConfig(ice_transport_policy="relay")
    with pytest.raises(ValueError):
        SignalingConfig(turn_urls=("turn:x",))
    with pytest.raises(ValueError):
        SignalingConfig(ice_transport_policy="any")


def test_protocol_doc_covers_every_message_event_and_close_code():
    text = DOCS.read_text()
    server_types = {
        "welcome", "waiting", "admitted", "peer_joined", "peer_ready", "peer_away", "peer_left", "signal",
        "chat", "clock", "warning", "ended", "replaced", "pong", "error",
    }  # fmt: skip
    for kind in CLIENT_TYPES | server_types:
        assert f'"type": "{kind}"' in text, kind
    for name in EVENT_NAMES:
        assert f"`{name}`" in text, name
    for code in ERROR_CODES:
        assert f"`{code}`" in text, code
    for close_code in ("1000", "1001", "1009", "4000", "4001", "4002", "4003"):
        assert close_code in text, close_code


def test_signaling_never_imports_the_application():
    root = Path(__file__).resolve().parent.parent / "signaling"
    for path in root.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+consult\b", path.read_text(), re.M), path


async def test_the_end_is_saved_after_every_event_before_it_was_delivered(aiohttp_client):
    """A slow event sink: the policy still sees the end after the joins and the clock start."""

    class SlowSink(InMemoryPolicy):
        async def on_event(self, event: RoomEvent) -> None:
            await asyncio.sleep(0.05)
            await super().on_event(event)

        async def save_state(self, state: RoomState) -> None:
            if state.ended_at is not None:
                self.delivered_before_end = self.event_names("r1")
            await super().save_state(state)

    policy = SlowSink()
    add_room(policy, "r1")
    app, _ = make_app(policy)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    await host.send({"type": "end"})
    assert (await guest.next_message("ended"))["reason"] == "host_ended"
    assert "clock_started" in policy.delivered_before_end
    assert "ended" not in policy.delivered_before_end


async def test_admission_alone_starts_nothing_the_guests_join_does(aiohttp_client):
    """Admitted is not in the call: before the guest's `join` (its patient pressing Join) no
    signal is relayed and the clock does not start; after it both happen, and a guest's new
    connection has to join again."""
    policy = make_policy(duration_s=600)
    app, server = make_app(policy)
    client = await aiohttp_client(app)
    host = await join(client, "host")
    guest = await connect(client)
    welcome = await guest.hello("guest-r1", join=False)
    assert welcome["peer_ready"] is False
    await guest.next_message("waiting")
    assert (await host.next_message("peer_joined"))["ready"] is False
    await host.send({"type": "admit"})
    assert (await host.next_message("admitted"))["ready"] is False
    await guest.next_message("admitted")
    assert (await guest.next_message("peer_joined"))["ready"] is True

    offer = {"description": {"type": "offer", "sdp": "v=0\r\n"}}
    await host.send({"type": "signal", "data": offer})
    assert (await host.next_message("error"))["code"] == "not_joined"
    await guest.send({"type": "signal", "data": offer})
    assert (await guest.next_message("error"))["code"] == "not_joined"
    await host.send({"type": "chat", "text": "Press Join when you are ready."})  # chat is fine
    assert (await guest.next_message("chat"))["text"] == "Press Join when you are ready."
    await asyncio.sleep(0.2)
    assert [m for m in host.buffered() + guest.buffered() if m["type"] in ("clock", "signal")] == []
    assert "r1" not in policy.states or policy.states["r1"].started_at is None

    await guest.send({"type": "join"})
    assert (await host.next_message("peer_ready"))["role"] == "guest"
    clock = await guest.next_message("clock")
    assert (await host.next_message("clock"))["started_at"] == clock["started_at"]
    await host.send({"type": "signal", "data": offer})
    assert (await guest.next_message("signal"))["data"] == offer
    await guest.send({"type": "join"})  # again: nothing new
    await asyncio.sleep(0.1)
    assert [m for m in host.buffered() if m["type"] == "peer_ready"] == []
    await server.events.flush()
    names = policy.event_names("r1")
    assert names.index("admitted") < names.index("ready") < names.index("clock_started")

    # The phone reloads: its new connection is back in the visit (admitted, the clock runs)
    # but sends no media until its patient presses Join again.
    again = await connect(client)
    welcome = await again.hello("guest-r1", join=False)
    assert welcome["admitted"] is True and welcome["peer_ready"] is True
    rejoined = await host.next_message("peer_joined")
    assert rejoined["reconnected"] is True and rejoined["ready"] is False
    await host.send({"type": "signal", "data": offer})
    assert (await host.next_message("error"))["code"] == "not_joined"
    await again.send({"type": "join"})
    await host.next_message("peer_ready")
    await host.send({"type": "signal", "data": offer})
    assert (await again.next_message("signal"))["data"] == offer


async def test_a_dropped_socket_is_away_first_and_left_only_after_the_grace(aiohttp_client):
    """Media goes peer to peer: a socket that drops (no `leave`) must not make the other page
    tear its media down. It hears `peer_away` at once and `peer_left` only after the grace;
    a connection of the same page instance within the grace says which instance it is."""
    app, server = make_app(make_policy(), SignalingConfig(peer_grace_s=0.6))
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    clock = server.rooms["r1"].clock_message()
    await guest.close()  # the socket dies; the page (and its peer connection) lives on
    away = await host.next_message("peer_away")
    assert away["role"] == "guest" and away["grace_s"] == 0.6
    again = await connect(client)
    welcome = await again.hello("guest-r1", instance="page-1")
    assert welcome["clock"]["started_at"] == clock["started_at"]  # the visit clock ran on
    rejoined = await host.next_message("peer_joined")
    assert rejoined["reconnected"] is True and rejoined["instance"] == "page-1"
    await asyncio.sleep(1.0)  # past the grace: it was cancelled by the return
    assert "peer_left" not in [m["type"] for m in host.buffered()]

    # The host's socket drops: the guest sees it away, then, with nobody back, left.
    await host.close()
    assert (await again.next_message("peer_away"))["role"] == "host"
    host2 = await connect(client)
    welcome = await host2.hello("host-r1", instance="room-1")
    assert welcome["peer"]["instance"] == "page-1" and welcome["peer_away"] is False
    await host2.close()
    await again.next_message("peer_away")
    left = await again.next_message("peer_left", timeout=3)
    assert left == {"type": "peer_left", "role": "host", "reason": "disconnected"}

    # An explicit leave is announced at once, without a grace.
    host3 = await join(client, "host")
    await again.next_message("peer_joined")
    await again.send({"type": "leave"})
    assert (await host3.next_message("peer_left"))["reason"] == "left"


async def test_quality_is_relayed_to_the_other_side(aiohttp_client):
    app, _ = make_app(make_policy())
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    await guest.send({"type": "quality", "uplink": "poor", "audio_only": True})
    relayed = await host.next_message("quality")
    assert relayed == {"type": "quality", "from": "guest", "uplink": "poor", "audio_only": True}
    await host.send({"type": "quality", "uplink": "bad"})
    assert (await host.next_message("error"))["code"] == "bad_field"
    await host.send({"type": "quality", "uplink": "good"})
    assert (await guest.next_message("quality"))["audio_only"] is False
