"""Fail a test when an English sentence reaches someone who reads Chinese.

Every app the in-process test client (``aiohttp_client`` / ``aiohttp_server``) serves gets
``middleware`` (tests/conftest.py). It reads each text/html and application/json response to a
request whose language is zh_CN: the visible text of a page (tags, comments, <script> and
<style> removed; a JSON data block such as the call page's strings is read value by value; the
attributes a user sees: title, placeholder, alt, aria-label, value of buttons) and every
``message`` field of a JSON body. An element marked ``lang="en"`` is English on purpose (data
entered in English, shown as such) and is skipped. A run of two or more Latin-script words with at least one
lowercase English word in it ("This visit is not open yet.", "Sign in") is a sentence; names
("Test Person", "Doctor 0"), codes (report.view, ORD-1), numbers, URLs, units and "Consult" are
not. What it finds is kept on ``Found`` and fails the test (conftest's pytest_runtest_call).

Single English words ("Leave") slip through by design: a name and a word cannot be told apart.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from aiohttp import web

from consult.core import keys

# Latin tokens that are not English prose even when lowercase: units, protocol names, the brand.
ALLOWED = frozenset(
    {
        "Consult",
        "ms",
        "kbit",
        "kbps",
        "fps",
        "min",
        "s",
        "px",
        "mb",
        "kb",
        "gb",
        "x",
        "mm",
        "dd",
        "yyyy",
        "hh",
    }
)
_URL = re.compile(r"(?:https?|wss?)://\S+|\b[\w.-]+@[\w.-]+\.\w+\b")
# One word: letters (and inner ' or -), with opening/closing punctuation around it. Anything
# else (digits, dots or underscores inside, CJK) is a code, a number or another script.
_WORD = re.compile(r"^[(\[\"'“‘«]*([A-Za-z][A-Za-z'’-]*)([)\]\"'”’»,;:.!?…]*)$")
# Chinese text and other non-ASCII marks end a run: "注册。Sign in" holds "Sign in", and
# "Admin · boss" (a name and a login) is two runs, not one.
_OTHER_SCRIPT = re.compile(r"[^\x00-\x7f’‘“”«»…]")
_VISIBLE_ATTRS = ("title", "placeholder", "alt", "aria-label")


def latin_sentences(text: str) -> list[str]:
    """The English sentences (runs of 2+ Latin words with a lowercase word) in ``text``."""
    found: list[str] = []
    run: list[tuple[str, str]] = []  # (word, token as written)

    def flush() -> None:
        words = [w for w, _t in run if w not in ALLOWED and w.lower() not in ALLOWED]
        if len(words) >= 2 and any(w.islower() and len(w) > 1 for w in words):
            found.append(" ".join(t for _w, t in run))
        run.clear()

    for token in _OTHER_SCRIPT.sub(" | ", _URL.sub(" ", html.unescape(text))).split():
        m = _WORD.match(token)
        if m is None:
            flush()
            continue
        run.append((m.group(1), token))
        if any(c in ".!?;:…" for c in m.group(2)):
            flush()  # a sentence ends here
    flush()
    return found


class _Visible(HTMLParser):
    """The text a user can read on a page, as separate pieces."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self._skip = 0  # inside <script>/<style>
        self._json: list[str] | None = None  # inside <script type="application/json">
        self._foreign: list[Any] | None = None  # [tag, depth] of an element marked lang="en"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self._foreign is not None:
            if tag == self._foreign[0]:
                self._foreign[1] += 1
            return
        lang = (a.get("lang") or "").lower()
        if lang and not lang.startswith("zh") and tag not in ("html", "input"):
            # Text marked as English on purpose (a department's English name in the admin's
            # catalogue) is data in that language, not an untranslated message.
            self._foreign = [tag, 1]
            return
        for name in _VISIBLE_ATTRS:
            if a.get(name):
                self.pieces.append(a[name] or "")
        if tag == "input" and (a.get("type") or "").lower() in ("submit", "button") and a.get("value"):
            self.pieces.append(a["value"] or "")
        if tag in ("script", "style"):
            if tag == "script" and (a.get("type") or "").lower() == "application/json":
                self._json = []
            else:
                self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if self._foreign is not None:
            if tag == self._foreign[0]:
                self._foreign[1] -= 1
                if not self._foreign[1]:
                    self._foreign = None
            return
        if tag == "script" and self._json is not None:
            try:
                self.pieces.extend(_strings(json.loads("".join(self._json))))
            except ValueError:
                pass
            self._json = None
        elif tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if self._foreign is not None:
            return
        if self._json is not None:
            self._json.append(data)
        elif not self._skip:
            self.pieces.append(data)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _messages(value: Any) -> list[str]:
    """Every ``message`` field, at any depth."""
    if isinstance(value, dict):
        out = [value["message"]] if isinstance(value.get("message"), str) else []
        return out + [s for k, v in value.items() if k != "message" for s in _messages(v)]
    if isinstance(value, list):
        return [s for v in value for s in _messages(v)]
    return []


def english_in_html(text: str) -> list[str]:
    parser = _Visible()
    parser.feed(text)
    parser.close()
    # Pieces are joined by a newline: an element's end ends a sentence run only where text
    # really is separate, so "<b>Sign</b> in" is still caught as one run.
    return [s for piece in parser.pieces for s in latin_sentences(piece)]


def english_in_json(text: str) -> list[str]:
    try:
        body = json.loads(text)
    except ValueError:
        return []
    return [s for m in _messages(body) for s in latin_sentences(m)]


@dataclass
class Found:
    """English sentences served to zh_CN requests during one test."""

    items: list[tuple[str, str]] = field(default_factory=list)  # (method path, sentence)
    reported: bool = False

    def report(self) -> str:
        return "English on zh_CN responses:\n" + "\n".join(f"  {where}: {s!r}" for where, s in self.items)


def make_middleware(found: Found):
    @web.middleware
    async def english_on_chinese_pages(request: web.Request, handler):
        response = await handler(request)
        if request.get(keys.LOCALE) != "zh_CN" or not isinstance(response, web.Response):
            return response
        kind = response.content_type
        if kind not in ("text/html", "application/json") or response.body is None:
            return response
        body = response.body
        text = body.decode(response.charset or "utf-8", "replace") if isinstance(body, bytes) else ""
        sentences = english_in_html(text) if kind == "text/html" else english_in_json(text)
        where = f"{request.method} {request.path} {response.status}"
        found.items.extend((where, s) for s in sentences)
        return response

    return english_on_chinese_pages
