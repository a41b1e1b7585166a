from __future__ import annotations

import pytest

from consult.core.i18n import negotiate
from consult.core.i18n_tools import missing
from tests.conftest import csrf_of


def test_every_string_has_a_chinese_translation():
    gaps = missing("zh_CN")
    assert not gaps, "untranslated: " + "; ".join(f"{w[0]} {m!r}" for m, w in list(gaps.items())[:20])


def test_negotiation():
    assert negotiate("zh-CN,zh;q=0.9,en;q=0.8", "en") == "zh_CN"
    assert negotiate("en-US,en;q=0.9", "zh_CN") == "en"
    assert negotiate("zh-TW", "en") == "zh_CN"
    assert negotiate("fr-FR", "zh_CN") == "zh_CN"
    assert negotiate("garbage;;q=x", "en") == "en"


async def test_accept_language_picks_the_page_language(client):
    zh = await (await client.get("/login", headers={"Accept-Language": "zh-CN"})).text()
    assert "登录" in zh and 'lang="zh-CN"' in zh
    en = await (await client.get("/login", headers={"Accept-Language": "en-GB"})).text()
    assert "Sign in" in en and 'lang="en"' in en


async def test_language_switch_is_remembered(client):
    token = await csrf_of(client, "/login")
    resp = await client.post(
        "/lang", data={"locale": "en", "next": "/login", "csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/login"
    text = await (await client.get("/login", headers={"Accept-Language": "zh-CN"})).text()
    assert "Sign in" in text
    resp = await client.post("/lang", data={"locale": "xx", "csrf_token": token})
    assert resp.status == 400


async def test_database_work_speaks_the_callers_language(database):
    """Reads run on a reader thread and writes on the writer thread; both keep the request's
    language, so an error raised there reaches the user translated."""
    import asyncio

    from consult.core import i18n
    from consult.core.errors import Conflict

    def refuse(_db):
        raise Conflict(i18n._("This time was just taken; please pick another."))

    async def as_user(locale: str):
        i18n.set_locale(locale)  # each task has its own copy of the context
        read = await database.execute_fn(lambda _db: i18n.get_locale())
        try:
            await database.execute_write_fn(refuse)
        except Conflict as exc:
            return read, exc.message
        raise AssertionError("the write did not raise")

    zh, en = await asyncio.gather(as_user("zh_CN"), as_user("en"))
    assert zh == ("zh_CN", "该时间刚刚被约走了，请选择其他时间。")
    assert en == ("en", "This time was just taken; please pick another.")


def test_one_english_word_two_meanings_has_two_translations():
    from consult.core import i18n

    token = i18n.set_locale("zh_CN")
    try:
        # The hang-up button is not a doctor's day off ("停诊" reads as "the doctor cancelled").
        assert i18n.pgettext("call", "Leave") == "离开"
        assert i18n.pgettext("schedule", "Leave") == "停诊"
        assert i18n.gettext("Leave") == "Leave"  # no context-less entry: each use says which
        assert i18n.npgettext("none", "%(num)d cat", "%(num)d cats", 2) == "%(num)d cats"
        assert i18n.ngettext("%(num)d minute", "%(num)d minutes", 1) == "%(num)d 分钟"
        assert i18n.ngettext("%(num)d minute", "%(num)d minutes", 5) == "%(num)d 分钟"
    finally:
        i18n._current.reset(token)
    token = i18n.set_locale("en")
    try:
        assert i18n.pgettext("call", "Leave") == "Leave"
        assert i18n.ngettext("%(num)d minute", "%(num)d minutes", 1) == "%(num)d minute"
        assert i18n.ngettext("%(num)d minute", "%(num)d minutes", 2) == "%(num)d minutes"
    finally:
        i18n._current.reset(token)


def test_templates_have_pgettext_and_plurals(aiohttp_client, settings):
    from consult.app import create_app
    from consult.core import i18n

    app = create_app(settings)
    import aiohttp_jinja2

    env = aiohttp_jinja2.get_env(app)
    token = i18n.set_locale("zh_CN")
    try:
        out = env.from_string(
            '{{ pgettext("call", "Leave") }}|{% trans "schedule" %}Leave{% endtrans %}|'
            '{{ ngettext("%(num)d minute", "%(num)d minutes", 3) }}'
        ).render()
    finally:
        i18n._current.reset(token)
    assert out == "离开|停诊|3 分钟"


def test_i18n_tools_know_msgctxt_and_plurals(tmp_path, monkeypatch):
    from consult.core import i18n_tools

    messages = i18n_tools.extract_messages()
    call_leave = messages[i18n_tools.key("Leave", "call")]
    assert call_leave.context == "call" and any("_call_stage.html" in w for w in call_leave.where)
    assert i18n_tools.key("Leave", "schedule") in messages
    assert messages["%(num)d minute"].plural == "%(num)d minutes"
    # A stub for a context message carries its msgctxt; for a plural, msgid_plural.
    monkeypatch.setattr(
        i18n_tools,
        "missing",
        lambda locale="zh_CN": {k: messages[k].where for k in (call_leave.key, "%(num)d minute")},
    )
    target = tmp_path / "stub.po"
    assert i18n_tools.main(["stub", str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    assert 'msgctxt "call"\nmsgid "Leave"\nmsgstr ""' in text
    assert 'msgid "%(num)d minute"\nmsgid_plural "%(num)d minutes"\nmsgstr[0] ""' in text


@pytest.mark.parametrize("locale", ["zh_CN", "en"])
def test_template_gettext_gives_what_jinjas_newstyle_gettext_gives(settings, locale):
    """templates.template_gettext stands in for Jinja's own newstyle `_()`/`gettext` (a cached
    Markup instead of three context calls): the same text, the same escaping of variables, the
    same %% and the same refusal of a broken format, in either language."""
    import aiohttp_jinja2
    import jinja2

    from consult.app import create_app
    from consult.core import i18n

    ours = aiohttp_jinja2.get_env(create_app(settings))
    jinjas = jinja2.Environment(autoescape=True, extensions=["jinja2.ext.i18n"])
    jinjas.install_gettext_callables(i18n.gettext, i18n.ngettext, newstyle=True)  # type: ignore[attr-defined]
    sources = [
        '{{ _("Sessions") }}',
        '{{ _("Patient name, phone or visit number") }}|{{ gettext("No sessions match.") }}',
        '{{ _("100%% of %(what)s", what=name) }}',
        "{% trans %}Export CSV{% endtrans %}|{% trans n=name %}Hello {{ n }}{% endtrans %}",
        '{{ _("<b>%(a)s</b> & %(b)s", a=name, b=3) }}',
        "{{ _(name) }}",  # a message that is a variable: still one cached entry, escaped the same
    ]
    token = i18n.set_locale(locale)
    try:
        for source in sources:
            for name in ("Li <Lei> & 'co'", "Sessions"):
                want = jinjas.from_string(source).render(name=name)
                for _ in range(2):  # the second time from the cache
                    assert ours.from_string(source).render(name=name) == want, source
        for env in (ours, jinjas):
            with pytest.raises((ValueError, TypeError)):
                env.from_string('{{ _("50% off") }}').render()
    finally:
        i18n._current.reset(token)
