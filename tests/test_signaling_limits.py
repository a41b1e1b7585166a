"""Per-seat limits of the signaling server: what a client can make the policy record, and how
fast it may send, neither of which a reconnect resets (docs/protocol.md, "Limits")."""

from __future__ import annotations

from aiohttp import web

from signaling import RoomEvent, SignalingConfig, SignalingServer
from signaling.testing import InMemoryPolicy
from tests.signaling_helpers import join, make_policy, pair


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def build(policy: InMemoryPolicy, config: SignalingConfig | None = None, clock=None):
    app = web.Application()
    server = SignalingServer(policy, config or SignalingConfig(), clock=clock or Clock())
    server.setup(app)
    return app, server


def named(policy: InMemoryPolicy, name: str, role: str | None = "guest") -> list[RoomEvent]:
    return [e for e in policy.events if e.name == name and e.role == role]


async def test_stats_are_sampled_and_folded_per_seat_across_reconnects(aiohttp_client):
    policy, clock = make_policy(), Clock()
    app, server = build(policy, SignalingConfig(rate_limit_burst=1000, rate_limit_per_s=1000), clock)
    client = await aiohttp_client(app)
    _host, guest = await pair(client)
    for i in range(40):
        await guest.send({"type": "stats", "sample": {"fps": i, "junk": "x" * 100, "nested": {"a": 1}}})
        await guest.send({"type": "ice_state", "state": "connected", "pair_type": "relay", "rtt_ms": i})
    await guest.close()
    guest = await join(client, "guest")
    for i in range(40, 80):
        await guest.send({"type": "stats", "sample": {"fps": i}})
        await guest.send({"type": "ice_state", "state": "connected", "pair_type": "relay", "rtt_ms": i})
    await guest.send({"type": "ice_state", "state": "disconnected"})  # a change: recorded
    await guest.send({"type": "ping"})
    await guest.next_message("pong")
    clock.now += 10
    await guest.send({"type": "stats", "sample": {"fps": 100}})
    await guest.send({"type": "ping"})
    await guest.next_message("pong")
    await server.events.flush()

    stats = named(policy, "stats")
    assert [e.data for e in stats] == [
        {"sample": {"fps": 0}},  # the first, as sent (numbers only)
        {"sample": {"fps": 40.75}, "min": {"fps": 1}, "max": {"fps": 100}, "n": 80},
    ]
    ice = named(policy, "ice_state")
    assert [e.data["state"] for e in ice] == ["connected", "disconnected"]
    assert server.seats.dropped["throttled"] >= 78


async def test_the_waiting_room_records_only_its_events(aiohttp_client):
    policy = make_policy()
    app, server = build(policy)
    client = await aiohttp_client(app)
    guest = await join(client, "guest")
    await guest.next_message("waiting")
    for _ in range(5):
        await guest.send({"type": "stats", "sample": {"fps": 1}})
        await guest.send({"type": "ice_state", "state": "checking"})
        await guest.send({"type": "ice_restart"})
        await guest.send({"type": "signal", "data": {}})  # peer_absent
        await guest.send_raw("{nope")  # bad_json
    await guest.send({"type": "ping"})
    await guest.next_message("pong")
    await server.events.flush()
    assert [e.name for e in policy.events if e.role == "guest"] == ["joined", "waiting"]
    assert server.seats.dropped["waiting_room"] == 25


async def test_repeated_errors_are_counted_not_recorded(aiohttp_client):
    policy = make_policy()
    app, server = build(policy, SignalingConfig(rate_limit_burst=1000, rate_limit_per_s=1000))
    client = await aiohttp_client(app)
    _host, guest = await pair(client)
    for _ in range(150):
        await guest.send_raw("{nope")
        await guest.send({"type": "admit"})  # forbidden
    await guest.close()
    guest = await join(client, "guest")
    for _ in range(150):
        await guest.send_raw("{nope")
    await guest.send({"type": "ping"})
    await guest.next_message("pong")
    await server.events.flush()
    errors = [e.data for e in named(policy, "error")]
    assert errors.count({"code": "bad_json"}) == 3 and {"code": "bad_json", "count": 10} in errors
    assert {"code": "bad_json", "count": 100} in errors  # 300 in all, across the reconnect
    assert errors.count({"code": "forbidden"}) == 3
    assert len(errors) == 3 + 2 + 3 + 2


async def test_a_reconnect_does_not_refill_the_rate_limit(aiohttp_client):
    policy = make_policy()
    app, _server = build(policy, SignalingConfig(rate_limit_burst=10, rate_limit_per_s=0.01))
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    for round_ in range(4):
        for i in range(10):
            await guest.send({"type": "signal", "data": {"i": f"{round_}.{i}"}})
        await guest.close()
        guest = await join(client, "guest")
    await host.send({"type": "ping"})
    await host.next_message("pong")
    relayed = [m for m in host.buffered() if m["type"] == "signal"]
    assert len(relayed) == 10, relayed  # one burst for the seat, not one per socket


class BudgetPolicy(InMemoryPolicy):
    """Stores three events of the guest's telemetry, then says the guest is over budget."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[RoomEvent] = []

    async def on_event(self, event: RoomEvent) -> bool | None:
        if event.role == "guest" and event.name in ("stats", "chat", "error", "ice_state"):
            if len([e for e in self.events if e.role == "guest" and e.name == event.name]) >= 3:
                self.refused.append(event)
                return False
        await super().on_event(event)
        return None


async def test_over_budget_tells_the_client_once_and_the_call_goes_on(aiohttp_client):
    policy = BudgetPolicy()
    source = make_policy()
    policy.admissions.update(source.admissions)
    clock = Clock()
    app, server = build(policy, SignalingConfig(rate_limit_burst=1000, rate_limit_per_s=1000), clock)
    client = await aiohttp_client(app)
    host, guest = await pair(client)
    for i in range(6):
        clock.now += 11
        await guest.send({"type": "stats", "sample": {"fps": i}})
        await guest.send({"type": "ping"})
        await guest.next_message("pong")
        await server.events.flush()
    assert (await guest.next_message("error"))["code"] == "over_budget"
    for _ in range(20):
        await guest.send({"type": "chat", "text": "still here"})
    await guest.close()
    guest = await join(client, "guest")  # a reconnect does not make it tell again
    await guest.send({"type": "signal", "data": {"offer": 1}})
    assert (await host.next_message("signal"))["data"] == {"offer": 1}
    await guest.send({"type": "ping"})
    await guest.next_message("pong")
    await server.events.flush()
    assert [m for m in guest.buffered() if m["type"] == "error"] == []
    assert len([m for m in host.buffered() if m["type"] == "chat"]) == 20  # relayed, not recorded
    assert len(named(policy, "stats")) == 3 and len(policy.refused) == 1
    assert named(policy, "chat") == []
    assert server.seats.dropped["over_budget"] >= 22
    # The host's seat has its own budget.
    await host.send({"type": "chat", "text": "doctor"})
    await guest.next_message("chat")
    await server.events.flush()
    assert [e.data["text"] for e in named(policy, "chat", "host")] == ["doctor"]
