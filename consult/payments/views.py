"""Payments over HTTP: start, wait, receipt, gateway callbacks, the simulator, the cashier desk."""

from __future__ import annotations

import time
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from consult import payments
from consult.accounts.users import User
from consult.audit.reads import audit_read
from consult.booking.visits import get_visit_sync
from consult.core import keys, security
from consult.core.errors import Conflict, NotFound
from consult.core.i18n import _
from consult.payments import PAYMENTS, CallbackRejected, Payment
from consult.payments import simulator as sim

VISIT_ROUTE_NAMES = ("visit", "visit_page", "visit_detail")


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/visits/{public_id}/pay", pay_start, name="pay_start")
    r.add_get("/pay/{order_id}", pay_status, name="pay_status")
    r.add_get("/pay/{order_id}/receipt", pay_receipt, name="pay_receipt")
    r.add_get("/api/payments/{order_id}", payment_json, name="payment_status_api")
    r.add_get("/api/visits/{public_id}/payment", visit_payment_json, name="visit_payment_api")
    r.add_post("/api/payments/callback/{provider}", payment_callback, name="payment_callback")
    r.add_get("/admin/payments", admin_payments, name="admin_payments")
    r.add_post("/admin/payments/{order_id}/mark-paid", admin_mark_paid, name="admin_payment_mark_paid")
    r.add_post("/admin/payments/{order_id}/refund", admin_refund, name="admin_payment_refund")
    if app[keys.SETTINGS].payment_provider == "simulator":
        # The stand-in gateway exists only while it is the configured provider, which it can be
        # only in demo mode (core/config.py for_mode); its pages serve the order's own patient.
        r.add_get("/simulator/pay/{order_id}", simulator_page, name="simulator_pay")
        r.add_post("/simulator/pay/{order_id}", simulator_submit, name="simulator_submit")


# -- helpers ----------------------------------------------------------------------------------


def visit_url(request: web.Request, public_id: str) -> str:
    """The booking engineer's visit page, by its route name when it has one."""
    for name in VISIT_ROUTE_NAMES:
        route = request.app.router.named_resources().get(name)
        if route is not None:
            try:
                return str(route.url_for(public_id=public_id))
            except (KeyError, ValueError):
                continue
    return f"/visits/{public_id}"


async def _payment_and_visit(request: web.Request) -> tuple[Payment, dict[str, Any]]:
    db = request.app[keys.DB]
    payment = await payments.by_order(db, request.match_info["order_id"])
    if payment is None:
        raise NotFound(_("This payment does not exist."))
    visit = await db.execute_fn(lambda d: get_visit_sync(d, visit_id=payment.visit_id))
    if visit is None:
        raise NotFound(_("This payment does not exist."))
    return payment, visit


def _may_see(user: User, visit: dict[str, Any]) -> bool:
    return user.role == "admin" or (user.role == "patient" and user.id == visit["patient_id"])


async def _audit_payment(request: web.Request, payment: Payment, visit: dict[str, Any]) -> None:
    await audit_read(request, "payment.view", "payment", payment.order_id, visit["patient_id"])


async def _owned(request: web.Request) -> tuple[User, Payment, dict[str, Any]]:
    user = security.require(request)
    payment, visit = await _payment_and_visit(request)
    if not _may_see(user, visit):
        raise NotFound(_("This payment does not exist."))
    return user, payment, visit


def _status_json(request: web.Request, payment: Payment, visit: dict[str, Any]) -> dict[str, Any]:
    router = request.app.router
    return {
        "order_id": payment.order_id,
        "provider": payment.provider,
        "status": payment.status,
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
        "paid_at": payment.paid_at,
        "refund_minor": payment.refund_minor,
        "visit_status": visit["status"],
        "visit_url": visit_url(request, visit["public_id"]),
        "status_url": str(router["pay_status"].url_for(order_id=payment.order_id)),
        "receipt_url": str(router["pay_receipt"].url_for(order_id=payment.order_id))
        if payment.status in ("paid", "refunded")
        else None,
    }


# -- the patient ------------------------------------------------------------------------------


async def pay_start(request: web.Request) -> web.Response:
    user = security.require(request, "patient")
    db = request.app[keys.DB]
    public_id = request.match_info["public_id"]
    visit = await db.execute_fn(lambda d: get_visit_sync(d, public_id=public_id))
    if visit is None or visit["patient_id"] != user.id:
        raise NotFound(_("This visit does not exist."))
    latest = await payments.latest_for_visit(db, visit["id"])
    if latest is not None and latest.status == "paid":
        raise web.HTTPSeeOther(str(request.app.router["pay_status"].url_for(order_id=latest.order_id)))
    payment = await payments.create_payment(request.app, visit["id"])
    target = await payments.provider_for(request.app, payment.provider).start(request.app, payment)
    raise web.HTTPSeeOther(str(target))


@aiohttp_jinja2.template("pay_status.html")
async def pay_status(request: web.Request) -> dict[str, Any]:
    _user, payment, visit = await _owned(request)
    await _audit_payment(request, payment, visit)
    return {"payment": payment, "visit": visit, "visit_url": visit_url(request, visit["public_id"])}


async def payment_json(request: web.Request) -> web.Response:
    _user, payment, visit = await _owned(request)
    # One entry per request, polls included: the waiting page polls every 2 s or slower.
    await _audit_payment(request, payment, visit)
    return web.json_response(_status_json(request, payment, visit))


async def visit_payment_json(request: web.Request) -> web.Response:
    user = security.require(request)
    db = request.app[keys.DB]
    public_id = request.match_info["public_id"]
    visit = await db.execute_fn(lambda d: get_visit_sync(d, public_id=public_id))
    readable = visit is not None and (
        _may_see(user, visit) or (user.role == "doctor" and user.id == visit["doctor_id"])
    )
    if not readable:
        raise NotFound(_("This visit does not exist."))
    payment = await payments.latest_for_visit(db, visit["id"])
    body: dict[str, Any] = {"visit_status": visit["status"], "payment": None}
    if payment is not None:
        body["payment"] = _status_json(request, payment, visit)
        if user.role == "doctor":  # the doctor sees whether it is paid, not the links
            body["payment"] = {k: body["payment"][k] for k in ("status", "amount_minor", "currency")}
    await audit_read(
        request,
        "payment.view",
        "payment",
        payment.order_id if payment is not None else None,
        visit["patient_id"],
        visit=visit["public_id"],
    )
    return web.json_response(body)


@aiohttp_jinja2.template("pay_receipt.html")
async def pay_receipt(request: web.Request) -> dict[str, Any]:
    _user, payment, visit = await _owned(request)
    if payment.status not in ("paid", "refunded"):
        raise NotFound(_("There is no receipt for an unpaid order."))
    await _audit_payment(request, payment, visit)
    return {
        "payment": payment,
        "visit": visit,
        "patient_name": visit["patient_name"],
        "doctor_name": visit["doctor_name"],
        "visit_url": visit_url(request, visit["public_id"]),
    }


# -- gateways ---------------------------------------------------------------------------------


async def payment_callback(request: web.Request) -> web.Response:
    name = request.match_info["provider"]
    provider = request.app[PAYMENTS].providers.get(name)
    if provider is None or not getattr(provider, "callbacks", True):
        raise NotFound(_("This payment method is not available."))
    try:
        notice = await provider.verify_callback(request.app, request)
    except CallbackRejected as exc:
        await payments.record_rejection(request.app, name, exc, security.client_address(request))
        return web.json_response({"ok": False, "result": "rejected", "reason": exc.reason}, status=400)
    outcome = await payments.handle_notice(request.app, name, notice)
    if outcome.result == "rejected":
        return web.json_response({"ok": False, "result": "rejected", "reason": outcome.reason}, status=400)
    if outcome.result == "already":
        return web.json_response({"ok": True, "result": "already processed"})
    return web.json_response({"ok": True, "result": outcome.result})


async def _simulator_order(request: web.Request) -> tuple[Payment, dict[str, Any]]:
    """The simulator serves the order's own patient only: pressing Pay confirms a visit."""
    user = security.require(request)  # anonymous: the sign-in page, then back here
    payment, visit = await _payment_and_visit(request)
    if payment.provider != "simulator":
        raise NotFound(_("This payment does not exist."))
    if user.role != "patient" or user.id != visit["patient_id"]:
        raise NotFound(_("This payment does not exist."))
    return payment, visit


@aiohttp_jinja2.template("pay_simulator.html")
async def simulator_page(request: web.Request) -> dict[str, Any]:
    payment, _visit = await _simulator_order(request)
    return {"payment": payment}


async def simulator_submit(request: web.Request) -> web.Response:
    payment, visit = await _simulator_order(request)
    form = await security.read_form(request)
    back = str(request.app.router["pay_status"].url_for(order_id=payment.order_id))
    if form.get("action") != "pay":
        raise web.HTTPSeeOther(visit_url(request, visit["public_id"]))
    if payment.status == "pending":
        url, host = sim.callback_url(request)
        payload = sim.notice_payload(payment, "SUCCESS", time.time())
        request.app[PAYMENTS].spawn(
            sim.deliver(request.app, url, host, payload), name=f"simulator-callback-{payment.order_id}"
        )
    raise web.HTTPSeeOther(back)


# -- the cashier desk -------------------------------------------------------------------------


@aiohttp_jinja2.template("pay_admin.html")
async def admin_payments(request: web.Request) -> dict[str, Any]:
    security.require(request, "admin")
    pending, recent = await request.app[keys.DB].execute_fn(payments.desk_sync)
    await audit_read(request, "payment.list", "payment", None, None)
    return {"pending": pending, "recent": recent, "message": request.query.get("done")}


async def admin_mark_paid(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    outcome = await payments.mark_paid_by_staff(
        request.app, request.match_info["order_id"], admin, security.client_address(request)
    )
    done = "paid" if outcome.result == "paid" else "already"
    if outcome.refund_reason:
        done = "refunded" if outcome.refund_state == "refunded" else "refund_queued"
    raise web.HTTPSeeOther(str(request.app.router["admin_payments"].url_for().with_query(done=done)))


async def admin_refund(request: web.Request) -> web.Response:
    admin = security.require(request, "admin")
    payment, _visit = await _payment_and_visit(request)
    if payment.status != "paid":
        raise Conflict(_("Only a paid payment can be refunded."), code="not_paid")
    state = await payments.request_refund(
        request.app, payment.id, reason="staff", actor=admin, remote=security.client_address(request)
    )
    done = {"refunded": "refund", "queued": "refund_queued"}.get(state, "already")
    raise web.HTTPSeeOther(str(request.app.router["admin_payments"].url_for().with_query(done=done)))
