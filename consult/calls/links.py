"""Call links: signed, unguessable tokens that open one visit's call without signing in.

A token carries the visit's public id, the role, the visit's call nonce and its validity window,
signed with HMAC-SHA256 under the session key. It is valid only from ``EARLY_S`` before the visit
starts until ``LATE_S`` after it ends. Rotating the visit's ``call_nonce`` (reschedule) revokes
every link issued before; the signature check itself needs no database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from consult.core.config import Settings
from consult.core.errors import Forbidden, Gone
from consult.core.i18n import _

EARLY_S = 15 * 60
LATE_S = 15 * 60
ROLES = ("patient", "doctor")


class CallLinkInvalid(Forbidden):
    code = "call_link_invalid"


class CallLinkExpired(Gone):
    code = "call_link_expired"


class CallLinkNotYetValid(Forbidden):
    code = "call_link_early"

    def __init__(self, message: str, opens_at: int, token: CallToken | None = None) -> None:
        super().__init__(message)
        self.opens_at = opens_at
        self.token = token  # genuine (signature checked), only early: the page may show its visit


@dataclass(frozen=True)
class CallToken:
    public_id: str
    role: str
    nonce: str
    not_before: int
    not_after: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(settings: Settings, payload: bytes) -> bytes:
    return hmac.new(settings.session_key.encode(), b"call-link:" + payload, hashlib.sha256).digest()


def make_token(
    settings: Settings, public_id: str, role: str, nonce: str, starts_at: int, ends_at: int
) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown call role {role!r}")
    payload = f"{public_id}|{role}|{nonce}|{int(starts_at) - EARLY_S}|{int(ends_at) + LATE_S}".encode()
    return f"{_b64(payload)}.{_b64(_mac(settings, payload))}"


def decode(settings: Settings, token: str, now: float) -> CallToken:
    """Check signature and validity window; raise a clear error for each way a link can fail."""
    invalid = CallLinkInvalid(_("This call link is not valid. Open the link from your visit page again."))
    if not token or len(token) > 400 or token.count(".") != 1:
        raise invalid
    body, sig = token.split(".")
    try:
        payload, mac = _unb64(body), _unb64(sig)
    except (ValueError, TypeError):
        raise invalid from None
    if not hmac.compare_digest(mac, _mac(settings, payload)):
        raise invalid
    try:
        public_id, role, nonce, nbf, exp = payload.decode().split("|")
        parsed = CallToken(public_id, role, nonce, int(nbf), int(exp))
    except ValueError:
        raise invalid from None
    if parsed.role not in ROLES:
        raise invalid
    if now > parsed.not_after:
        raise CallLinkExpired(_("This call link has expired: the visit is over."))
    if now < parsed.not_before:
        raise CallLinkNotYetValid(
            _("This call link opens 15 minutes before the visit starts."),
            opens_at=parsed.not_before,
            token=parsed,
        )
    return parsed


def verify(settings: Settings, token: str, now: float) -> tuple[str, str]:
    """``(public_id, role)`` of a valid token; ``CallLinkInvalid``/``Expired``/``NotYetValid`` else."""
    parsed = decode(settings, token, now)
    return parsed.public_id, parsed.role


def call_path(token: str) -> str:
    return f"/call/{token}"
