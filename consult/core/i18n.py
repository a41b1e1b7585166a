"""Translations: Babel catalogues read from web/locale, the locale chosen per request.

The current request's translations live in a context variable, so ``_()`` in domain code and
``{% trans %}``/``_()`` in templates both speak the request's language without passing it around.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from babel import Locale, UnknownLocaleError
from babel.messages.pofile import read_po

import web

LOCALE_DIR = Path(web.__file__).parent / "locale"
LOCALES = ("zh_CN", "en")
LOCALE_NAMES = {"zh_CN": "中文", "en": "English"}
# gettext's separator between a msgctxt and its msgid in a catalogue key.
CONTEXT_SEP = "\x04"

_current: contextvars.ContextVar[str] = contextvars.ContextVar("consult_locale", default="en")


def key(message: str, context: str | None = None) -> str:
    """A catalogue key: the msgid, prefixed by its msgctxt (as gettext does) when it has one."""
    return f"{context}{CONTEXT_SEP}{message}" if context else message


@cache
def catalogue(locale: str) -> dict[str, str | tuple[str, ...]]:
    """Merge every ``*.po`` in the locale's folder: each domain area keeps its own file.

    A message with a ``msgctxt`` is keyed ``context + "\\x04" + msgid``: the same English word
    may mean two things ("Leave" the call, a doctor's "leave" in the schedule)."""
    out: dict[str, str | tuple[str, ...]] = {}
    for path in sorted((LOCALE_DIR / locale / "LC_MESSAGES").glob("*.po")):
        with open(path, "rb") as fh:
            cat = read_po(fh, locale=locale)
        for message in cat:
            if not message.id or not message.string or message.fuzzy:
                continue
            msgid = message.id[0] if isinstance(message.id, tuple | list) else message.id
            value = message.string
            out[key(msgid, message.context)] = tuple(value) if isinstance(value, tuple | list) else value
    return out


def set_locale(locale: str) -> contextvars.Token[str]:
    return _current.set(locale if locale in LOCALES else "en")


def get_locale() -> str:
    return _current.get()


def gettext(message: str) -> str:
    return catalogue_gettext(_current.get(), message)


def catalogue_gettext(locale: str, message: str) -> str:
    """``message`` in ``locale`` (``gettext`` for a locale named rather than the current one)."""
    found = catalogue(locale).get(message)
    return found if isinstance(found, str) and found else message


def ngettext(singular: str, plural: str, n: int) -> str:
    return _plural(catalogue(_current.get()).get(singular), singular, plural, n)


def pgettext(context: str, message: str) -> str:
    """``message`` as meant in ``context`` (the msgctxt), e.g. ``pgettext("call", "Leave")``."""
    found = catalogue(_current.get()).get(key(message, context))
    return found if isinstance(found, str) and found else message


def npgettext(context: str, singular: str, plural: str, n: int) -> str:
    return _plural(catalogue(_current.get()).get(key(singular, context)), singular, plural, n)


def _plural(found: str | tuple[str, ...] | None, singular: str, plural: str, n: int) -> str:
    if isinstance(found, tuple) and any(found):
        # Chinese has one plural form (nplurals=1); English two.
        form = found[0] if len(found) == 1 or n == 1 else found[1]
        if form:
            return form
    return singular if n == 1 else plural


_ = gettext


def negotiate(accept_language: str | None, default: str) -> str:
    if not accept_language:
        return default
    wanted: list[tuple[float, str]] = []
    for part in accept_language.split(","):
        bits = part.strip().split(";")
        tag = bits[0].strip()
        q = 1.0
        for b in bits[1:]:
            if b.strip().startswith("q="):
                try:
                    q = float(b.strip()[2:])
                except ValueError:
                    q = 0.0
        if tag:
            wanted.append((q, tag))
    wanted.sort(key=lambda x: -x[0])
    found = Locale.negotiate([t.replace("-", "_") for _, t in wanted], list(LOCALES), sep="_")
    if found:
        return "zh_CN" if found.language == "zh" else str(found)
    for _q, tag in wanted:
        try:
            lang = Locale.parse(tag.replace("-", "_")).language
        except (ValueError, UnknownLocaleError):
            continue
        if lang == "zh":
            return "zh_CN"
        if lang == "en":
            return "en"
    return default


def choose(candidates: Iterable[str | None], accept_language: str | None, default: str) -> str:
    for c in candidates:
        if c in LOCALES:
            return c
    return negotiate(accept_language, default)
