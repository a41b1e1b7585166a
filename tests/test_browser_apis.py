"""Safari by construction: the patient's pages must work on an iPhone (Safari/WebKit, which the
WeChat in-app browser on iOS also is), and no WebKit with WebRTC runs here (webrtc-facts.md).
So the browser APIs those pages use are listed in docs/browser-apis.json and checked against
what Safari on iOS 15 has, from a vendored subset of MDN's browser-compat-data
(tests/data/safari-ios-compat.json):

- the list is exactly what the scripts use (a new API in a patient page fails until listed);
- anything newer than iOS 15.0, or missing from Safari (Chrome-only), is used only behind the
  guard the list names, with the fallback it describes;
- the videos play inline, muted where they autoplay without a tap; the remote video (it has
  the sound) is started from the Join tap; the camera flip asks for `facingMode`.

Regenerate the "used_in" part after a change: `python -m tests.test_browser_apis`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from consult.core.templates import BUNDLES

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "web" / "templates"
STATIC = ROOT / "web" / "static"
LIST_PATH = ROOT / "docs" / "browser-apis.json"
COMPAT_PATH = ROOT / "tests" / "data" / "safari-ios-compat.json"

STATIC_RE = re.compile(r"""static\(['"]([\w./-]+\.js)['"]\)""")
INCLUDE_RE = re.compile(r"""{%-?\s*include\s+['"]([\w.-]+)['"]""")
VIDEO_RE = re.compile(r"<video\b[^>]*>")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def version(v: str | bool) -> tuple[int, ...]:
    if v is False:
        return (10**6,)  # never
    return tuple(int(part) for part in str(v).split("."))


def page_scripts(pages: list[str]) -> list[str]:
    """The web/static scripts the templates load, following {% include %}s."""
    seen: set[str] = set()
    scripts: set[str] = set()
    todo = list(pages)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        text = (TEMPLATES / name).read_text()
        for script in STATIC_RE.findall(text):
            scripts.update(BUNDLES.get(script, (script,)))  # a bundle: its parts
        todo.extend(INCLUDE_RE.findall(text))
    return sorted(scripts)


def code_of(path: Path) -> str:
    return strip_comments(path.read_text())


def strip_comments(src: str) -> str:
    """JS source without comments (strings kept): what the code calls, not what it says."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in "\"'`":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i : j + 1])
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def scan(scripts: list[str], features: dict) -> dict[str, list[str]]:
    """BCD feature key -> the scripts that use it."""
    codes = {name: code_of(STATIC / name) for name in scripts}
    used: dict[str, list[str]] = {}
    for key, feature in features.items():
        pattern = re.compile(feature["pattern"])
        files = [name for name, code in codes.items() if pattern.search(code)]
        if files:
            used[key] = files
    return used


def test_the_patient_pages_scripts_are_the_listed_ones():
    listed = load(LIST_PATH)
    assert listed["scripts"] == page_scripts(listed["pages"])
    # The call page's own scripts are all in (it is the page that must work on a phone).
    assert set(page_scripts(["call_patient.html"])) <= set(listed["scripts"])


def test_the_list_is_what_the_scripts_use():
    listed = load(LIST_PATH)
    features = load(COMPAT_PATH)["features"]
    used = scan(listed["scripts"], features)
    declared = {key: entry["used_in"] for key, entry in listed["apis"].items()}
    assert declared == used, (
        "docs/browser-apis.json is out of date: run `python -m tests.test_browser_apis`, then add "
        "a guard and fallback for anything newer than the target"
    )


def test_nothing_beyond_safari_ios_15_without_a_guard_and_a_fallback():
    listed = load(LIST_PATH)
    target = version(listed["target"]["safari_ios"])
    features = load(COMPAT_PATH)["features"]
    problems = []
    for key, entry in listed["apis"].items():
        have = features[key]["safari_ios"]
        assert entry["safari_ios"] == have, f"{key}: the list says {entry['safari_ios']}, the data {have}"
        if version(have) <= target:
            continue
        guard, fallback = entry.get("guard"), entry.get("fallback")
        if not guard or not fallback:
            problems.append(f"{key} (Safari iOS {have or 'never'}): used without a guard and a fallback")
            continue
        for name in entry["used_in"]:
            if guard not in code_of(STATIC / name):
                problems.append(f"{key}: {name} does not contain its guard {guard!r}")
    assert not problems, "\n".join(problems)


def test_the_compat_data_knows_the_chrome_only_and_recent_apis():
    # The test is only as good as its data: these must stay in it (they are the usual traps).
    features = load(COMPAT_PATH)["features"]
    for key in (
        "api.Navigator.permissions",
        "api.HTMLVideoElement.requestVideoFrameCallback",
        "api.Crypto.randomUUID",
        "api.Window.requestIdleCallback",
        "api.HTMLMediaElement.setSinkId",
        "api.RTCRtpSender.createEncodedStreams",
        "api.Navigator.connection",
    ):
        assert version(features[key]["safari_ios"]) > (15, 0), key
    # ... and the scanner sees a use in code but not in a comment.
    pattern = re.compile(features["api.Crypto.randomUUID"]["pattern"])
    assert pattern.search("const id = crypto.randomUUID();")
    commented = "// crypto.randomUUID() is iOS 15.4\nconst id = 1; /* crypto.randomUUID() */"
    assert not pattern.search(strip_comments(commented))
    assert "'//not a comment'" in strip_comments("const s = '//not a comment';")


def test_videos_play_inline_and_only_muted_ones_autoplay_by_themselves():
    listed = load(LIST_PATH)
    seen = set()
    todo = list(listed["pages"])
    videos: list[str] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        text = (TEMPLATES / name).read_text()
        videos += [tag for tag in VIDEO_RE.findall(text) if "autoplay" in tag]
        todo.extend(INCLUDE_RE.findall(text))
    assert videos
    for tag in videos:
        # Without playsinline, iOS Safari opens a playing video full screen.
        assert "playsinline" in tag, tag
        # Autoplay with sound needs a tap: only the muted local previews play by themselves.
        assert "muted" in tag or "data-remote-video" in tag, tag
    # The remote video (the doctor's voice) is started from the Join tap, and again on a new
    # track once joined.
    call_js = code_of(STATIC / "call.js")
    join = call_js[call_js.index('case "join":') : call_js.index('case "mute":')]
    assert "remoteVideo.play()" in join
    assert "ctx.joined" in code_of(STATIC / "call-peer.js") and ".play()" in code_of(STATIC / "call-peer.js")


def test_the_camera_flip_asks_for_front_and_back_by_facing_mode():
    media = code_of(STATIC / "call-media.js")
    flip = media[media.index("async function flipCamera") :]
    assert '"user"' in flip and '"environment"' in flip and "facingMode" in flip
    stage = (TEMPLATES / "_call_stage.html").read_text()
    assert 'data-action="flip"' in stage


def regenerate() -> None:
    """Rewrite docs/browser-apis.json's `apis` from a scan, keeping guards and fallbacks."""
    listed = load(LIST_PATH)
    features = load(COMPAT_PATH)["features"]
    listed["scripts"] = page_scripts(listed["pages"])
    used = scan(listed["scripts"], features)
    old = listed.get("apis", {})
    apis = {}
    for key in sorted(used):
        entry = {"safari_ios": features[key]["safari_ios"], "used_in": used[key]}
        for extra in ("guard", "fallback", "note"):
            if extra in old.get(key, {}):
                entry[extra] = old[key][extra]
        apis[key] = entry
    listed["apis"] = apis
    # One line per API: the file reads as a table.
    head = json.dumps({k: v for k, v in listed.items() if k != "apis"}, indent=2, ensure_ascii=False)
    rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in apis.items())
    LIST_PATH.write_text(head[:-2] + ',\n  "apis": {\n' + rows + "\n  }\n}\n")


if __name__ == "__main__":
    regenerate()
    sys.exit(0)
