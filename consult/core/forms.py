"""Small helpers for reading form fields with clear errors."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from consult.core import security
from consult.core.errors import BadRequest
from consult.core.i18n import _


async def form(request: web.Request) -> dict[str, str]:
    data = await security.read_form(request)
    return {k: v for k, v in data.items() if isinstance(v, str)}


# No form of ours nests deeper than a few levels. Refused before parsing: the parser would recurse
# once per level, and a finalizer that the garbage collector runs at the bottom of such a stack
# (hundreds of thousands of "[") fails for lack of stack itself.
_DEEP_JSON = re.compile(r"(?:[\[{]\s*(?:\"(?:[^\"\\]|\\.)*\"\s*:\s*)?){33}")


def json_value(text: str) -> Any:
    """`text` parsed as JSON; ValueError if it is not JSON or nests deeper than 32 levels."""
    if _DEEP_JSON.search(text):
        raise ValueError("JSON nested too deeply")
    try:
        return json.loads(text)
    except RecursionError:  # nesting with other values between the brackets
        raise ValueError("JSON nested too deeply") from None


async def json_body(request: web.Request) -> Any:
    """The request's JSON body; ValueError for anything that is not JSON of a sane depth."""
    return json_value(await request.text())


def field(data: dict[str, Any], name: str, *, required: bool = True, max_len: int = 200) -> str:
    value = (data.get(name) or "").strip()
    if required and not value:
        raise BadRequest(_("Please fill in every required field."))
    if len(value) > max_len:
        raise BadRequest(_("A field is too long."))
    return value


def small_int(raw: str | None, *, signed: bool = False, max_digits: int = 18) -> int | None:
    """ASCII digits that fit SQLite's 64-bit integers, or None (``"²".isdigit()`` is True)."""
    text = (raw or "").strip()
    digits = text[1:] if signed and text.startswith("-") else text
    if not digits or len(digits) > max_digits or not (digits.isascii() and digits.isdigit()):
        return None
    return int(text)


def safe_next(target: str | None, default: str) -> str:
    """Only follow local paths after sign-in (no open redirect)."""
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return default
    if "\\" in target:
        return default
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        # CR/LF would inject headers (aiohttp refuses them with a ValueError, a 500); browsers
        # drop tabs and newlines, so "/\t/evil" is "//evil" to them.
        return default
    return target


def redirect(location: str, status: int = 303) -> web.Response:
    """A redirect that can be returned (and carry cookies), unlike HTTPException objects."""
    return web.Response(status=status, headers={"Location": location})
