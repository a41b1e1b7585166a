"""Payment at the hospital counter: the patient shows the order number, staff mark it paid."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from consult.payments.gateway import CallbackRejected, Notice, Payment, RefundStatus


class CashierProvider:
    name = "cashier"
    callbacks = False  # nothing calls back: staff mark counter payments paid

    async def start(self, app: web.Application, payment: Payment) -> URL:
        return app.router["pay_status"].url_for(order_id=payment.order_id)

    async def verify_callback(self, app: web.Application, request: web.Request) -> Notice:
        raise CallbackRejected("the cashier sends no callbacks")

    async def refund(self, app: web.Application, payment: Payment, amount_minor: int, refund_id: str) -> str:
        # Cash goes back over the counter; the record says so, staff hand it over.
        return "counter"

    async def refund_status(self, app: web.Application, payment: Payment, refund_id: str) -> RefundStatus:
        # Nothing moves until our record says "refunded" and staff hand the cash over: no refund yet.
        return RefundStatus("none")
