"""Find user-facing strings that lack a Chinese translation.

    python -m consult.core.i18n_tools missing        # msgids with no zh_CN translation
    python -m consult.core.i18n_tools stub FILE.po   # append empty entries for them to FILE.po

Strings are extracted from Python (``_()``, ``gettext``, ``ngettext``) and Jinja2 templates.
"""

from __future__ import annotations

import sys
from pathlib import Path

from babel.messages.extract import extract_from_dir

ROOT = Path(__file__).resolve().parents[2]  # the repository: consult/core/i18n_tools.py
METHODS = [("consult/**.py", "python"), ("signaling/**.py", "ignore"), ("web/templates/**.html", "jinja2")]
OPTIONS = {"web/templates/**.html": {"extensions": "jinja2.ext.i18n", "newstyle_gettext": "true"}}
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2)}


def extract() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for filename, lineno, message, _comments, _context in extract_from_dir(
        str(ROOT), METHODS, options_map=OPTIONS, keywords=KEYWORDS
    ):
        msgid = message[0] if isinstance(message, tuple) else message
        if msgid:
            found.setdefault(msgid, []).append(f"{filename}:{lineno}")
    return found


def missing(locale: str = "zh_CN") -> dict[str, list[str]]:
    from consult.core.i18n import catalogue

    catalogue.cache_clear()
    cat = catalogue(locale)
    return {m: where for m, where in extract().items() if m not in cat}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("missing", "stub"):
        print(__doc__)
        return 2
    gaps = missing()
    if argv[0] == "missing":
        for msgid, where in sorted(gaps.items()):
            print(f"{where[0]}: {msgid!r}")
        print(f"{len(gaps)} missing")
        return 1 if gaps else 0
    target = Path(argv[1])
    with open(target, "a", encoding="utf-8") as fh:
        for msgid, where in sorted(gaps.items()):
            esc = msgid.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            fh.write(f'\n#: {where[0]}\nmsgid "{esc}"\nmsgstr ""\n')
    print(f"appended {len(gaps)} entries to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
