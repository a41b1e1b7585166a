"""Shared helpers for the signaling tests: an app around a SignalingServer, joined clients."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from signaling import SignalingConfig, SignalingServer
from signaling.client import SignalingClient
from signaling.testing import InMemoryPolicy, make_admission

PATH = "/ws/rooms/{}"


def make_policy(room_id: str = "r1", **terms: Any) -> InMemoryPolicy:
    """A policy with tokens "host-<room>" and "guest-<room>" for one room."""
    policy = InMemoryPolicy()
    add_room(policy, room_id, **terms)
    return policy


def add_room(policy: InMemoryPolicy, room_id: str, **terms: Any) -> None:
    now = time.time()
    policy.register(f"host-{room_id}", make_admission(room_id, "host", now=now, **terms))
    policy.register(f"guest-{room_id}", make_admission(room_id, "guest", now=now, **terms))


def make_app(
    policy: InMemoryPolicy, config: SignalingConfig | None = None
) -> tuple[web.Application, SignalingServer]:
    app = web.Application()
    server = SignalingServer(policy, config or SignalingConfig())
    server.setup(app)
    return app, server


async def connect(client: Any, room_id: str = "r1", **kwargs: Any) -> SignalingClient:
    ws = await client.ws_connect(PATH.format(room_id), **kwargs)
    return SignalingClient(ws)


async def join(client: Any, role: str, room_id: str = "r1", **kwargs: Any) -> SignalingClient:
    sc = await connect(client, room_id, **kwargs)
    await sc.hello(f"{role}-{room_id}")
    return sc


async def pair(client: Any, room_id: str = "r1") -> tuple[SignalingClient, SignalingClient]:
    """Host and guest joined, guest ready (its client sent `join`) and admitted, clock started;
    their messages consumed."""
    host = await join(client, "host", room_id)
    guest = await join(client, "guest", room_id)
    await guest.next_message("waiting")
    await host.next_message("peer_joined")
    await host.next_message("peer_ready")
    await host.send({"type": "admit"})
    await guest.next_message("admitted")
    await guest.next_message("peer_joined")
    await host.next_message("admitted")
    await host.next_message("clock")
    await guest.next_message("clock")
    return host, guest
