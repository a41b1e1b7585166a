"""Public ids: what a visit is called in URLs, links and rooms (never its row id).

A visit's public id is ``secrets.token_urlsafe(16)`` (22 characters); anything that looks like
one is 10 to 64 URL-safe characters, which is what every route and check accepts.
"""

from __future__ import annotations

import re
import secrets

PUBLIC_ID_PATTERN = r"[A-Za-z0-9_-]{10,64}"  # for aiohttp routes: "/x/{public_id:" + ... + "}"
_PUBLIC_ID = re.compile(rf"^{PUBLIC_ID_PATTERN}$")


def new_public_id() -> str:
    return secrets.token_urlsafe(16)


def is_public_id(text: str | None) -> bool:
    return bool(text) and _PUBLIC_ID.match(text) is not None
