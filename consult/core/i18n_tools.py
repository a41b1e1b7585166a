"""Find user-facing strings that lack a Chinese translation.

    python -m consult.core.i18n_tools missing        # msgids with no zh_CN translation
    python -m consult.core.i18n_tools stub FILE.po   # append empty entries for them to FILE.po

Strings are extracted from Python (``_()``, ``gettext``, ``ngettext``, ``pgettext``,
``npgettext``) and Jinja2 templates (the same, and ``{% trans "context" %}``). A message with a
context (msgctxt) is its own entry: "Leave" the call and a doctor's "Leave" are two.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from babel.messages.extract import extract_from_dir

from consult.core.i18n import CONTEXT_SEP, catalogue, key

ROOT = Path(__file__).resolve().parents[2]  # the repository: consult/core/i18n_tools.py
METHODS = [("consult/**.py", "python"), ("signaling/**.py", "ignore"), ("web/templates/**.html", "jinja2")]
OPTIONS = {"web/templates/**.html": {"extensions": "jinja2.ext.i18n", "newstyle_gettext": "true"}}
KEYWORDS = {
    "_": None,
    "gettext": None,
    "ngettext": (1, 2),
    "pgettext": ((1, "c"), 2),
    "npgettext": ((1, "c"), 2, 3),
}


@dataclass(frozen=True)
class Found:
    msgid: str
    plural: str | None
    context: str | None
    where: list[str]

    @property
    def key(self) -> str:
        return key(self.msgid, self.context)


def extract_messages() -> dict[str, Found]:
    """Every message in the code, keyed as the catalogue keys it (msgctxt + "\\x04" + msgid)."""
    found: dict[str, Found] = {}
    for filename, lineno, message, _comments, context in extract_from_dir(
        str(ROOT), METHODS, options_map=OPTIONS, keywords=KEYWORDS
    ):
        msgid = message[0] if isinstance(message, tuple) else message
        plural = message[1] if isinstance(message, tuple) and len(message) > 1 else None
        if msgid:
            entry = found.setdefault(key(msgid, context), Found(msgid, plural, context or None, []))
            entry.where.append(f"{filename}:{lineno}")
    return found


def extract() -> dict[str, list[str]]:
    """Catalogue key -> where it is used."""
    return {k: f.where for k, f in extract_messages().items()}


def missing(locale: str = "zh_CN") -> dict[str, list[str]]:
    """Catalogue key (``msgctxt\\x04msgid`` or ``msgid``) -> where it is used, for each key the
    locale does not translate."""
    catalogue.cache_clear()
    cat = catalogue(locale)
    # A plural message needs a plural entry (msgid_plural, msgstr[0]): ngettext ignores a plain
    # one and would show the English.
    return {
        k: m.where
        for k, m in extract_messages().items()
        if k not in cat or isinstance(cat[k], tuple) != (m.plural is not None)
    }


def _po_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("missing", "stub"):
        print(__doc__)
        return 2
    gaps = missing()
    if argv[0] == "missing":
        for k, where in sorted(gaps.items()):
            print(f"{where[0]}: {k.replace(CONTEXT_SEP, ' | ')!r}")
        print(f"{len(gaps)} missing")
        return 1 if gaps else 0
    messages = extract_messages()
    target = Path(argv[1])
    with open(target, "a", encoding="utf-8") as fh:
        for k, where in sorted(gaps.items()):
            m = messages[k]
            fh.write(f"\n#: {where[0]}\n")
            if m.context:
                fh.write(f"msgctxt {_po_string(m.context)}\n")
            fh.write(f"msgid {_po_string(m.msgid)}\n")
            if m.plural:
                fh.write(f'msgid_plural {_po_string(m.plural)}\nmsgstr[0] ""\n')
            else:
                fh.write('msgstr ""\n')
    print(f"appended {len(gaps)} entries to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
