"""Sign-in, registration confirmed by an SMS code, a patient's password reset by SMS code,
sign-out and language choice."""

from __future__ import annotations

import time

import aiohttp_jinja2
from aiohttp import web

from consult.accounts import users as accounts
from consult.accounts.codes import CODES, Checked, Registration
from consult.accounts.passwords import check_strength
from consult.accounts.throttle import DEVICE_COOKIE, DEVICE_DAYS
from consult.accounts.users import HOME_BY_ROLE, User
from consult.core import i18n, keys, security
from consult.core.errors import BadRequest, Conflict, ConsultError, TooManyRequests
from consult.core.forms import field, form, redirect, safe_next
from consult.core.i18n import _, ngettext
from consult.core.middleware import LANG_COOKIE
from consult.core.templates import TEXT_SIZE_COOKIE


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/login", login_page, name="login")
    r.add_post("/login", login_submit)
    r.add_get("/register", register_page, name="register")
    r.add_post("/register", register_submit)
    r.add_get("/register/verify", register_verify_page, name="register_verify")
    r.add_post("/register/verify", register_verify_submit)
    r.add_post("/register/resend", register_resend, name="register_resend")
    r.add_get("/password/forgot", forgot_page, name="password_forgot")
    r.add_post("/password/forgot", forgot_submit)
    r.add_get("/password/reset", reset_page, name="password_reset")
    r.add_post("/password/reset", reset_submit)
    r.add_post("/password/resend", reset_resend, name="password_resend")
    r.add_post("/logout", logout, name="logout")
    r.add_post("/logout-all", logout_all, name="logout_all")
    r.add_post("/lang", set_language, name="lang")
    r.add_post("/text-size", set_text_size, name="text_size")
    r.add_get("/account", account_page, name="account")
    r.add_post("/account/password", change_password, name="change_password")


def _set_session_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    security.set_session_cookie(request, response, token)


async def login_page(request: web.Request) -> web.Response:
    if request.get(keys.USER):
        raise web.HTTPSeeOther(HOME_BY_ROLE[request[keys.USER].role])
    notice = _("Your password was changed. Sign in with the new one.") if "reset" in request.query else None
    return aiohttp_jinja2.render_template(
        "login.html",
        request,
        {"error": None, "notice": notice, "identifier": "", "next": request.query.get("next", "")},
    )


async def login_submit(request: web.Request) -> web.Response:
    data = await form(request)
    identifier = (data.get("identifier") or "").strip()[:64]
    password = data.get("password") or ""
    next_url = data.get("next", "")
    throttle = request.app[keys.THROTTLE]
    address = security.client_address(request)

    def fail(message: str, status: int = 400) -> web.Response:
        return aiohttp_jinja2.render_template(
            "login.html",
            request,
            {"error": message, "notice": None, "identifier": identifier, "next": next_url},
            status=status,
        )

    if not identifier or not password:
        return fail(_("Enter your mobile number or username, and your password."))
    # Reserved (counted as a failure) before the password is checked: parallel guesses cannot
    # all slip under the limit.
    device = throttle.device_of(request.cookies.get(DEVICE_COOKIE))
    try:
        attempt = await throttle.reserve(identifier, address, device)
    except TooManyRequests as exc:
        response = fail(exc.message, 429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    row = attempt.user
    ok = await request.app[keys.PASSWORDS].verify_async(row["password_hash"] if row else None, password)
    if not ok or row is None:
        return fail(_("The mobile number, username or password is wrong."), 401)
    await throttle.succeeded(attempt)
    user = User.from_row(row)
    token = await request.app[keys.SESSIONS].create(user.id, address, request.headers.get("User-Agent"))
    security.renew_csrf(request, token)
    response = redirect(safe_next(next_url, HOME_BY_ROLE[user.role]))
    _set_session_cookie(request, response, token)
    if device is None or device[0] != user.id:
        # This browser now knows the password: others' failures no longer slow it down.
        response.set_cookie(
            DEVICE_COOKIE,
            throttle.device_token(user.id),
            httponly=True,
            secure=security.is_https(request),
            samesite="Lax",
            path="/login",
            max_age=DEVICE_DAYS * 86400,
        )
    return response


async def register_page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("register.html", request, {"error": None, "values": {}})


async def register_submit(request: web.Request) -> web.Response:
    """Check the form, then text a code to the number; the account is made once it comes back."""
    data = await form(request)
    values = {"name": data.get("name", ""), "phone": data.get("phone", "")}
    settings = request.app[keys.SETTINGS]
    try:
        name = field(data, "name", max_len=100)
        phone = accounts.normalize_phone(data.get("phone", "")[:40], settings.phone_region)
        password = data.get("password") or ""
        if password != data.get("password2"):
            raise BadRequest(_("The two passwords do not match."))
        problem = check_strength(password)
        if problem:
            raise BadRequest(problem)
        if await request.app[keys.DB].execute_fn(lambda db: accounts.phone_taken(db, phone)):
            raise Conflict(_("An account with this mobile number already exists."))
        remote = security.client_address(request)
        # Before the argon2 hash: a flood costs one small write per try, then a 429.
        await request.app[keys.THROTTLE].reserve_registration(remote)
        password_hash = await request.app[keys.PASSWORDS].hash_async(password)
        flow = request.app[CODES].new_flow()
        registration = Registration(name, password_hash, request.get(keys.LOCALE))
        await request.app[CODES].start_registration(phone, flow, remote, registration)
    except ConsultError as exc:
        return _form_error("register.html", request, exc, {"values": values})
    response = redirect("/register/verify")
    _set_flow(request, response, phone, flow)
    return response


async def register_verify_page(request: web.Request) -> web.Response:
    pending = _pending_flow(request, "/register")
    return _verify_page(request, pending, notice=_sent_notice(request))


async def register_verify_submit(request: web.Request) -> web.Response:
    data = await form(request)
    pending = _pending_flow(request, "/register")
    phone, flow, _sent = pending
    remote = security.client_address(request)
    try:
        checked = await request.app[CODES].confirm_registration(phone, flow, data.get("code"), remote)
    except ConsultError as exc:
        return _verify_page(request, pending, error=exc.message, status=exc.status)
    if checked.status != "ok":
        return _verify_page(request, pending, error=_code_problem(checked), status=400)
    assert checked.user_id is not None
    token = await request.app[keys.SESSIONS].create(
        checked.user_id, remote, request.headers.get("User-Agent")
    )
    security.renew_csrf(request, token)
    response = redirect("/patient")
    _set_session_cookie(request, response, token)
    _clear_flow(request, response)
    return response


async def register_resend(request: web.Request) -> web.Response:
    pending = _pending_flow(request, "/register")
    phone, flow, _sent = pending
    try:
        found = await request.app[CODES].resend_registration(phone, flow, security.client_address(request))
    except ConsultError as exc:
        return _verify_page(request, pending, error=exc.message, status=exc.status, exc=exc)
    if not found:
        return _verify_page(request, pending, error=_code_problem(Checked("none")), status=400)
    response = redirect("/register/verify?sent=1")
    _set_flow(request, response, phone, flow)
    return response


async def forgot_page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("password_forgot.html", request, {"error": None, "phone": ""})


async def forgot_submit(request: web.Request) -> web.Response:
    """Text a code if the number is a patient's; the answer is the same whether it is or not."""
    data = await form(request)
    raw = (data.get("phone") or "")[:40]
    typed = accounts.compact_phone(raw)
    try:
        if not accounts.phone_lookups(raw):
            accounts.normalize_phone(raw, request.app[keys.SETTINGS].phone_region)  # says what is wanted
            raise BadRequest(_("Enter your mobile number."))
        flow = request.app[CODES].new_flow()
        await request.app[CODES].start_reset(typed, flow, security.client_address(request))
    except ConsultError as exc:
        return _form_error("password_forgot.html", request, exc, {"phone": raw})
    response = redirect("/password/reset")
    _set_flow(request, response, typed, flow)
    return response


async def reset_page(request: web.Request) -> web.Response:
    pending = _pending_flow(request, "/password/forgot")
    return _reset_page(request, pending, notice=_sent_notice(request))


async def reset_submit(request: web.Request) -> web.Response:
    data = await form(request)
    pending = _pending_flow(request, "/password/forgot")
    typed, flow, _sent = pending
    password = data.get("password") or ""
    if password != data.get("password2"):
        return _reset_page(request, pending, error=_("The two passwords do not match."), status=400)
    problem = check_strength(password)
    if problem:
        return _reset_page(request, pending, error=problem, status=400)
    passwords = request.app[keys.PASSWORDS]
    checked = await request.app[CODES].reset_password(
        typed,
        flow,
        data.get("code"),
        lambda: passwords.hash_async(password),
        security.client_address(request),
    )
    if checked.status != "ok":
        # One message for every failure: a reset never tells whether the number has an account.
        if checked.status == "malformed":
            error = _("Enter the 6-digit code from the text message.")
        else:
            error = _("The code is wrong or no longer works. Check the text message, or ask for a new code.")
        return _reset_page(request, pending, error=error, status=400)
    assert checked.user_id is not None
    request.app[keys.SESSIONS].forget_user(checked.user_id)  # its sessions ended with the reset
    response = redirect("/login?reset=1")
    _clear_flow(request, response)
    return response


async def reset_resend(request: web.Request) -> web.Response:
    pending = _pending_flow(request, "/password/forgot")
    typed, flow, _sent = pending
    try:
        await request.app[CODES].start_reset(typed, flow, security.client_address(request))
    except ConsultError as exc:
        return _reset_page(request, pending, error=exc.message, status=exc.status, exc=exc)
    response = redirect("/password/reset?sent=1")
    _set_flow(request, response, typed, flow)
    return response


# -- the code pages' helpers ---------------------------------------------------------------

FLOW_COOKIE = "consult_code"


def _flow_cookie_name(request: web.Request) -> str:
    return (security.HOST_PREFIX if security.is_https(request) else "") + FLOW_COOKIE


def _set_flow(request: web.Request, response: web.StreamResponse, phone: str, flow: str) -> None:
    """Which number this browser is confirming, its flow token, and when the code went out (for
    the resend countdown)."""
    settings = request.app[keys.SETTINGS]
    response.set_cookie(
        _flow_cookie_name(request),
        f"{phone}.{flow}.{int(time.time())}",
        httponly=True,
        secure=security.is_https(request),
        samesite="Lax",
        path="/",
        max_age=settings.sms_code_window_minutes * 60,
    )


def _clear_flow(request: web.Request, response: web.StreamResponse) -> None:
    secure = security.is_https(request)
    response.del_cookie(_flow_cookie_name(request), path="/", secure=secure or None)


def _pending_flow(request: web.Request, start: str) -> tuple[str, str, int]:
    """The code flow this browser is in; without one, back to where a flow starts."""
    pending = _read_flow(request)
    if pending is None:
        raise web.HTTPSeeOther(start)
    return pending


def _read_flow(request: web.Request) -> tuple[str, str, int] | None:
    value = request.cookies.get(_flow_cookie_name(request), "")
    parts = value.split(".")
    if len(value) > 120 or len(parts) != 3 or not accounts.phone_lookups(parts[0]) or not parts[1]:
        return None
    phone, flow, sent = parts
    return phone, flow, int(sent) if sent.isascii() and sent.isdigit() else 0


def _resend_in(request: web.Request, sent: int) -> int:
    wait = sent + request.app[keys.SETTINGS].sms_code_resend_seconds - time.time()
    return max(0, min(int(wait + 0.999), request.app[keys.SETTINGS].sms_code_resend_seconds))


def _sent_notice(request: web.Request) -> str | None:
    return _("A new code was sent.") if "sent" in request.query else None


def _code_problem(checked: Checked) -> str:
    if checked.status == "malformed":
        return _("Enter the 6-digit code from the text message.")
    if checked.status == "wrong":
        return ngettext(
            "The code is wrong. You can try %(n)d more time.",
            "The code is wrong. You can try %(n)d more times.",
            checked.left,
        ) % {"n": checked.left}
    if checked.status == "dead":
        return _("This code was entered wrongly too many times and no longer works. Ask for a new code.")
    if checked.status == "expired":
        return _("This code has expired. Ask for a new code.")
    return _("Nothing is waiting for a code from this browser any more. Please start again.")


def _code_context(request: web.Request, pending: tuple[str, str, int], **extra: object) -> dict:
    phone, _flow, sent = pending
    return {
        "error": None,
        "notice": None,
        "phone": phone,
        "phone_display": f"{phone[:3]} {phone[3:7]} {phone[7:]}" if len(phone) == 11 else phone,
        "resend_in": _resend_in(request, sent),
        "minutes": request.app[keys.SETTINGS].sms_code_minutes,
        **extra,
    }


def _code_page(
    template: str,
    request: web.Request,
    pending: tuple[str, str, int],
    *,
    error: str | None = None,
    notice: str | None = None,
    status: int = 200,
    exc: ConsultError | None = None,
) -> web.Response:
    """A page that asks for the texted code (sign-up or password reset)."""
    response = aiohttp_jinja2.render_template(
        template, request, _code_context(request, pending, error=error, notice=notice), status=status
    )
    if isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _verify_page(request: web.Request, pending: tuple[str, str, int], **kwargs) -> web.Response:
    return _code_page("register_verify.html", request, pending, **kwargs)


def _reset_page(request: web.Request, pending: tuple[str, str, int], **kwargs) -> web.Response:
    return _code_page("password_reset.html", request, pending, **kwargs)


def _form_error(template: str, request: web.Request, exc: ConsultError, context: dict) -> web.Response:
    response = aiohttp_jinja2.render_template(
        template, request, {"error": exc.message, **context}, status=exc.status
    )
    if isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def logout(request: web.Request) -> web.Response:
    token = request.cookies.get(security.session_cookie_name(request))
    if token:
        await request.app[keys.SESSIONS].revoke(token)
    security.renew_csrf(request, None)
    response = redirect("/login")
    security.delete_session_cookie(request, response)
    return response


async def logout_all(request: web.Request) -> web.Response:
    user = security.require(request)
    await request.app[keys.SESSIONS].revoke_all(user.id)
    security.renew_csrf(request, None)
    response = redirect("/login")
    security.delete_session_cookie(request, response)
    return response


async def set_language(request: web.Request) -> web.Response:
    data = await form(request)
    locale = data.get("locale", "")
    if locale not in i18n.LOCALES:
        raise BadRequest(_("Unknown language."))
    user = request.get(keys.USER)
    if user is not None:
        await request.app[keys.DB].execute_write_fn(lambda db: accounts.set_locale_sync(db, user.id, locale))
        request.app[keys.SESSIONS].forget_user(user.id)  # its sessions carry the language
    response = redirect(safe_next(data.get("next"), "/"))
    response.set_cookie(
        LANG_COOKIE,
        locale,
        max_age=365 * 86400,
        samesite="Lax",
        httponly=True,
        secure=security.is_https(request),
        path="/",
    )
    return response


async def set_text_size(request: web.Request) -> web.Response:
    """The header's large-text switch: a cookie the pages are written from (core/templates.py)."""
    data = await form(request)
    size = data.get("size", "")
    if size not in ("large", "normal"):
        raise BadRequest(_("Unknown text size."))
    response = redirect(safe_next(data.get("next"), "/"))
    if size == "large":
        response.set_cookie(
            TEXT_SIZE_COOKIE,
            "large",
            max_age=365 * 86400,
            samesite="Lax",
            httponly=True,
            secure=security.is_https(request),
            path="/",
        )
    else:
        response.del_cookie(TEXT_SIZE_COOKIE, path="/")
    return response


async def account_page(request: web.Request) -> web.Response:
    user = security.require(request)
    return aiohttp_jinja2.render_template("account.html", request, {"error": None, "done": False, "me": user})


async def change_password(request: web.Request) -> web.Response:
    user = security.require(request)
    data = await form(request)
    db = request.app[keys.DB]
    passwords = request.app[keys.PASSWORDS]
    stored = await db.execute_fn(lambda d: accounts.password_hash_of(d, user.id))
    error = None
    if not await passwords.verify_async(stored, data.get("current", "")):
        error = _("The current password is wrong.")
    elif data.get("new") != data.get("new2"):
        error = _("The two passwords do not match.")
    else:
        error = check_strength(data.get("new", ""))
    if error:
        return aiohttp_jinja2.render_template(
            "account.html", request, {"error": error, "done": False, "me": user}, status=400
        )
    new_hash = await passwords.hash_async(data["new"])
    # Ends every session (other devices sign in again); this one gets a fresh session below.
    await db.execute_write_fn(lambda d: accounts.set_password_sync(d, user.id, new_hash))
    request.app[keys.SESSIONS].forget_user(user.id)
    token = await request.app[keys.SESSIONS].create(
        user.id, security.client_address(request), request.headers.get("User-Agent")
    )
    security.renew_csrf(request, token)
    response = aiohttp_jinja2.render_template(
        "account.html", request, {"error": None, "done": True, "me": user}
    )
    _set_session_cookie(request, response, token)
    return response
