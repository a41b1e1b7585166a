"""The overview: visits, outcomes, TURN use and connected time per day."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, timedelta

import sqlite_utils


@dataclass(frozen=True)
class DayStats:
    day: str
    visits: int = 0
    completed: int = 0
    no_show: int = 0
    failed: int = 0
    cancelled: int = 0
    turn: int = 0
    connected_seconds: int = 0

    @property
    def concluded(self) -> int:
        """Visits that happened or should have: the base of the rates."""
        return self.completed + self.no_show + self.failed

    def rate(self, part: int, base: int) -> float | None:
        return part / base if base else None

    @property
    def completion_rate(self) -> float | None:
        return self.rate(self.completed, self.concluded)

    @property
    def no_show_rate(self) -> float | None:
        return self.rate(self.no_show, self.concluded)

    @property
    def turn_share(self) -> float | None:
        return self.rate(self.turn, self.completed + self.failed)

    @property
    def avg_connected_minutes(self) -> float | None:
        return self.connected_seconds / self.completed / 60 if self.completed else None


def overview_sync(db: sqlite_utils.Database, first: date, last: date) -> list[DayStats]:
    """One entry per day from ``first`` to ``last`` inclusive, days without visits included."""
    found = {
        r[0]: DayStats(
            day=r[0],
            visits=r[1],
            completed=r[2] or 0,
            no_show=r[3] or 0,
            failed=r[4] or 0,
            cancelled=r[5] or 0,
            turn=r[6] or 0,
            connected_seconds=r[7] or 0,
        )
        for r in db.execute(
            "SELECT day, count(*), sum(CASE WHEN outcome = 'completed' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN outcome = 'no_show' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN outcome = 'cancelled' THEN 1 ELSE 0 END),"
            " sum(CASE WHEN used_turn <> 0 AND outcome IN ('completed', 'failed') THEN 1 ELSE 0 END),"
            " sum(CASE WHEN outcome = 'completed' THEN connected_seconds END)"
            " FROM session_summaries WHERE day BETWEEN ? AND ? GROUP BY day",
            [first.isoformat(), last.isoformat()],
        )
    }
    out = []
    d = first
    while d <= last:
        out.append(found.get(d.isoformat(), DayStats(day=d.isoformat())))
        d += timedelta(days=1)
    return out


def totals(days: list[DayStats]) -> DayStats:
    total = DayStats(day="")
    for d in days:
        total = replace(
            total,
            visits=total.visits + d.visits,
            completed=total.completed + d.completed,
            no_show=total.no_show + d.no_show,
            failed=total.failed + d.failed,
            cancelled=total.cancelled + d.cancelled,
            turn=total.turn + d.turn,
            connected_seconds=total.connected_seconds + d.connected_seconds,
        )
    return total
