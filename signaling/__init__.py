"""WebSocket signaling for timed two-party WebRTC rooms.

This package knows nothing about the application that embeds it: the app supplies a
`RoomPolicy` (who may join which room, where room state is kept, where events go) and a
`SignalingConfig`; the package supplies the protocol (docs/protocol.md) and the room rules.
"""

from signaling.config import SignalingConfig
from signaling.ice import ice_servers, turn_credentials
from signaling.policy import (
    EVENT_NAMES,
    Admission,
    PeerInfo,
    Refused,
    RoomEvent,
    RoomPolicy,
    RoomState,
)
from signaling.room import Room
from signaling.server import SignalingServer

__all__ = [
    "EVENT_NAMES",
    "Admission",
    "PeerInfo",
    "Refused",
    "Room",
    "RoomEvent",
    "RoomPolicy",
    "RoomState",
    "SignalingConfig",
    "SignalingServer",
    "ice_servers",
    "turn_credentials",
]
