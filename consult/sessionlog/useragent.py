"""Device, OS and browser from a User-Agent string: enough for a session log, no dependency.

Patients join from phones, very often inside WeChat or a vendor browser, so those are
recognised before the engines they are built on (they all claim to be Chrome and Safari).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_UA = 512  # a longer header is not a browser we need to name


@dataclass(frozen=True)
class Device:
    kind: str  # desktop | mobile | tablet | bot | unknown
    os: str  # "Android 14", "iOS 17.2", "Windows 10/11", "" when unknown
    browser: str  # "WeChat 8.0", "Chrome 120", "" when unknown

    def label(self) -> str:
        parts = [p for p in (self.kind if self.kind != "unknown" else "", self.os, self.browser) if p]
        return " · ".join(parts) or "unknown"


# (name, pattern): the first match wins, so embedding browsers come before their engines.
_BROWSERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("WeChat", r"MicroMessenger/(\d+(?:\.\d+)?)"),
        ("WeCom", r"wxwork/(\d+(?:\.\d+)?)"),
        ("DingTalk", r"DingTalk/(\d+(?:\.\d+)?)"),
        ("Alipay", r"AlipayClient/(\d+(?:\.\d+)?)"),
        ("QQ Browser", r"MQQBrowser/(\d+(?:\.\d+)?)"),
        ("QQ", r"\bQQ/(\d+(?:\.\d+)?)"),
        ("UC Browser", r"UCBrowser/(\d+(?:\.\d+)?)"),
        ("Quark", r"Quark/(\d+(?:\.\d+)?)"),
        ("Baidu", r"baiduboxapp/(\d+(?:\.\d+)?)"),
        ("Huawei Browser", r"HuaweiBrowser/(\d+(?:\.\d+)?)"),
        ("MIUI Browser", r"(?:MiuiBrowser|XiaoMi/MiuiBrowser)/(\d+(?:\.\d+)?)"),
        ("Vivo Browser", r"VivoBrowser/(\d+(?:\.\d+)?)"),
        ("OPPO Browser", r"HeyTapBrowser/(\d+(?:\.\d+)?)"),
        ("Samsung Internet", r"SamsungBrowser/(\d+(?:\.\d+)?)"),
        ("Edge", r"Edg(?:e|A|iOS)?/(\d+)"),
        ("Opera", r"(?:OPR|OPiOS)/(\d+)"),
        ("Firefox", r"(?:Firefox|FxiOS)/(\d+)"),
        ("Headless Chrome", r"HeadlessChrome/(\d+)"),
        ("Chrome", r"(?:Chrome|CriOS)/(\d+)"),
        ("Safari", r"Version/(\d+(?:\.\d+)?)(?:\.\d+)*(?: Mobile/\w+)? Safari/"),
        ("aiortc", r"aiortc/(\d+(?:\.\d+)?)"),
        ("Python", r"Python(?:/|-urllib/|-aiohttp/| aiohttp/)(\d+(?:\.\d+)?)"),
        ("curl", r"curl/(\d+(?:\.\d+)?)"),
    )
)

_IOS = re.compile(r"(?:iPhone|CPU) OS (\d+)(?:_(\d+))?")
_ANDROID = re.compile(r"Android (\d+(?:\.\d+)?)")
_HARMONY = re.compile(r"(?:HarmonyOS|OpenHarmony)[ /]?(\d+(?:\.\d+)?)?")
_MACOS = re.compile(r"Mac OS X (\d+)[_.](\d+)")
_WINDOWS = {"10.0": "10/11", "6.3": "8.1", "6.2": "8", "6.1": "7"}
_WINDOWS_RE = re.compile(r"Windows NT (\d+\.\d+)")
_BOT = re.compile(r"bot|crawler|spider|slurp", re.IGNORECASE)


def _os(ua: str) -> str:
    if m := _HARMONY.search(ua):
        return "HarmonyOS" + (f" {m.group(1)}" if m.group(1) else "")
    if m := _IOS.search(ua):
        name = "iPadOS" if "iPad" in ua else "iOS"
        return f"{name} {m.group(1)}" + (f".{m.group(2)}" if m.group(2) else "")
    if m := _ANDROID.search(ua):
        return f"Android {m.group(1)}"
    if m := _WINDOWS_RE.search(ua):
        return "Windows " + _WINDOWS.get(m.group(1), m.group(1))
    if m := _MACOS.search(ua):
        return f"macOS {m.group(1)}.{m.group(2)}"
    if "CrOS" in ua:
        return "ChromeOS"
    if "Linux" in ua:
        return "Linux"
    return ""


def _kind(ua: str, os_name: str) -> str:
    if _BOT.search(ua):
        return "bot"
    if "iPad" in ua or "Tablet" in ua or (os_name.startswith("Android") and "Mobile" not in ua):
        return "tablet"
    if "Mobi" in ua or "iPhone" in ua or os_name.startswith(("iOS", "Android", "HarmonyOS")):
        return "mobile"
    if os_name:
        return "desktop"
    return "unknown"


def parse(ua: str | None) -> Device:
    if not ua:
        return Device("unknown", "", "")
    ua = ua[:MAX_UA]
    os_name = _os(ua)
    browser = ""
    for name, pattern in _BROWSERS:
        if m := pattern.search(ua):
            browser = f"{name} {m.group(1)}"
            break
    # iPadOS 13+ asks for desktop pages as "Macintosh"; only touch support tells, which a UA lacks.
    return Device(_kind(ua, os_name), os_name, browser)


def label(ua: str | None) -> str:
    return parse(ua).label()
