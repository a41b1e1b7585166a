"""Many sockets closing at once (a clinic hanging up together, a proxy restarting): the teardown
is spread over event-loop iterations so that timers and other calls' relays run in between,
and nothing of it is lost (signaling.connection.TeardownPacer, consult.ops.edge.cap_io_events)."""

from __future__ import annotations

import asyncio
import itertools
import selectors
import socket
import time
from typing import Any

import aiohttp

from signaling import SignalingConfig
from signaling.connection import TeardownPacer
from signaling.testing import InMemoryPolicy
from tests.signaling_helpers import add_room, make_app, pair

ROOMS = 100
PER_TICK = 2


async def test_a_mass_hang_up_is_torn_down_in_turns_with_timers_running_between(aiohttp_client) -> None:
    policy = InMemoryPolicy()
    for i in range(ROOMS):
        add_room(policy, f"r{i}")
    app, server = make_app(policy, SignalingConfig(teardowns_per_tick=PER_TICK))
    # (aiohttp's client holds 100 connections at most unless told otherwise.)
    client = await aiohttp_client(app, connector=aiohttp.TCPConnector(limit=0))
    pairs = []
    async with asyncio.timeout(120):
        for start in range(0, ROOMS, 20):
            pairs += await asyncio.gather(*(pair(client, f"r{i}") for i in range(start, start + 20)))
    sockets = [c for p in pairs for c in p]
    assert len(server.connections) == 2 * ROOMS
    pacer = server.teardowns
    assert pacer.deferred == 0  # joining took no turns

    # A timer, as the server's loop-lag sampler: it must keep firing while teardowns wait their
    # turn, not only once all of them are done.
    loop = asyncio.get_running_loop()
    fired_while_waiting: list[float] = []

    async def sampler() -> None:
        while True:
            due = loop.time() + 0.0002
            await asyncio.sleep(0.0002)
            if pacer.waiting:
                fired_while_waiting.append(loop.time() - due)

    ticking = asyncio.create_task(sampler())
    try:
        # Every client closes in the same iteration: the close frames reach the server together.
        closing = [asyncio.create_task(s.ws.close()) for s in sockets]
        deadline = loop.time() + 60
        while server.connections:  # every teardown done (the server counts them open until then)
            assert loop.time() < deadline, f"{len(server.connections)} sockets still open"
            await asyncio.sleep(0.005)
        async with asyncio.timeout(60):
            await asyncio.gather(*closing)
    finally:
        ticking.cancel()
    assert pacer.deferred > 0  # the burst was paced...
    assert pacer.most_in_a_tick <= PER_TICK  # ...never more than its share per iteration
    # 200 teardowns at 2 an iteration: the timer ran many times in between.
    assert len(fired_while_waiting) >= 10, fired_while_waiting
    # Nothing lost: both seats of every room left, as disconnected (the other side kept its
    # grace, not ended).
    left = {(e.room_id, e.role) for e in policy.events if e.name == "left"}
    assert left == {(f"r{i}", role) for i in range(ROOMS) for role in ("host", "guest")}
    assert all(e.data == {"reason": "disconnected"} for e in policy.events if e.name == "left")


async def test_the_pacer_lets_a_lone_teardown_through_at_once() -> None:
    pacer = TeardownPacer(per_tick=3)
    await pacer.turn()  # no waiting: no loop round trip
    assert pacer.deferred == 0
    done: list[int] = []

    async def teardown(n: int) -> None:
        await pacer.turn()
        done.append(n)

    tasks = [asyncio.create_task(teardown(n)) for n in range(10)]
    cancelled = tasks[9]
    await asyncio.sleep(0)
    # A handler cancelled while it waits (aiohttp's test server cancels those whose client went):
    # its teardown still waits its turn.
    cancelled.cancel()
    await asyncio.sleep(0)
    assert not cancelled.done() and pacer.waiting
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[9], asyncio.CancelledError)
    assert done == list(range(9))  # in arrival order
    assert pacer.most_in_a_tick <= 3 and pacer.deferred == 7  # 1 + 2 at once, then in turns
    assert not pacer.waiting


def count_selects(selector: selectors.BaseSelector, counts: list[int]) -> Any:
    """Wrap `selector.select` to append how many sockets each non-empty call handed out; the
    wrapped select is returned, to be put back."""
    capped = selector.select

    def counting(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = capped(timeout)
        if ready:
            counts.append(len(ready))
        return ready

    selector.select = counting  # type: ignore[method-assign]
    return capped


async def serve_all(pairs: list[tuple[socket.socket, socket.socket]], cost_s: float = 0.0) -> list[int]:
    """Make every pair's first socket readable at once, before the loop looks again; read each
    once, with a callback that takes `cost_s`; the pairs' indexes in the order they were read."""
    loop = asyncio.get_running_loop()
    read: list[int] = []

    def on_ready(s: socket.socket, n: int) -> None:
        s.recv(16)
        loop.remove_reader(s)
        time.sleep(cost_s)
        read.append(n)

    for n, (ours, _theirs) in enumerate(pairs):
        ours.setblocking(False)
        loop.add_reader(ours, on_ready, ours, n)
    for _ours, theirs in pairs:
        theirs.send(b"x")
    deadline = loop.time() + 30
    while len(read) < len(pairs):
        assert loop.time() < deadline, f"{len(read)} of {len(pairs)} sockets read"
        await asyncio.sleep(0)
    return read


async def test_the_loop_handles_a_bounded_number_of_ready_sockets_per_iteration() -> None:
    from consult.ops.edge import cap_io_events, uncap_io_events

    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    if not isinstance(selector, selectors.EpollSelector):
        return  # the cap is epoll's maxevents; other selectors are left as they are
    assert cap_io_events(loop, per_tick=4)
    counts: list[int] = []
    capped = count_selects(selector, counts)
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        read = await serve_all(pairs)
    finally:
        for ours, theirs in pairs:
            loop.remove_reader(ours)
            ours.close()
            theirs.close()
        selector.select = capped
        uncap_io_events(loop)
    assert sorted(read) == list(range(40))  # every socket was served...
    assert max(counts) <= 4  # ...at most 4 per iteration
    assert "select" not in vars(selector)  # uncapped: the selector's own select again


async def test_the_loop_takes_fewer_ready_sockets_after_an_iteration_over_its_budget() -> None:
    # 64 sockets ready at once whose callbacks take 2 ms each: 32 of them are a 64 ms
    # iteration, and a timer due meanwhile waits for it and the next. Over the budget (10 ms)
    # the next iteration takes half as many, down to a few; none is lost or served out of turn.
    # Then cheap callbacks: the number grows back.
    from consult.ops.edge import IO_EVENTS_MIN_PER_TICK, cap_io_events, uncap_io_events

    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    if not isinstance(selector, selectors.EpollSelector):
        return  # the cap is epoll's maxevents; other selectors are left as they are
    assert cap_io_events(loop, per_tick=32, budget_s=0.010)
    counts: list[int] = []
    capped = count_selects(selector, counts)
    slow = [socket.socketpair() for _ in range(64)]
    cheap = [socket.socketpair() for _ in range(200)]
    state = selector._consult_state
    try:
        # A slow iteration with no socket ready (a timer, a collection) leaves the cap alone:
        # the sockets' work is not why it was slow.
        await loop.run_in_executor(None, lambda: None)  # an iteration or two, none slow
        loop.call_soon(time.sleep, 0.03)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert state.cap == 32
        counts.clear()  # (the executor's wake-up was one)
        read = await serve_all(slow, 0.002)
        slow_counts, counts[:] = list(counts), []
        # Cheap callbacks now; a budget no preemption of this test reaches, so that each
        # iteration counts as "under half of it" on a loaded machine too.
        state.budget_s = 1.0
        read_cheap = await serve_all(cheap, 0.0)
    finally:
        for ours, theirs in slow + cheap:
            loop.remove_reader(ours)
            ours.close()
            theirs.close()
        selector.select = capped
        uncap_io_events(loop)
    assert read == list(range(64)) and read_cheap == list(range(200))  # all, in arrival order
    # Halved after each iteration over 10 ms (32 -> 16 -> 8 -> 4; a loaded machine may start
    # lower), then at most 4 (8 ms): none is ever under the minimum or over the maximum.
    assert slow_counts[0] <= 32 and len(slow_counts) >= 5, slow_counts
    for served, then in itertools.pairwise(slow_counts):
        assert served < 6 or then <= served // 2, slow_counts  # 6 callbacks: 12 ms
    # (the last batch is what was left, which may be fewer than the cap)
    assert max(slow_counts[3:]) <= 4 and min(slow_counts[:-1]) >= IO_EVENTS_MIN_PER_TICK, slow_counts
    # Cheap again: it grows back, a quarter at a time (4 -> 5 -> 6 ... 32).
    assert counts[0] <= 5 and max(counts) == 32, counts
    growing = counts[: counts.index(32) + 1]
    assert growing == sorted(growing), counts


async def test_the_slow_callback_probe_hands_the_capped_select_back() -> None:
    from consult.ops.edge import SlowCallbackProbe, cap_io_events, uncap_io_events

    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    if not isinstance(selector, selectors.EpollSelector):
        return
    assert cap_io_events(loop)
    capped = vars(selector)["select"]
    probe = SlowCallbackProbe(0.05)
    probe.install()
    try:
        assert vars(selector)["select"] is not capped  # the probe times it
        await asyncio.sleep(0)
    finally:
        probe.uninstall()
    try:
        assert vars(selector)["select"] is capped  # the cap stays after the probe is gone
    finally:
        uncap_io_events(loop)
    assert "select" not in vars(selector)
