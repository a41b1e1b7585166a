"""The payment gateway interface: what a provider is given, what it returns, and its shared state.

Providers (``consult.payments.cashier``, ``consult.payments.simulator``, a hospital's own gateway)
import only this module; the payments service (``consult.payments``) imports the providers. So
the dependency runs one way: service -> providers -> gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import sqlite_utils
from aiohttp import web
from yarl import URL

from consult.core.errors import ConsultError

# The service's logger: a failed payment task is logged where it was before the split.
log = logging.getLogger("consult.payments")


class CallbackRejected(ConsultError):
    """A gateway notification we refuse; ``reason`` goes into the ``rejected_callback`` event."""

    status = 400
    code = "callback_rejected"

    def __init__(self, reason: str, *, order_id: str | None = None, detail: dict | None = None) -> None:
        super().__init__(f"callback rejected: {reason}", code="callback_rejected")
        self.reason = reason
        self.order_id = order_id
        self.detail = detail or {}


@dataclass(frozen=True)
class Payment:
    id: int
    visit_id: int
    order_id: str
    provider: str
    amount_minor: int
    currency: str
    status: str
    provider_ref: str | None
    created: float
    paid_at: float | None
    refunded_at: float | None
    refund_minor: int

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> Payment:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Notice:
    """A verified gateway notification about one order."""

    order_id: str
    amount_minor: int
    currency: str
    status: str  # "SUCCESS" or a failure status
    notify_id: str
    timestamp: float


@dataclass
class Outcome:
    """What processing a notification or a mark-paid did; drives the after-commit steps."""

    result: str  # "paid", "already", "rejected", "failed"
    payment: Payment | None = None
    confirmed: bool = False
    refund_reason: str | None = None
    refund_state: str | None = None  # after a first attempt: "refunded" or "pending" (a queued job)
    reason: str | None = None


@dataclass(frozen=True)
class RefundStatus:
    """What the provider knows of one refund (asked before any retry, so money never moves twice)."""

    state: str  # "refunded": the money went back; "pending": the provider is still on it; "none": no refund
    ref: str | None = None
    amount_minor: int = 0


class PaymentProvider(Protocol):
    name: str

    async def start(self, app: web.Application, payment: Payment) -> URL:
        """Where to send the payer to pay (the gateway's page, or our counter instructions)."""

    async def verify_callback(self, app: web.Application, request: web.Request) -> Notice:
        """Authenticate and parse a server-to-server notification; raise CallbackRejected."""

    async def refund(self, app: web.Application, payment: Payment, amount_minor: int, refund_id: str) -> str:
        """Give ``amount_minor`` back; return the provider's refund reference, raise on failure.

        ``refund_id`` is ours and the same on every attempt of one refund (gateways call it the
        merchant's refund number): a provider that knows it already must not pay it again.
        """

    async def refund_status(self, app: web.Application, payment: Payment, refund_id: str) -> RefundStatus:
        """Whether the refund ``refund_id`` of ``payment`` happened, from the provider's own records.

        Asked before retrying a refund whose outcome we never recorded (the process died, or the
        call timed out), so that an attempt the provider did complete is not paid twice.
        """


class Fulfilment(Protocol):
    """What a paid payment does to what it paid for (booking confirms the visit).

    Payments sit below booking: booking hands its fulfilment in (``FULFILMENT``, set by the app
    factory), so that payments never import booking.
    """

    def confirm_sync(self, db: sqlite_utils.Database, visit_id: int, now: float) -> None:
        """Confirm inside the payment's transaction; raise ``Conflict`` when the slot was lost.

        Whatever must follow (telling the patient) is queued as a job in this same transaction.
        """


FULFILMENT = web.AppKey("payment_fulfilment", Fulfilment)


@dataclass
class PaymentsState:
    providers: dict[str, PaymentProvider]
    fulfilment: Fulfilment
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    session: aiohttp.ClientSession | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task owned by the app: cancelled and awaited at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("payment task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.session is not None:
            await self.session.close()


PAYMENTS = web.AppKey("payments", PaymentsState)
