"""The check that no English sentence reaches a zh_CN page or JSON message can fail."""

from __future__ import annotations

import pytest
from aiohttp import web

from consult.app import create_app
from tests.language_check import english_in_html, english_in_json, latin_sentences


def test_what_counts_as_an_english_sentence():
    assert latin_sentences("This visit is not open yet.") == ["This visit is not open yet."]
    assert latin_sentences("该手机号已注册。Sign in") == ["Sign in"]
    # Names, codes, numbers, URLs, units and the brand are not sentences.
    for fine in (
        "Test Person",
        "Doctor 0",
        "患者 Ms A. Patient",
        "report.view / report.",
        "ORD-HOME-1 ¥50.00",
        "https://consult.example/call/abc 42 ms",
        "Consult 在线复诊",
        "12 kbit/s · 30 fps",
        "Leave",
        "Admin · boss",
        "mobile · iOS 17.2 · WeChat 8.0",
    ):
        assert latin_sentences(fine) == [], fine


def test_pages_are_read_as_a_user_sees_them():
    page = (
        "<html><head><title>登录</title><style>body { color: red }</style>"
        "<script>if (a && b) { alert('not shown to anyone') }</script>"
        '<script type="application/json" id="strings">{"left": "You left the visit.", "ok": "好"}</script>'
        '</head><body><!-- a comment in English --><p>好的</p><input placeholder="Your mobile number">'
        '<button>Leave the visit</button><td lang="en">Internal medicine <b>and</b> more</td></body></html>'
    )
    assert english_in_html(page) == ["You left the visit.", "Your mobile number", "Leave the visit"]
    assert english_in_json('{"error": "slot_taken", "message": "This time was just taken."}') == [
        "This time was just taken."
    ]
    assert english_in_json('{"error": "slot_taken", "message": "该时间刚刚被约走了。"}') == []


async def test_the_check_fails_a_test_that_serves_english_to_a_chinese_reader(
    aiohttp_client, settings, english_on_zh_pages
):
    app = create_app(settings)

    async def english(request: web.Request) -> web.Response:
        return web.json_response({"error": "nope", "message": "This visit is not open yet."}, status=409)

    app.router.add_get("/api/english-for-the-check", english)
    client = await aiohttp_client(app)
    await client.get("/api/english-for-the-check", headers={"Accept-Language": "en"})
    assert english_on_zh_pages.items == []  # an English reader may read English
    await client.get("/api/english-for-the-check")  # the default: zh_CN
    assert english_on_zh_pages.items == [
        ("GET /api/english-for-the-check 409", "This visit is not open yet.")
    ]
    english_on_zh_pages.items.clear()  # seen; otherwise this test would fail (see below)


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason="the language check must fail this test")
async def test_an_english_sentence_on_a_chinese_page_fails_the_test(aiohttp_client, settings):
    app = create_app(settings)

    async def english(request: web.Request) -> web.Response:
        return web.Response(text="<p>Your visit was booked.</p>", content_type="text/html")

    app.router.add_get("/english-for-the-check", english)
    client = await aiohttp_client(app)
    assert (await client.get("/english-for-the-check")).status == 200
