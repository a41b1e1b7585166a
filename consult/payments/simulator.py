"""A local stand-in for an online gateway, behaving like one.

The payer is redirected to the gateway's page; pressing Pay there makes the gateway notify the
hospital server-to-server, asynchronously, with a JSON body signed by HMAC-SHA256 over its
canonical form (the key is ``payment_secret``), retrying until it gets a 2xx. The hospital side
(``SimulatorProvider.verify_callback``) trusts nothing it cannot check.

Like a gateway, it keeps its own durable record of the refunds it made (one JSON line each,
fsynced, in ``<data_dir>/simulator/refunds.jsonl``): a refund number it has seen is not paid
again, and ``refund_status`` answers from that record, whatever happened to the hospital's side.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from consult.core import keys
from consult.payments.gateway import PAYMENTS, CallbackRejected, Notice, Payment, RefundStatus

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Signature"
MAX_BODY = 16 * 1024
RETRY_DELAYS = (0.0, 0.5, 2.0, 5.0, 15.0)
CALLBACK_PATH = "/api/payments/callback/simulator"
REFUND_LEDGER = Path("simulator") / "refunds.jsonl"


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The simulated gateway's refunds; a line torn by a crash mid-write is no refund."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "refund_id" in record:
            out.append(record)
    return out


def canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, payload: dict[str, Any]) -> str:
    return hmac.new(secret.encode(), canonical(payload), hashlib.sha256).hexdigest()


def notice_payload(payment: Payment, status: str = "SUCCESS", now: float | None = None) -> dict[str, Any]:
    return {
        "order_id": payment.order_id,
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
        "status": status,
        "notify_id": "N" + secrets.token_hex(12),
        "timestamp": int(now if now is not None else time.time()),
    }


class SimulatorProvider:
    name = "simulator"
    callbacks = True

    def __init__(self) -> None:
        self._ledger_lock = threading.Lock()  # appends come from worker threads

    async def start(self, app: web.Application, payment: Payment) -> URL:
        return app.router["simulator_pay"].url_for(order_id=payment.order_id)

    async def verify_callback(self, app: web.Application, request: web.Request) -> Notice:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise CallbackRejected("body too large")
        body = await request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise CallbackRejected("body too large")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise CallbackRejected("malformed body") from None
        if not isinstance(payload, dict):
            raise CallbackRejected("malformed body")
        order_id = payload.get("order_id") if isinstance(payload.get("order_id"), str) else None
        sent = request.headers.get(SIGNATURE_HEADER, "")
        expected = sign(app[keys.SETTINGS].payment_secret, payload)
        # Constant time; bytes so a non-ASCII header cannot raise instead of failing the check.
        if not hmac.compare_digest(expected.encode(), sent.strip().lower().encode("utf-8", "replace")):
            raise CallbackRejected("bad signature", order_id=order_id, detail={"claimed": payload})
        return parse_notice(payload)

    async def refund(self, app: web.Application, payment: Payment, amount_minor: int, refund_id: str) -> str:
        # The simulated gateway refunds synchronously and always succeeds, once per refund number.
        path = app[keys.SETTINGS].data_dir / REFUND_LEDGER
        return await asyncio.to_thread(self._refund_sync, path, payment.order_id, amount_minor, refund_id)

    def _refund_sync(self, path: Path, order_id: str, amount_minor: int, refund_id: str) -> str:
        with self._ledger_lock:
            for record in read_ledger(path):
                if record["refund_id"] == refund_id:
                    return str(record["ref"])
            ref = "R" + secrets.token_hex(10)
            line = json.dumps(
                {
                    "refund_id": refund_id,
                    "order_id": order_id,
                    "amount_minor": amount_minor,
                    "ref": ref,
                    "at": time.time(),
                },
                sort_keys=True,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return ref

    async def refund_status(self, app: web.Application, payment: Payment, refund_id: str) -> RefundStatus:
        path = app[keys.SETTINGS].data_dir / REFUND_LEDGER
        for record in await asyncio.to_thread(read_ledger, path):
            if record["refund_id"] == refund_id:
                return RefundStatus("refunded", str(record["ref"]), int(record["amount_minor"]))
        return RefundStatus("none")


def parse_notice(payload: dict[str, Any]) -> Notice:
    def text(name: str, limit: int) -> str:
        value = payload.get(name)
        if not isinstance(value, str) or not value or len(value) > limit:
            raise CallbackRejected(f"invalid {name}", order_id=payload.get("order_id"))
        return value

    amount = payload.get("amount_minor")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise CallbackRejected("invalid amount_minor", order_id=payload.get("order_id"))
    stamp = payload.get("timestamp")
    if not isinstance(stamp, int | float) or isinstance(stamp, bool) or not math.isfinite(stamp):
        raise CallbackRejected("invalid timestamp", order_id=payload.get("order_id"))
    return Notice(
        order_id=text("order_id", 64),
        amount_minor=amount,
        currency=text("currency", 3),
        status=text("status", 32),
        notify_id=text("notify_id", 128),
        timestamp=float(stamp),
    )


def callback_url(request: web.Request) -> tuple[URL, str]:
    """The address this very connection arrived on (loopback in practice), and the Host to send."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    scheme = "https" if request.app[keys.SETTINGS].tls else "http"
    if not sockname:
        return URL(f"{scheme}://{request.host}{CALLBACK_PATH}"), request.host
    host, port = sockname[0], sockname[1]
    if ":" in host:
        host = f"[{host}]"
    return URL(f"{scheme}://{host}:{port}{CALLBACK_PATH}"), request.host


async def deliver(app: web.Application, url: URL, host: str, payload: dict[str, Any]) -> bool:
    """POST the signed notification until the hospital answers 2xx (or refuses it with a 4xx)."""
    state = app[PAYMENTS]
    if state.session is None or state.session.closed:
        state.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    body = canonical(payload)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(app[keys.SETTINGS].payment_secret, payload),
        "Host": host,
    }
    for delay in RETRY_DELAYS:
        await asyncio.sleep(delay)
        try:
            # ssl=False: the gateway calls back into its own host over loopback, where the
            # hospital's certificate is often self-signed. A real gateway verifies it.
            async with state.session.post(url, data=body, headers=headers, ssl=False) as resp:
                if 200 <= resp.status < 300:
                    return True
                if 400 <= resp.status < 500:
                    log.warning("simulator: callback for %s refused: %s", payload["order_id"], resp.status)
                    return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("simulator: callback for %s failed: %s", payload["order_id"], exc)
    return False
