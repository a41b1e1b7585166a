"""deploy/haproxy.cfg, as shipped, in front of two stand-in nodes (tests/harness/haproxy.py):
both participants of a visit reach the node running its room, rooms spread over the nodes, and
when a room's node dies the room's next connection reaches the other node within about the
two missed health checks."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness.fixtures import FailureArtifacts
from tests.harness.haproxy import INSECURE, HAProxy, StandInNode, fetch, render_config
from tests.harness.server import ConsultServer

# Two missed checks 500 ms apart take a node out; the rest is this loaded machine's slack.
FAILOVER_BOUND_S = 4.0


@pytest.fixture
async def cluster(
    tmp_path: Path, haproxy, failure_artifacts: FailureArtifacts
) -> AsyncIterator[tuple[HAProxy, dict[str, StandInNode]]]:
    nodes = {name: StandInNode(tmp_path, name) for name in ("node-a", "node-b")}
    try:
        for node in nodes.values():
            await node.astart()
        # On the loopback address: this needs no private network namespace.
        proxy = await haproxy([n.address for n in nodes.values()], host="127.0.0.1")
        await asyncio.to_thread(_wait_all_up, proxy, nodes)
        yield proxy, nodes
    finally:
        for node in nodes.values():
            node.stop()
        if failure_artifacts.failed:
            for node in nodes.values():
                failure_artifacts.copy(node.stderr_path)


def _node(proxy: HAProxy, path: str) -> str:
    status, body = fetch(proxy.url(path))
    assert status == 200, (status, body)
    return json.loads(body)["node"]


def _rooms(n: int) -> list[str]:
    return [f"/ws/rooms/{uuid.uuid4().hex[:12]}" for _ in range(n)]


def _wait_all_up(proxy: HAProxy, nodes: dict[str, StandInNode], timeout: float = 30.0) -> None:
    """Until the ordinary pages have been served by every node (both passed their checks)."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while seen != set(nodes):
        status, body = fetch(proxy.url(f"/any/{uuid.uuid4().hex}"))
        if status == 200:
            seen.add(json.loads(body)["node"])
        assert time.monotonic() < deadline, f"only {seen} answered through HAProxy\n{proxy.logs()}"
        time.sleep(0.1)


def test_the_shipped_file_renders_and_haproxy_accepts_it(tmp_path: Path):
    proxy = HAProxy(tmp_path, [("127.0.0.1", 20001), ("127.0.0.1", 20002), ("127.0.0.1", 20003)])
    proxy.check()
    text = proxy.conf_path.read_text()
    assert text.count("server node3 127.0.0.1:20003 check") == 2  # in both backends
    assert "10.0.0.11" not in text and "/etc/consult" not in text
    with pytest.raises(AssertionError, match="expected 1"):
        doc = tmp_path / "drifted.cfg"
        doc.write_text(Path(proxy.conf_path).read_text())
        render_config(host="127.0.0.1", port=1, redirect_port=2, pem=tmp_path / "x.pem", nodes=[], path=doc)


async def test_a_room_always_reaches_the_same_node_and_rooms_spread(cluster):
    proxy, nodes = cluster
    placed = {}
    for room in _rooms(24):
        placed[room] = _node(proxy, room)
        # The doctor and the patient: the same room path, different tokens in the query.
        for token in ("host-token", "guest-token", "guest-token-again"):
            assert _node(proxy, f"{room}?token={token}") == placed[room], room
    assert set(placed.values()) == set(nodes), f"24 rooms all on {set(placed.values())}"
    # The proxy says who the client was and that it came over HTTPS; a client's own claim is dropped.
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http", "Forwarded": "for=203.0.113.9"}
    _status, body = fetch(proxy.url("/login"), headers=forged)
    answer = json.loads(body)
    assert (answer["forwarded_for"], answer["forwarded_proto"]) == ("127.0.0.1", "https")
    # Plain HTTP is sent to HTTPS.
    conn = http.client.HTTPConnection(proxy.host, proxy.redirect_port, timeout=5)
    try:
        conn.request("GET", "/login", headers={"Host": "consult.hospital.example"})
        answer = conn.getresponse()
        assert (answer.status, answer.getheader("Location")) == (
            301,
            "https://consult.hospital.example/login",
        )
    finally:
        conn.close()


async def test_both_participants_websockets_reach_the_rooms_node(cluster):
    proxy, _nodes = cluster
    room = _rooms(1)[0]
    expected = _node(proxy, room)
    async with aiohttp.ClientSession() as session:
        answers = []
        for token in ("host", "guest"):
            async with session.ws_connect(proxy.url(f"{room}?token={token}"), ssl=INSECURE) as ws:
                await ws.send_str(token)
                answers.append((await ws.receive(timeout=10)).data)
    assert answers == [f"{expected} {room} host", f"{expected} {room} guest"]


async def test_a_dead_nodes_rooms_reach_the_other_node_quickly_and_stay_there(cluster):
    proxy, nodes = cluster
    rooms = _rooms(16)
    placed = {room: _node(proxy, room) for room in rooms}
    victim = placed[rooms[0]]
    survivor = next(name for name in nodes if name != victim)
    moved = [room for room in rooms if placed[room] == victim]
    stayed = [room for room in rooms if placed[room] == survivor]

    nodes[victim].kill9()
    killed = time.monotonic()
    while True:
        status, body = fetch(proxy.url(moved[0]), timeout=2)
        if status == 200 and json.loads(body)["node"] == survivor:
            break
        assert time.monotonic() - killed < FAILOVER_BOUND_S, f"still {status} {body}\n{proxy.logs()}"
        await asyncio.sleep(0.05)
    took = time.monotonic() - killed
    print(f"room reached {survivor} {took:.2f} s after {victim} was killed")
    assert all(_node(proxy, room) == survivor for room in moved)
    assert all(_node(proxy, room) == survivor for room in stayed)  # nothing else moved

    # The dead node comes back: its rooms stay where they were taken over (the stick table),
    # so a participant reconnecting later meets the other one on the same node.
    nodes[victim].start()
    await asyncio.to_thread(_wait_all_up, proxy, nodes)
    assert all(_node(proxy, room) == survivor for room in moved)
    # A new room may go to either: the hash uses the returned node again once the rooms'
    # backend, whose health checks are its own, has seen it up too.
    deadline = time.monotonic() + 30
    fresh: set[str] = set()
    while fresh != set(nodes):
        assert time.monotonic() < deadline, f"new rooms only reach {fresh}\n{proxy.logs()}"
        fresh |= {_node(proxy, room) for room in _rooms(8)}
        await asyncio.sleep(0.1)


async def test_a_real_node_behind_it_sees_the_client_over_https(tmp_path: Path, haproxy):
    """The headers the shipped file sets are the ones Consult believes from a trusted proxy:
    Secure __Host- cookies and HSTS (the scheme), and the call's WebSocket origin check (the host)."""
    node = ConsultServer(
        tmp_path / "node-data",
        log_dir=tmp_path,
        host="127.0.0.1",
        env={"CONSULT_TRUSTED_PROXIES": "127.0.0.1"},
    )
    await asyncio.to_thread(node.init, demo=True)
    await node.astart()
    try:
        proxy = await haproxy([(node.host, node.port)], host="127.0.0.1")
        deadline = time.monotonic() + 30
        while fetch(proxy.url("/healthz"))[0] != 200:
            assert time.monotonic() < deadline, proxy.logs()
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url("/login"), ssl=INSECURE) as resp:
                assert resp.status == 200
                assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
                cookies = resp.headers.getall("Set-Cookie")
                assert any(c.startswith("__Host-") and "Secure" in c for c in cookies), cookies
            room = proxy.url("/ws/rooms/AAAAAAAAAAAAAAAAAAAAAA?token=not-a-token")
            with pytest.raises(aiohttp.WSServerHandshakeError) as foreign:
                await session.ws_connect(room, ssl=INSECURE, origin="https://elsewhere.example")
            assert foreign.value.status == 403
            # From the page's own origin the origin check passes (the token is what fails then).
            try:
                ws = await session.ws_connect(room, ssl=INSECURE, origin=proxy.origin)
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status != 403, exc
            else:
                await ws.close()
    finally:
        node.stop()
