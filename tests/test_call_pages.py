"""The patient's call page without a browser: the end screen's next steps and the warning texts."""

from __future__ import annotations

import contextvars
import re

import pytest

from consult.calls import links as calllinks
from consult.calls.views import warning_strings
from consult.core import keys
from consult.core.i18n import set_locale
from tests.test_prescriptions import clinic, issued_number  # noqa: F401 (fixture)


async def test_an_ended_visits_link_shows_one_end_screen_with_the_issued_prescription(clinic):  # noqa: F811
    number = await issued_number(clinic)
    clinic.db.write_sync(
        lambda d: d.execute("UPDATE visits SET status = 'completed' WHERE id = ?", [clinic.visit_id])
    )
    sql = "SELECT starts_at, ends_at FROM visits WHERE id = ?"
    row = clinic.db.read_sync(lambda d: d.execute(sql, [clinic.visit_id]).fetchone())
    settings = clinic.client.server.app[keys.SETTINGS]
    token = calllinks.make_token(settings, clinic.public_id, "patient", "nonce", row[0], row[1])
    clinic.client.session.cookie_jar.clear()  # the link is the credential: not signed in
    resp = await clinic.client.get(f"/call/{token}")
    assert resp.status == 200
    page = await resp.text()
    # One end screen, shown at once, saying what happens next; nothing of a call on it.
    assert page.count("问诊已结束") == 1
    assert 'data-testid="next-steps"' in page and f'href="/prescriptions/{number}"' in page
    assert 'href="/patient"' in page and 'href="/book"' in page
    assert not re.search(r"call\.js|signaling-client\.js|data-ws-path|<video", page)


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("zh_CN", {1: "问诊还剩 1 分钟。", 2: "问诊还剩 2 分钟。"}),
        ("en", {1: "The visit ends in 1 minute.", 2: "The visit ends in 2 minutes."}),
    ],
)
def test_the_warning_counts_minutes_with_plurals(locale, expected):
    def in_locale() -> dict[str, str]:
        set_locale(locale)
        return warning_strings(120)

    strings = contextvars.copy_context().run(in_locale)  # the locale stays in this copy
    assert {n: strings[f"warning_minutes_{n}"] for n in (1, 2)} == expected
    assert set(strings) == {"warning_minutes_1", "warning_minutes_2", "warning_soon"}
    # A long warning is bounded: at most an hour of texts.
    assert len(warning_strings(24 * 3600)) == 61
