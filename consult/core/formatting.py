"""Showing times and money to people: stored in UTC and minor units, shown locally."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from consult.core.config import Settings
from consult.core.i18n import _


def to_local(ts: float, tz: str) -> datetime:
    return datetime.fromtimestamp(ts, UTC).astimezone(ZoneInfo(tz))


def money(minor: int, currency: str = "CNY") -> str:
    symbol = {"CNY": "¥", "USD": "$", "EUR": "€"}.get(currency, currency + " ")
    return f"{symbol}{minor // 100}.{minor % 100:02d}"


def weekday_name(weekday: int) -> str:
    """Monday is 0, as ``date.weekday()`` counts."""
    return [_("Mon"), _("Tue"), _("Wed"), _("Thu"), _("Fri"), _("Sat"), _("Sun")][weekday]


def day_words(local: datetime) -> str:
    """A date as a patient says it: 11月30日 周一 (no year, no time zone)."""
    return _("%(weekday)s %(month)d/%(day)d") % {
        "weekday": weekday_name(local.weekday()),
        "month": local.month,
        "day": local.day,
    }


def filters(settings: Settings) -> dict[str, Callable[..., Any]]:
    tz = settings.timezone

    def localtime(ts: float | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
        if ts is None:
            return ""
        return to_local(float(ts), tz).strftime(fmt)

    def money_filter(minor: int | None, currency: str | None = None) -> str:
        return "" if minor is None else money(int(minor), currency or settings.currency)

    def localday(ts: float | None) -> str:
        """The local date in words (11月30日 周一); times go beside it as %H:%M."""
        return "" if ts is None else day_words(to_local(float(ts), tz))

    return {"localtime": localtime, "localday": localday, "money": money_filter}
