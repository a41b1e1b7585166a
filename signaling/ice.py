"""ICE server lists for clients, with TURN REST credentials (coturn `use-auth-secret`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from signaling.config import SignalingConfig


def turn_credentials(secret: str, user_id: str, expiry: int) -> tuple[str, str]:
    """Return (username, password) valid until unix time `expiry`.

    coturn recomputes the HMAC from its copy of the secret, so no per-user state is shared.
    """
    username = f"{expiry}:{user_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(config: SignalingConfig, user_id: str, now: float) -> list[dict[str, Any]]:
    """RTCIceServer dicts for one participant. Empty configuration gives an empty list:
    a public STUN server is never a silent default (it would leak patients' addresses)."""
    servers: list[dict[str, Any]] = []
    if config.turn_urls:
        username, credential = turn_credentials(config.turn_secret, user_id, int(now) + config.turn_ttl_s)
        servers.append({"urls": list(config.turn_urls), "username": username, "credential": credential})
    if config.stun_urls:
        servers.append({"urls": list(config.stun_urls)})
    return servers
