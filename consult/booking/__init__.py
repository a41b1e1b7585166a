"""Booking a visit: hold a slot, confirm it once paid, cancel, reschedule, remind.

This module is booking's public face; the work lives in focused modules, re-exported here:

- ``consult.booking.visits``: reading a visit and lists of visits, and who may see, cancel or
  move one;
- ``consult.booking.holds``: holding a slot, confirming it once paid, expiring holds, the
  background reaper, and the slot checks every booking write shares;
- ``consult.booking.changes``: cancelling (with the refund) and rescheduling;
- ``consult.booking.notices``: what the patient is told (confirmations, reminders), as durable
  ``notify`` jobs, and links' origin.

Beside them: ``catalogue`` (departments, doctors' profiles), ``schedules`` (weekly sessions,
exceptions and the slots derived from them), ``ics`` (calendar files) and ``pages`` (what each
booking page shows, read in one call); the ``*views`` modules only parse, call these and render.

Every change runs inside the one writer's ``BEGIN IMMEDIATE`` transaction (the ``*_sync``
functions take the writer's handle). The partial UNIQUE index ``visits_one_per_slot`` is what
guarantees a slot is never booked twice: an insert or move onto a taken slot raises
``IntegrityError``, which becomes a ``Conflict`` with a message a patient understands.
"""

from __future__ import annotations

from consult.booking.changes import cancel, cancel_sync, reschedule, reschedule_sync
from consult.booking.holds import (
    confirm_and_notify_sync,
    confirm_paid_sync,
    expire_holds_sync,
    hold,
    hold_reaper,
    hold_sync,
    housekeeping,
    lost_slot_message,
    taken_message,
)
from consult.booking.notices import (
    NOTIFY_JOB,
    REMINDER_DAY,
    REMINDER_HOUR,
    after_confirmed,
    base_url,
    perform_notice,
    reminders_due_sync,
    speaking,
)
from consult.booking.visits import (
    OPEN_STATUSES,
    VISIT_SELECT,
    can_cancel,
    can_reschedule,
    complete_sync,
    get_visit_sync,
    needing_reschedule_sync,
    shown_status,
    visit_access,
    visit_view,
)
from consult.core import jobs


class VisitFulfilment:
    """A paid payment confirms its visit and queues the patient's message (``payments.Fulfilment``)."""

    confirm_sync = staticmethod(confirm_and_notify_sync)


def register_jobs(runner: jobs.Runner) -> None:
    """Called by the app factory: booking's job kinds."""
    runner.register(NOTIFY_JOB, perform_notice)


__all__ = [
    "NOTIFY_JOB",
    "OPEN_STATUSES",
    "REMINDER_DAY",
    "REMINDER_HOUR",
    "VISIT_SELECT",
    "VisitFulfilment",
    "after_confirmed",
    "base_url",
    "can_cancel",
    "can_reschedule",
    "cancel",
    "cancel_sync",
    "complete_sync",
    "confirm_and_notify_sync",
    "confirm_paid_sync",
    "expire_holds_sync",
    "get_visit_sync",
    "hold",
    "hold_reaper",
    "hold_sync",
    "housekeeping",
    "lost_slot_message",
    "needing_reschedule_sync",
    "register_jobs",
    "reminders_due_sync",
    "reschedule",
    "reschedule_sync",
    "shown_status",
    "speaking",
    "taken_message",
    "visit_access",
    "visit_view",
]
