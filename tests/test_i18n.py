from __future__ import annotations

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
