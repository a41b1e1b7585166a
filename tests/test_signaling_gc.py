"""What a call's messages leave for the garbage collector.

A connection in a call waits a second or more between messages. Whatever its read loop holds
while it waits outlives the collector's young passes and is scanned again by its middle ones,
then frozen by the server's GcFreezer (consult/ops/edge.py): with 2,000 participants relaying,
the held message, its parsed dict and the ``async for`` step were ~2,300 of the ~7,300 objects a
middle pass scanned every 0.36 s. And anything a message leaves as cyclic garbage would be kept
frozen for up to an hour.
"""

from __future__ import annotations

import asyncio
import gc

from aiohttp import WSMessage

from signaling import SignalingConfig
from signaling.server import SignalingServer
from signaling.testing import InMemoryPolicy
from tests.gc_helpers import collector_paused, cyclic_garbage
from tests.signaling_helpers import add_room, make_app, pair

MESSAGES = 50


def _waiting_read_loops() -> list:
    return [
        o
        for o in gc.get_objects()
        if type(o).__name__ == "coroutine" and o.cr_code is SignalingServer._read_loop.__code__
    ]


async def _call(aiohttp_client):
    """A host and a guest in a call, allowed to send as fast as the test does."""
    policy = InMemoryPolicy()
    add_room(policy, "r1")
    app, _server = make_app(policy, SignalingConfig(rate_limit_per_s=1000, rate_limit_burst=1000))
    return await pair(await aiohttp_client(app))


async def test_a_waiting_connection_holds_nothing_of_the_last_message(aiohttp_client) -> None:
    host, guest = await _call(aiohttp_client)
    for i in range(MESSAGES):
        await host.send({"type": "signal", "data": {"n": i}})
        assert (await guest.next_message("signal"))["data"] == {"n": i}
        await guest.send({"type": "signal", "data": {"n": i}})
        assert (await host.next_message("signal"))["data"] == {"n": i}
    await asyncio.sleep(0.05)  # both read loops back to waiting

    loops = _waiting_read_loops()
    assert len(loops) == 2
    for coro in loops:
        frame = coro.cr_frame
        assert frame is not None, "the read loop ended"
        held = frame.f_locals
        assert "msg" not in held and "message" not in held, sorted(held)
        assert not any(isinstance(v, WSMessage | dict) for v in held.values()), held
        # It awaits the socket's receive() itself, not an ``async for`` step around it.
        assert coro.cr_await.__qualname__ == "WebSocketResponse.receive"


async def test_relayed_messages_leave_no_cyclic_garbage(aiohttp_client) -> None:
    host, guest = await _call(aiohttp_client)
    with collector_paused():
        for i in range(MESSAGES):
            await host.send({"type": "signal", "data": {"n": i}})
            assert (await guest.next_message("signal"))["data"] == {"n": i}
        assert cyclic_garbage() == []
