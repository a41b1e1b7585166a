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
