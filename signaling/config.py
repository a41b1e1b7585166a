"""Settings of the signaling server, each declared once with its default."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class SignalingConfig:
    # TURN URLs (e.g. "turn:turn.example.org:3478?transport=udp"); credentials are minted per
    # participant from turn_secret (coturn use-auth-secret).
    turn_urls: tuple[str, ...] = ()
    # STUN URLs. Empty by default on purpose: no public server is ever contacted implicitly.
    stun_urls: tuple[str, ...] = ()
    turn_secret: str = ""
    turn_ttl_s: int = 3600
    # "relay" forces media through TURN (hides patient IP addresses from the other party).
    ice_transport_policy: str = "all"
    # Allowed Origin header values; empty means "same host as the request's Host header".
    allowed_origins: tuple[str, ...] = ()
    # Largest accepted client message (bytes of UTF-8 text); larger ones get an error frame.
    max_message_bytes: int = 16384
    # WebSocket ping interval; a peer that misses a pong is considered gone.
    heartbeat_s: float = 20
    # A client whose socket cannot take a message within this time is dropped.
    send_timeout_s: float = 5
    # The first message (hello) must arrive within this time.
    hello_timeout_s: float = 10
    # Token bucket per seat (room + role), shared by its connections, so that reconnecting
    # does not refill it: sustained rate and burst.
    rate_limit_per_s: float = 20
    rate_limit_burst: int = 50
    # At most one stats event per seat per interval (the samples in between are folded into
    # min/max/mean), and an unchanged ice_state at most once per interval.
    telemetry_interval_s: float = 10
    # The numeric sample fields kept in stats events; empty: any, up to stats_max_fields.
    stats_fields: tuple[str, ...] = ()
    stats_max_fields: int = 16
    # Error events recorded per seat and code; after that only counts (10, 100, 1000...).
    error_events_per_code: int = 3
    # A participant whose socket drops (without `leave`) is announced `peer_away` at once and
    # `peer_left` only if no new connection took its seat within this grace: media between
    # the pages goes on without signaling, so a brief outage must not tear it down.
    peer_grace_s: float = 30
    # Messages queued for one client before it is considered too slow and dropped.
    send_queue_max: int = 256
    # Connections that finish their teardown (leave the room, end the response) per event-loop
    # iteration when many close at once; the others wait their turn (connection.TeardownPacer).
    teardowns_per_tick: int = 16

    @cached_property
    def stats_fields_set(self) -> frozenset[str]:
        return frozenset(self.stats_fields)

    def __post_init__(self) -> None:
        if self.ice_transport_policy not in ("all", "relay"):
            raise ValueError("ice_transport_policy must be 'all' or 'relay'")
        if self.turn_urls and not self.turn_secret:
            raise ValueError("turn_urls need turn_secret (TURN REST credentials)")
        if self.ice_transport_policy == "relay" and not self.turn_urls:
            raise ValueError("ice_transport_policy 'relay' needs at least one TURN URL")
        if self.max_message_bytes <= 0 or self.send_timeout_s <= 0:
            raise ValueError("max_message_bytes and send_timeout_s must be positive")
