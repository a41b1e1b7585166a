"""What the server remembers about each seat of a room across that seat's connections.

A seat is a room id and a role ("host", "guest", or None for joins refused before a role was
known). Its rate limiter, its telemetry throttle and its error counts live here, not on the
connection, so that reconnecting resets none of them. The registry is bounded (least recently
used seats are forgotten first); forgetting a seat only resets limits that the application's
own storage budget still enforces.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import Any, Final

from signaling.config import SignalingConfig
from signaling.connection import RateLimiter

# After the first few events of one error code, only these counts are reported.
_REPORTED_COUNTS: Final = frozenset(10**k for k in range(1, 19))


class StatsAggregate:
    """min/max/mean of the numeric fields of the stats samples received since the last one emitted."""

    __slots__ = ("count", "high", "low", "n", "total")

    def __init__(self) -> None:
        self.n = 0
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def add(self, sample: dict[str, Any], fields: frozenset[str], max_fields: int) -> None:
        self.n += 1
        for key, value in sample.items():
            if fields and key not in fields:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            if key not in self.total:
                if len(self.total) >= max_fields or len(key) > 64:
                    continue
                self.total[key], self.count[key], self.low[key], self.high[key] = 0.0, 0, value, value
            self.total[key] += value
            self.count[key] += 1
            self.low[key] = min(self.low[key], value)
            self.high[key] = max(self.high[key], value)

    def data(self) -> dict[str, Any] | None:
        """The event data: `sample` (one sample as sent, or the means), and `min`, `max`, `n`
        when several samples were folded; None when no field was kept."""
        if not self.total:
            return None
        if self.n == 1:
            return {"sample": {k: self.low[k] for k in self.total}}
        return {
            "sample": {k: round(self.total[k] / self.count[k], 2) for k in self.total},
            "min": dict(self.low),
            "max": dict(self.high),
            "n": self.n,
        }


class SeatState:
    __slots__ = ("errors", "ice_at", "ice_key", "limiter", "muted", "stats", "stats_at", "told")

    def __init__(self, config: SignalingConfig) -> None:
        self.limiter = RateLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        # The stats folded so far and the error counts: made on the seat's first stats sample
        # and first error (a seat per participant; most send neither for a long while, and an
        # aggregate's four dicts and a Counter are ~600 bytes).
        self.stats: StatsAggregate | None = None
        self.stats_at = -math.inf
        self.ice_at = -math.inf
        self.ice_key: tuple[Any, ...] | None = None
        self.errors: Counter[str] | None = None
        # The application stores nothing more from this seat (RoomPolicy.on_event said so), and
        # whether its client has been told (one over_budget error frame per seat).
        self.muted = False
        self.told = False

    def take_stats(
        self, sample: dict[str, Any], now: float, config: SignalingConfig
    ) -> dict[str, Any] | None:
        """Fold one sample in; the data of a `stats` event when one is due (at most one per
        `telemetry_interval_s`), else None."""
        if self.stats is None:
            self.stats = StatsAggregate()
        self.stats.add(sample, config.stats_fields_set, config.stats_max_fields)
        if now - self.stats_at < config.telemetry_interval_s:
            return None
        data = self.stats.data()
        if data is not None:
            self.stats = None
            self.stats_at = now
        return data

    def take_ice_state(self, key: tuple[Any, ...], now: float, interval_s: float) -> bool:
        """Whether an ice_state is recorded: a change of state or pair type always, the same
        one again at most once per interval."""
        if key == self.ice_key and now - self.ice_at < interval_s:
            return False
        self.ice_key, self.ice_at = key, now
        return True

    def take_error(self, code: str, per_code: int) -> dict[str, Any] | None:
        """The data of an `error` event for one more error of `code`, or None: the first
        `per_code` of each code are recorded, then only the running count at 10, 100, 1000..."""
        if self.errors is None:
            self.errors = Counter()
        self.errors[code] += 1
        n = self.errors[code]
        if n <= per_code:
            return {"code": code}
        if n in _REPORTED_COUNTS:
            return {"code": code, "count": n}
        return None


class SeatRegistry:
    def __init__(self, config: SignalingConfig, max_seats: int = 20_000) -> None:
        self.config = config
        self.max_seats = max_seats
        self._seats: OrderedDict[tuple[str, str | None], SeatState] = OrderedDict()
        # Client messages not recorded, by reason (read by the embedding app's metrics).
        self.dropped: Counter[str] = Counter()

    def get(self, room_id: str, role: str | None) -> SeatState:
        key = (room_id, role)
        seat = self._seats.get(key)
        if seat is None:
            seat = self._seats[key] = SeatState(self.config)
            while len(self._seats) > self.max_seats:
                self._seats.popitem(last=False)
        else:
            self._seats.move_to_end(key)
        return seat

    def __len__(self) -> int:
        return len(self._seats)
