"""Showing times and money to people: stored in UTC and minor units, shown locally."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from consult.core.config import Settings


def to_local(ts: float, tz: str) -> datetime:
    return datetime.fromtimestamp(ts, UTC).astimezone(ZoneInfo(tz))


def money(minor: int, currency: str = "CNY") -> str:
    symbol = {"CNY": "¥", "USD": "$", "EUR": "€"}.get(currency, currency + " ")
    return f"{symbol}{minor // 100}.{minor % 100:02d}"


def filters(settings: Settings) -> dict[str, Callable[..., Any]]:
    tz = settings.timezone

    def localtime(ts: float | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
        if ts is None:
            return ""
        return to_local(float(ts), tz).strftime(fmt)

    def money_filter(minor: int | None, currency: str | None = None) -> str:
        return "" if minor is None else money(int(minor), currency or settings.currency)

    return {"localtime": localtime, "money": money_filter}
