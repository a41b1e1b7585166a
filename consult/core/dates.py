"""Days in the clinic's time zone, and date filters read from a query string."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

DEFAULT_TZ = "Asia/Shanghai"  # Settings.timezone's default; callers pass the configured one
MIN_FILTER_DAY, MAX_FILTER_DAY = date(1900, 1, 1), date(9000, 12, 31)


def local_day(ts: float, tz: str) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone(ZoneInfo(tz)).date().isoformat()


def day_start(day: date, tz: str) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz)).timestamp())


def filter_day(query: Mapping[str, str], name: str, errors: list[str]) -> date | None:
    """A date filter from a query string; a bad or far-off one is dropped and named in ``errors``."""
    raw = (query.get(name) or "").strip()
    if not raw:
        return None
    try:
        found = date.fromisoformat(raw)
    except ValueError:
        found = None
    # Far-off years overflow the day arithmetic and timestamps further on.
    if found is None or not MIN_FILTER_DAY <= found <= MAX_FILTER_DAY:
        errors.append(name)
        return None
    return found
