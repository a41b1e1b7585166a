"""Request pipeline: locale and session → errors → CSRF → handler.

Context comes first so that error pages speak the request's language and know who is signed in.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from consult.core import i18n, keys, security
from consult.core.errors import ConsultError, TooManyRequests, Unauthorized, is_storage_full, storage_error
from consult.core.i18n import _
from consult.core.templates import template_context

log = logging.getLogger(__name__)

LANG_COOKIE = "consult_lang"
CSRF_EXEMPT_PREFIXES = ("/api/payments/callback", "/ws/")


def wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path.startswith("/ws/")


def error_response(request: web.Request, status: int, code: str, message: str) -> web.Response:
    if wants_json(request):
        return web.json_response({"error": code, "message": message}, status=status)
    try:
        context = {**template_context(request), "status": status, "code": code, "message": message}
        response = aiohttp_jinja2.render_template("error.html", request, context, status=status)
    except Exception:  # the error page itself must never fail
        log.exception("error page failed to render")
        response = web.Response(status=status, text=message, content_type="text/plain")
    return response


HTTP_MESSAGES = {
    404: lambda: _("This page does not exist."),
    405: lambda: _("This action is not allowed here."),
    413: lambda: _("What you sent is too large."),
}


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except Unauthorized as exc:
        if wants_json(request) or request.method != "GET":
            return error_response(request, exc.status, exc.code, exc.message)
        raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}") from None
    except ConsultError as exc:
        return response_for(request, exc)  # logged when it is ours (5xx): a full disk, no database
    except web.HTTPException as exc:
        if exc.status < 400 or exc.status in (101,):
            raise
        reason = exc.reason
        message = HTTP_MESSAGES[exc.status]() if exc.status in HTTP_MESSAGES else reason
        # The router's 404 and 405 are kept on the request (its MatchInfoError), and their
        # traceback holds this frame, which holds the request: a reference cycle per unknown URL.
        exc.__traceback__ = None
        return error_response(request, exc.status, reason.lower().replace(" ", "_"), message)
    except OSError as exc:
        if is_storage_full(exc) or not isinstance(request.match_info.route.resource, web.StaticResource):
            return response_for(request, exc)
        # A static file name the OS refuses (too long, bad bytes) is simply not one of ours.
        return error_response(request, 404, "not_found", HTTP_MESSAGES[404]())
    except Exception as exc:
        return response_for(request, exc)


def plain_response(exc: web.HTTPException) -> web.Response:
    """A raised HTTPException (a redirect) as a plain response to return.

    Raised on into aiohttp, the exception becomes the response its request handler keeps in a
    local, and the exception's traceback holds that handler's frame: a reference cycle (with the
    request and all it holds) per redirect, which only the garbage collector frees. Status, reason,
    headers, body and cookies are copied; nothing here raises one with compression, chunking or
    a forced close set. Returned like any response, a redirect now also gets the CSRF cookie
    when this request minted one, as the redirects views return (forms.redirect) always did.
    """
    response = web.Response(status=exc.status, reason=exc.reason, headers=exc.headers, body=exc.body)
    if exc.cookies:
        response.cookies.update(exc.cookies)
    exc.__traceback__ = None
    return response


def consult_error_response(request: web.Request, exc: ConsultError) -> web.Response:
    response = error_response(request, exc.status, exc.code, exc.message)
    if isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def response_for(request: web.Request, exc: BaseException) -> web.Response:
    """The response for any exception: a ConsultError as itself, a full disk as StorageFull (507),
    a busy database as 503, anything else as a 500. Never raises."""
    try:
        mapped = exc if isinstance(exc, ConsultError) else storage_error(exc)
        if mapped is None:
            return _internal_error(request, exc)
        if not isinstance(exc, ConsultError) or exc.status >= 500:
            log.error("%s on %s %s: %r", mapped.code, request.method, request.path, exc.__cause__ or exc)
        return consult_error_response(request, mapped)
    except Exception:
        log.exception("the error response failed")
        return web.Response(status=500, text="Internal Server Error", content_type="text/plain")


def _internal_error(request: web.Request, exc: BaseException) -> web.Response:
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(
        request,
        500,
        "internal_error",
        _("Something went wrong on our side. Nothing you entered was lost; please try again."),
    )


@web.middleware
async def context_middleware(request: web.Request, handler):
    """Session, language, CSRF cookie; and the last line of defence: nothing escapes it.

    If the session cannot be looked up (its ``last_seen`` write fails on a full disk, the database
    is unavailable) the request is answered with that error rather than handled as signed out.
    """
    app = request.app
    settings = app[keys.SETTINGS]
    csrf_cookie = request.cookies.get(security.csrf_cookie_name(request))
    if csrf_cookie:
        request[keys.CSRF_COOKIE_VALUE] = csrf_cookie
    session_token = request.cookies.get(security.session_cookie_name(request))
    if session_token:
        request[keys.SESSION_TOKEN] = session_token
    user = None
    failure: Exception | None = None
    if not request.path.startswith("/static/"):
        try:
            user = await app[keys.SESSIONS].lookup(session_token)
        except Exception as exc:
            failure = exc
    request[keys.USER] = user
    locale = i18n.choose(
        [request.cookies.get(LANG_COOKIE), user.locale if user else None],
        request.headers.get("Accept-Language"),
        settings.default_locale,
    )
    request[keys.LOCALE] = locale
    token = i18n.set_locale(locale)
    try:
        if failure is not None:
            response = response_for(request, failure)
            # Its traceback holds this frame, which held it: a cycle per request while the
            # database fails, kept by the GcFreezer for an hour (tests/test_request_cycles.py).
            failure = None
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                # redirects (errors_middleware turned every error status into a page)
                response = plain_response(exc)
            except Exception as exc:
                response = response_for(request, exc)
        try:
            security.set_csrf_cookie(request, response)
        except Exception:
            log.exception("setting the CSRF cookie failed on %s %s", request.method, request.path)
        return response
    finally:
        i18n._current.reset(token)
        # aiohttp_jinja2 keeps the templates' context on the request, and its request_processor
        # puts the request in it: a reference cycle on every request, which only the garbage
        # collector frees. The edge's GcFreezer freezes what outlives a middle pass, so under load
        # in-flight requests were frozen and their cycles kept until the hourly hand-back (8,000
        # objects a second at 800 bookings/s). The page is rendered by now: drop the context.
        request.pop(aiohttp_jinja2.REQUEST_CONTEXT_KEY, None)


@web.middleware
async def csrf_middleware(request: web.Request, handler):
    if request.method in security.UNSAFE_METHODS and not request.path.startswith(CSRF_EXEMPT_PREFIXES):
        await security.check_csrf(request)
    return await handler(request)
