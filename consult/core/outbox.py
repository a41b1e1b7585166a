"""How Consult reaches people: an interface so SMS or e-mail gateways plug in later.

The development outbox stores every message in the database, where an admin can read it;
one-time codes, confirmations and reminders all go through ``Notifier.send``.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Protocol

import sqlite_utils

from consult.core.db import Database


@dataclass(frozen=True)
class Message:
    channel: str  # "sms" or "email"
    recipient: str
    subject: str
    body: str


class Notifier(Protocol):
    async def send(self, message: Message) -> None: ...


class OutboxNotifier:
    """Keeps messages in the ``outbox`` table instead of sending them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def send(self, message: Message) -> None:
        def write(db) -> None:
            db.execute(
                "INSERT INTO outbox (channel, recipient, subject, body, created) VALUES (?,?,?,?,?)",
                [message.channel, message.recipient, message.subject, message.body, time.time()],
            )

        await self.db.execute_write_fn(write)


def recent_messages(db: sqlite_utils.Database) -> list[sqlite3.Row]:
    """The newest 200 messages, newest first, for the admin's outbox page (pass to ``execute_fn``)."""
    return db.execute(
        "SELECT id, channel, recipient, subject, body, created FROM outbox ORDER BY id DESC LIMIT 200"
    ).fetchall()
