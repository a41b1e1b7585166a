"""Response headers, CSRF tokens and the one authorization helper every view uses."""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp_jinja2
from aiohttp import web

if TYPE_CHECKING:
    from consult.accounts.users import User

from consult.core import keys, proxy
from consult.core.errors import BadRequest, Forbidden, Unauthorized
from consult.core.i18n import _

CSRF_COOKIE = "consult_csrf"
SESSION_COOKIE = "consult_session"  # consult.accounts.users.Sessions issues it
# Over HTTPS (Consult's own TLS, or a trusted proxy's: `is_https`) both cookies carry the __Host-
# prefix: the browser then accepts them only with Secure, Path=/ and no Domain, so a neighbouring
# subdomain or a plain-HTTP page cannot plant or replace them. Over plain HTTP (development,
# tests) browsers refuse such names, so the plain ones are used.
HOST_PREFIX = "__Host-"
# Instead of aiohttp's "Python/3.11 aiohttp/<version>": the name, no versions to look up.
SERVER_HEADER = "Consult"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, static files and errors included."""
    h = response.headers
    h["Server"] = SERVER_HEADER
    h.setdefault("Content-Security-Policy", CSP)
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h.setdefault("X-Frame-Options", "DENY")
    h["Cross-Origin-Opener-Policy"] = "same-origin"
    h["Permissions-Policy"] = "camera=(self), microphone=(self), geolocation=(), payment=()"
    if is_https(request):
        h["Strict-Transport-Security"] = "max-age=31536000"
    if "Cache-Control" not in h and not request.path.startswith("/static/"):
        h["Cache-Control"] = "no-store"


def is_https(request: web.Request) -> bool:
    """Consult serves TLS itself, or a trusted proxy says the client came over HTTPS
    (core/proxy.py): cookies are then Secure and __Host- named, and HSTS is sent."""
    return request.app[keys.SETTINGS].tls or proxy.scheme_of(request) == "https"


def _cookie_name(request: web.Request, name: str) -> str:
    return HOST_PREFIX + name if is_https(request) else name


def session_cookie_name(request: web.Request) -> str:
    return _cookie_name(request, SESSION_COOKIE)


def csrf_cookie_name(request: web.Request) -> str:
    return _cookie_name(request, CSRF_COOKIE)


def _sign(request: web.Request, value: str) -> str:
    """The token for CSRF cookie ``value`` in this session: an HMAC over both, so that a token
    seen before sign-in (or in another session) is worthless after it."""
    key = request.app[keys.SETTINGS].session_key.encode()
    session = request.get(keys.SESSION_TOKEN) or ""
    message = b"csrf:" + value.encode() + b"\x00" + session.encode("utf-8", "replace")
    return hmac.digest(key, message, "sha256").hex()  # one call into C: every request needs it


def csrf_token(request: web.Request) -> str:
    value = request.get(keys.CSRF_COOKIE_VALUE)
    if not value:
        value = secrets.token_urlsafe(24)
        request[keys.CSRF_COOKIE_VALUE] = value
        request[keys.CSRF_NEW] = True
    return _sign(request, value)


def renew_csrf(request: web.Request, session_token: str | None) -> None:
    """Sign-in and sign-out: from here on this request (the page it renders) and the browser (the
    cookie the context middleware sets) use a fresh CSRF value bound to ``session_token``."""
    if session_token:
        request[keys.SESSION_TOKEN] = session_token
    else:
        request.pop(keys.SESSION_TOKEN, None)
    request[keys.CSRF_COOKIE_VALUE] = secrets.token_urlsafe(24)
    request[keys.CSRF_NEW] = True
    # Templates take their context from aiohttp_jinja2's middleware, computed before the handler
    # ran: a page rendered by this request (the password page after a change) needs the new token.
    context = request.get(aiohttp_jinja2.REQUEST_CONTEXT_KEY)
    if isinstance(context, dict) and "csrf_token" in context:
        context["csrf_token"] = csrf_token(request)


def set_session_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    settings = request.app[keys.SETTINGS]
    response.set_cookie(
        session_cookie_name(request),
        token,
        httponly=True,
        secure=is_https(request),
        samesite="Lax",
        path="/",
        max_age=settings.session_absolute_hours * 3600,
    )


def delete_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    secure = is_https(request)
    # A __Host- cookie is only replaced (here: expired) by one that is Secure too.
    response.del_cookie(session_cookie_name(request), path="/", secure=secure or None)


def set_csrf_cookie(request: web.Request, response: web.StreamResponse) -> None:
    if request.get(keys.CSRF_NEW) and not response.prepared:
        response.set_cookie(
            csrf_cookie_name(request),
            request[keys.CSRF_COOKIE_VALUE],
            httponly=True,
            samesite="Lax",
            secure=is_https(request),
            path="/",
        )


def same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin == "null":
        # Under `Referrer-Policy: no-referrer` browsers send `Origin: null` even on the site's own
        # form posts; Sec-Fetch-Site, which no page can set, says whether it really is ours.
        return request.headers.get("Sec-Fetch-Site") == "same-origin"
    return urlsplit(origin).netloc == request.host


async def read_form(request: web.Request):
    """``request.post()``, with a body that does not parse (bad UTF-8 or percent-encoding, a broken
    multipart) refused as a 400 rather than raised as a ValueError. The result is cached."""
    try:
        return await request.post()
    except ValueError:  # UnicodeDecodeError included
        raise BadRequest(
            _("The form could not be read. Reload the page and try again."), code="bad_form"
        ) from None


async def check_csrf(request: web.Request) -> None:
    """Signed double-submit: a random cookie, and an HMAC of it and the session in the form or a
    header."""
    if not same_origin(request):
        raise Forbidden(_("This request came from another site and was refused."), code="bad_origin")
    cookie = request.cookies.get(csrf_cookie_name(request), "")
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        if request.content_type == "application/x-www-form-urlencoded":
            form = await read_form(request)
            value = form.get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
    # compare_digest refuses non-ASCII text with a TypeError: such a token is simply wrong.
    if not cookie or not sent or not sent.isascii() or not hmac.compare_digest(sent, _sign(request, cookie)):
        raise Forbidden(
            _("Your form expired or came from elsewhere. Reload the page and try again."),
            code="csrf",
        )


def require(request: web.Request, *roles: str) -> User:
    """The authorization helper: signed in, and in one of ``roles`` (any role when empty)."""
    user = request.get(keys.USER)
    if user is None:
        raise Unauthorized(_("Please sign in to continue."))
    if roles and user.role not in roles:
        raise Forbidden(_("You do not have permission to open this page."))
    return user


def client_address(request: web.Request) -> str | None:
    """The client's address (behind a trusted proxy, the one it forwarded), masked to its
    network when the mask_addresses setting says so."""
    remote = proxy.remote_of(request)
    if remote and request.app[keys.SETTINGS].mask_addresses:
        return mask_address(remote)
    return remote


def mask_address(remote: str | None) -> str | None:
    """The network part only (/24 or /48): what is stored and shown when masking is on."""
    if not remote:
        return remote
    if ":" in remote:
        return ":".join(remote.split(":")[:3]) + "::/48"
    return ".".join(remote.split(".")[:3]) + ".0/24"
