"""Parsing and validation of client messages (see docs/protocol.md).

Everything a client sends passes through `parse`, which either returns a dict whose fields have
the documented types or raises `ProtocolError`; room code can then trust the shapes.
"""

from __future__ import annotations

import json
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
MAX_CHAT_CHARS: Final = 2000
PAIR_TYPES: Final = frozenset({"host", "srflx", "prflx", "relay"})
ICE_STATES: Final = frozenset(
    {"new", "checking", "connected", "completed", "failed", "disconnected", "closed"}
)

# type -> {field: (accepted python types, required)}
_NUMBER = (int, float)
_SCHEMA: Final[dict[str, dict[str, tuple[tuple[type, ...], bool]]]] = {
    # `instance`: an id of this page instance (a reload is a new one); see "Media survives
    # signaling" in docs/protocol.md.
    "hello": {"version": ((int,), True), "token": ((str,), True), "instance": ((str, type(None)), False)},
    "signal": {"data": ((dict,), True)},
    "chat": {"text": ((str,), True)},
    "admit": {},
    # The guest's patient pressed Join: media may flow and the clock may start.
    "join": {},
    "end": {},
    "leave": {},
    "ping": {},
    "ice_state": {
        "state": ((str,), True),
        "pair_type": ((str, type(None)), False),
        "rtt_ms": ((*_NUMBER, type(None)), False),
    },
    "ice_restart": {},
    "stats": {"sample": ((dict,), True)},
    # This side's uplink verdict and whether it asks for audio only; relayed to the other side.
    "quality": {"uplink": ((str,), True), "audio_only": ((bool,), False)},
    # The recording leg (docs/recording.md): a send-only connection to the server.
    "record_offer": {"sdp": ((str,), True)},
    "record_candidate": {"candidate": ((dict, type(None)), True)},
}
CLIENT_TYPES: Final = frozenset(_SCHEMA)
MAX_INSTANCE_CHARS: Final = 64
UPLINK_VERDICTS: Final = frozenset({"good", "fair", "poor"})

# Error codes the server itself sends (a policy's `Refused` codes come on top of these).
ERROR_CODES: Final = frozenset(
    {
        "bad_json",
        "not_object",
        "bad_field",
        "unknown_type",
        "too_large",
        "binary",
        "rate_limited",
        "over_budget",
        "hello_required",
        "hello_timeout",
        "unsupported_version",
        "duplicate_hello",
        "invalid_token",
        "invalid_role",
        "too_early",
        "too_late",
        "room_ended",
        "peer_absent",
        "forbidden",
        "internal",
        "recording_off",
        "not_admitted",
        "not_joined",
        "recording_failed",
    }
)


class ProtocolError(Exception):
    """A client message that cannot be accepted; answered with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def too_large(text: str, max_bytes: int) -> bool:
    # Encoding every frame to count bytes would cost a copy; a str of n code points is at
    # most 4n UTF-8 bytes, so only long frames need the exact count.
    return len(text) > max_bytes or (len(text) * 4 > max_bytes and len(text.encode()) > max_bytes)


def parse(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolError("bad_json", "The message is not valid JSON.") from None
    if not isinstance(message, dict):
        raise ProtocolError("not_object", "Each message must be a JSON object.")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_field", "The message has no string 'type'.")
    schema = _SCHEMA.get(kind)
    if schema is None:
        raise ProtocolError("unknown_type", f"Unknown message type {kind[:40]!r}.")
    for name, (types, required) in schema.items():
        if name not in message:
            if required:
                raise ProtocolError("bad_field", f"'{kind}' needs the field '{name}'.")
            continue
        value = message[name]
        # bool is an int in Python, but `true` is not a number in this protocol.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError("bad_field", f"Field '{name}' of '{kind}' has the wrong type.")
    if kind == "chat" and not 0 < len(message["text"]) <= MAX_CHAT_CHARS:
        raise ProtocolError("bad_field", f"Chat text must be 1 to {MAX_CHAT_CHARS} characters.")
    if kind == "ice_state":
        if message["state"] not in ICE_STATES:
            raise ProtocolError("bad_field", "Unknown ICE state.")
        pair_type = message.get("pair_type")
        if pair_type is not None and pair_type not in PAIR_TYPES:
            raise ProtocolError("bad_field", "pair_type must be host, srflx, prflx or relay.")
    if kind == "hello" and message.get("instance") is not None:
        if not 0 < len(message["instance"]) <= MAX_INSTANCE_CHARS:
            raise ProtocolError("bad_field", f"instance must be 1 to {MAX_INSTANCE_CHARS} characters.")
    if kind == "quality" and message["uplink"] not in UPLINK_VERDICTS:
        raise ProtocolError("bad_field", "uplink must be good, fair or poor.")
    if kind == "record_offer" and not message["sdp"].startswith("v=0"):
        raise ProtocolError("bad_field", "record_offer needs an SDP offer.")
    return message
