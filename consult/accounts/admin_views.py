"""Admin pages: staff accounts, password resets, the development outbox."""

from __future__ import annotations

import secrets

import aiohttp_jinja2
from aiohttp import web

from consult.accounts import staff
from consult.accounts import users as accounts
from consult.accounts.passwords import check_strength
from consult.core import keys, outbox, security
from consult.core.errors import BadRequest, ConsultError, NotFound
from consult.core.forms import field, form
from consult.core.i18n import _


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin", admin_home, name="admin_home")
    r.add_get("/admin/users", users_page, name="admin_users")
    r.add_post("/admin/users", create_staff)
    r.add_post(
        "/admin/users/{user_id:[0-9]{1,18}}/reset-password", reset_password, name="admin_reset_password"
    )
    r.add_post("/admin/users/{user_id:[0-9]{1,18}}/active", set_active, name="admin_set_active")
    r.add_get("/admin/outbox", outbox_page, name="admin_outbox")


async def admin_home(request: web.Request) -> web.Response:
    user = security.require(request, "admin")
    counts = await request.app[keys.DB].execute_fn(staff.count_by_role)
    return aiohttp_jinja2.render_template("admin_home.html", request, {"me": user, "counts": counts})


async def _users_context(request: web.Request) -> dict:
    rows = await request.app[keys.DB].execute_fn(staff.list_staff)
    return {"staff": rows, "error": None, "message": None, "values": {}}


async def users_page(request: web.Request) -> web.Response:
    security.require(request, "admin")
    return aiohttp_jinja2.render_template("admin_users.html", request, await _users_context(request))


async def create_staff(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    data = await form(request)
    ctx = await _users_context(request)
    ctx["values"] = {k: data.get(k, "") for k in ("username", "display_name", "role")}
    try:
        role = data.get("role", "")
        if role not in ("doctor", "admin", "pharmacist"):
            raise BadRequest(_("Choose a role: doctor, pharmacist or admin."))
        username = accounts.normalize_username(data.get("username", ""))
        name = field(data, "display_name", max_len=100)
        password = data.get("password") or ""
        problem = check_strength(password)
        if problem:
            raise BadRequest(problem)
        password_hash = await request.app[keys.PASSWORDS].hash_async(password)
        remote = security.client_address(request)
        await request.app[keys.DB].execute_write_fn(
            lambda db: accounts.create_user_sync(
                db,
                role=role,
                display_name=name,
                password_hash=password_hash,
                username=username,
                actor=admin,
                remote=remote,
            )
        )
    except ConsultError as exc:
        ctx["error"] = exc.message
        return aiohttp_jinja2.render_template("admin_users.html", request, ctx, status=exc.status)
    raise web.HTTPSeeOther("/admin/users")


async def reset_password(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    user_id = int(request.match_info["user_id"])
    db = request.app[keys.DB]
    row = await db.execute_fn(lambda d: staff.get_account(d, user_id))
    if row is None:
        raise NotFound(_("No such account."))
    new_password = secrets.token_urlsafe(9)
    password_hash = await request.app[keys.PASSWORDS].hash_async(new_password)
    remote = security.client_address(request)
    await db.execute_write_fn(
        lambda d: accounts.set_password_sync(
            d, user_id, password_hash, action="account.reset_password", actor=admin, remote=remote
        )
    )
    request.app[keys.SESSIONS].forget_user(user_id)  # its sessions ended with the new password
    ctx = await _users_context(request)
    ctx["message"] = _("New password for %(name)s: %(password)s (shown once; give it to them in person).") % {
        "name": row["display_name"],
        "password": new_password,
    }
    return aiohttp_jinja2.render_template("admin_users.html", request, ctx)


async def set_active(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    user_id = int(request.match_info["user_id"])
    data = await form(request)
    active = data.get("active") == "1"
    if user_id == admin.id and not active:
        raise BadRequest(_("You cannot deactivate your own account."))
    remote = security.client_address(request)
    await request.app[keys.DB].execute_write_fn(
        lambda d: staff.set_active_sync(d, user_id, active, actor=admin, remote=remote)
    )
    request.app[keys.SESSIONS].forget_user(user_id)  # a deactivated account's sessions end at once
    raise web.HTTPSeeOther("/admin/users")


async def outbox_page(request: web.Request) -> web.Response:
    security.require(request, "admin")
    rows = await request.app[keys.DB].execute_fn(outbox.recent_messages)
    return aiohttp_jinja2.render_template("admin_outbox.html", request, {"messages": rows})
