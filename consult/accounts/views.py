"""Sign-in, registration, sign-out and language choice."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from consult.accounts import users as accounts
from consult.accounts.passwords import check_strength
from consult.accounts.throttle import DEVICE_COOKIE, DEVICE_DAYS
from consult.accounts.users import HOME_BY_ROLE, User
from consult.core import i18n, keys, security
from consult.core.errors import BadRequest, ConsultError, TooManyRequests
from consult.core.forms import field, form, redirect, safe_next
from consult.core.i18n import _
from consult.core.middleware import LANG_COOKIE


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/login", login_page, name="login")
    r.add_post("/login", login_submit)
    r.add_get("/register", register_page, name="register")
    r.add_post("/register", register_submit)
    r.add_post("/logout", logout, name="logout")
    r.add_post("/logout-all", logout_all, name="logout_all")
    r.add_post("/lang", set_language, name="lang")
    r.add_get("/account", account_page, name="account")
    r.add_post("/account/password", change_password, name="change_password")


def _set_session_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    security.set_session_cookie(request, response, token)


async def login_page(request: web.Request) -> web.Response:
    if request.get(keys.USER):
        raise web.HTTPSeeOther(HOME_BY_ROLE[request[keys.USER].role])
    return aiohttp_jinja2.render_template(
        "login.html", request, {"error": None, "identifier": "", "next": request.query.get("next", "")}
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
            {"error": message, "identifier": identifier, "next": next_url},
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
            secure=request.app[keys.SETTINGS].secure_cookies,
            samesite="Lax",
            path="/login",
            max_age=DEVICE_DAYS * 86400,
        )
    return response


async def register_page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("register.html", request, {"error": None, "values": {}})


async def register_submit(request: web.Request) -> web.Response:
    data = await form(request)
    values = {"name": data.get("name", ""), "phone": data.get("phone", "")}
    try:
        name = field(data, "name", max_len=100)
        phone = accounts.normalize_phone(data.get("phone", ""))
        password = data.get("password") or ""
        if password != data.get("password2"):
            raise BadRequest(_("The two passwords do not match."))
        problem = check_strength(password)
        if problem:
            raise BadRequest(problem)
        remote = security.client_address(request)
        # Before the argon2 hash: a flood costs one small write per try, then a 429.
        await request.app[keys.THROTTLE].reserve_registration(remote)
        password_hash = await request.app[keys.PASSWORDS].hash_async(password)
        locale = request.get(keys.LOCALE)
        user_id = await request.app[keys.DB].execute_write_fn(
            lambda db: accounts.create_user_sync(
                db,
                role="patient",
                display_name=name,
                password_hash=password_hash,
                phone=phone,
                locale=locale,
                remote=remote,
            )
        )
    except ConsultError as exc:
        response = aiohttp_jinja2.render_template(
            "register.html", request, {"error": exc.message, "values": values}, status=exc.status
        )
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    token = await request.app[keys.SESSIONS].create(user_id, remote, request.headers.get("User-Agent"))
    security.renew_csrf(request, token)
    response = redirect("/patient")
    _set_session_cookie(request, response, token)
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
    response = redirect(safe_next(data.get("next"), "/"))
    response.set_cookie(
        LANG_COOKIE,
        locale,
        max_age=365 * 86400,
        samesite="Lax",
        httponly=True,
        secure=request.app[keys.SETTINGS].secure_cookies,
        path="/",
    )
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
    token = await request.app[keys.SESSIONS].create(
        user.id, request.remote, request.headers.get("User-Agent")
    )
    security.renew_csrf(request, token)
    response = aiohttp_jinja2.render_template(
        "account.html", request, {"error": None, "done": True, "me": user}
    )
    _set_session_cookie(request, response, token)
    return response
