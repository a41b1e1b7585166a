"""How Consult reaches people: an interface so SMS or e-mail gateways plug in later.

The development outbox stores every message in the database, where an admin can read it;
confirmations and reminders go through ``Notifier.send``. One-time codes go through an
``SmsProvider``: ``OutboxSms`` (the default, ``sms_provider = "outbox"``) hands them to the notifier,
so in the demo and in development a code is read on the admin's outbox page. A real SMS gateway is
one more class with ``send_sms`` and a value of that setting.
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


class SmsError(Exception):
    """The provider could not take the message (gateway down, refused); nothing was sent."""


class SmsProvider(Protocol):
    """Sends one text message to one mobile number, as stored (e.g. 13900000001).

    Called on the event loop, never on the database's writer thread: a gateway may take its
    time. Raise ``SmsError`` when the message was not accepted.
    """

    async def send_sms(self, phone: str, subject: str, text: str) -> None: ...


class OutboxSms:
    """The default SmsProvider: every text message goes to the notifier (the outbox) instead."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    async def send_sms(self, phone: str, subject: str, text: str) -> None:
        await self.notifier.send(Message("sms", phone, subject, text))


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
