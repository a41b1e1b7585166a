"""Session logs: compact per-visit summaries and quality samples, and the admin queries over them.

The call engineer's ``session_events`` table keeps every signaling event verbatim (the
timeline). This package folds each event into one ``session_summaries`` row as it arrives, so
the admin list, its filters and the overview never scan events: ``apply_event_sync`` runs in
the writer transaction that stores the event, and is O(1) per event.

- ``common``: time zones and days, sides, address masking, the shared vocabularies;
- ``events``: folding events into a summary (and quality samples), closing no-shows;
- ``queries``: the admin list: filters, keyset pagination, CSV cells;
- ``detail``: one session's summary, timeline and samples;
- ``overview``: the per-day aggregates.
"""

from __future__ import annotations

from consult.core.dates import MAX_FILTER_DAY, MIN_FILTER_DAY
from consult.sessionlog.common import (
    DEFAULT_TZ,
    END_REASONS,
    OUTCOMES,
    SAMPLE_FIELDS,
    day_start,
    local_day,
    mask_address,
    side,
)
from consult.sessionlog.detail import MAX_TIMELINE, describe_event, session_detail_sync
from consult.sessionlog.events import (
    FOLDED_EVENTS,
    MAX_SAMPLES_PER_VISIT,
    SAMPLE_KEYS,
    apply_event_sync,
    mark_no_shows_sync,
    normalize_sample,
)
from consult.sessionlog.overview import DayStats, overview_sync, totals
from consult.sessionlog.queries import (
    LIST_COLUMNS,
    PAGE_SIZE,
    Filters,
    PageRow,
    csv_safe,
    decode_cursor,
    encode_cursor,
    filter_choices_sync,
    iter_sessions_sync,
    list_page_sync,
    list_sessions_sync,
)

__all__ = [
    "DEFAULT_TZ",
    "END_REASONS",
    "FOLDED_EVENTS",
    "LIST_COLUMNS",
    "MAX_FILTER_DAY",
    "MAX_SAMPLES_PER_VISIT",
    "MAX_TIMELINE",
    "MIN_FILTER_DAY",
    "OUTCOMES",
    "PAGE_SIZE",
    "SAMPLE_FIELDS",
    "SAMPLE_KEYS",
    "DayStats",
    "Filters",
    "PageRow",
    "apply_event_sync",
    "csv_safe",
    "day_start",
    "decode_cursor",
    "describe_event",
    "encode_cursor",
    "filter_choices_sync",
    "iter_sessions_sync",
    "list_page_sync",
    "list_sessions_sync",
    "local_day",
    "mark_no_shows_sync",
    "mask_address",
    "normalize_sample",
    "overview_sync",
    "session_detail_sync",
    "side",
    "totals",
]
