"""Headless Firefox ESR (Debian `firefox-esr`) driven over WebDriver BiDi: the second engine.

No geckodriver (none is packaged, and its installers download from outside): Firefox speaks
WebDriver BiDi itself (`--remote-debugging-port`), and a plain aiohttp WebSocket client sends
the few commands the call tests need: `session.new`, `browsingContext.navigate`,
`script.evaluate` / `script.callFunction`, `input.performActions` (real pointer clicks, so the
page gets a user activation as from a tap) and `session.end`.

Firefox runs in its own process group with a fresh profile whose `user.js` gives it fake media
devices without prompts, trusts the test server's plain-http origin as a secure context and
turns off everything that phones home. Inside the test run's private network namespace it needs
a default route to gather ICE candidates at all (`default_route`; see
/work/shared/webrtc-facts.md): the bridge has nothing behind it, so nothing leaves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness.programs import require_program

LISTENING_RE = re.compile(r"WebDriver BiDi listening on (ws://\S+)")
START_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 45

# Profile preferences (user.js). Fake camera and microphone, no permission prompts, autoplay
# allowed as after a tap, host candidates not hidden behind mDNS names, nothing phoning home.
BASE_PREFS: dict[str, Any] = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "permissions.default.camera": 1,
    "permissions.default.microphone": 1,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    "media.autoplay.block-webaudio": False,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.default_address_only": False,
    "media.gmp-manager.updateEnabled": False,
    "media.gmp-gmpopenh264.autoupdate": False,
    "media.gmp-gmpopenh264.enabled": False,
    "network.proxy.type": 0,
    # Plain http on the test bridge: no upgrade attempt to https on the same port.
    "dom.security.https_first": False,
    "dom.security.https_first_schemeless": False,
    "dom.security.https_first_pbm": False,
    "dom.security.https_first_for_custom_ports": False,
    "dom.security.https_first_for_local_addresses": False,
    "dom.security.https_first_for_unknown_suffixes": False,
    "dom.security.https_only_mode": False,
    "network.http.speculative-parallel-limit": 0,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "app.update.enabled": False,
    "app.update.auto": False,
    "app.normandy.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "browser.aboutwelcome.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "browser.search.update": False,
    "browser.ping-centre.telemetry": False,
    "browser.newtabpage.enabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.server": "",
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.blocklist.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "remote.prefs.recommended": True,
    "dom.disable_beforeunload": True,
}


class BiDiError(RuntimeError):
    """A BiDi command answered with an error, or a script threw."""


def user_js(prefs: dict[str, Any]) -> str:
    return "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())


def from_remote(value: dict) -> Any:
    """A BiDi RemoteValue as a Python value (nodes and other objects as their raw dict)."""
    kind = value.get("type")
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return value["value"]
    if kind == "number":
        v = value["value"]
        if isinstance(v, str):  # NaN, -0, Infinity
            return float(v.replace("Infinity", "inf")) if v != "-0" else 0
        return v
    if kind == "bigint":
        return int(value["value"])
    if kind == "array":
        return [from_remote(v) for v in value.get("value", [])]
    if kind == "object":
        out = {}
        for key, v in value.get("value", []):
            out[key if isinstance(key, str) else json.dumps(from_remote(key))] = from_remote(v)
        return out
    return value


@contextlib.contextmanager
def default_route(device: str = "br0") -> Iterator[None]:
    """A default route inside the private namespace while Firefox runs: without one, Firefox
    gathers no ICE candidates. The bridge has nothing behind it, so nothing can leave."""
    ip = require_program("ip")
    shown = subprocess.run([ip, "route", "show", "default"], capture_output=True, text=True, check=True)
    added = not shown.stdout.strip()
    if added:
        subprocess.run([ip, "route", "add", "default", "dev", device], check=True, capture_output=True)
    try:
        yield
    finally:
        if added:
            subprocess.run([ip, "route", "del", "default", "dev", device], capture_output=True)


class Firefox:
    """One headless Firefox process with one BiDi session and its first tab.

    `await Firefox(profile_dir, secure_origins=[...]).start()`; then `navigate`, `evaluate`,
    `click`, `wait_for`; `await close()` ends the session and the process group.
    """

    def __init__(
        self, profile_dir: Path, secure_origins: Sequence[str] = (), prefs: dict[str, Any] | None = None
    ) -> None:
        self.profile_dir = profile_dir
        self.log_path = profile_dir.parent / f"{profile_dir.name}.log"
        # Plain-http test origins count as secure contexts (camera, microphone), as Chromium's
        # --unsafely-treat-insecure-origin-as-secure does in tests/harness/browser.py.
        hosts = sorted({re.sub(r"^\w+://([^:/]+).*$", r"\1", o) for o in secure_origins})
        allow = {"dom.securecontext.allowlist": ",".join(hosts)} if hosts else {}
        self.prefs = {**BASE_PREFS, **allow, **(prefs or {})}
        self.proc: subprocess.Popen | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self.context: str | None = None
        self.console: list[str] = []
        self.errors: list[str] = []

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> Firefox:
        await asyncio.to_thread(self._spawn)
        url = await self._listening_url()
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url.rstrip("/") + "/session", max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.command("session.new", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": True}}})
        await self.command("session.subscribe", {"events": ["log.entryAdded"]})
        tree = await self.command("browsingContext.getTree", {"maxDepth": 0})
        self.context = tree["contexts"][0]["context"]
        return self

    def _spawn(self) -> None:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        (self.profile_dir / "user.js").write_text(user_js(self.prefs))
        argv = [
            require_program("firefox-esr"),
            "--headless",
            "--no-remote",
            "--profile",
            str(self.profile_dir),
            "--remote-debugging-port=0",
            "--remote-allow-hosts=127.0.0.1",
            "--width=1280",
            "--height=900",
        ]
        env = {**os.environ, "HOME": str(self.profile_dir), "MOZ_CRASHREPORTER_DISABLE": "1"}
        for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(key, None)
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # stopped by its process group in close()
            )

    async def _listening_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            found = LISTENING_RE.search(text)
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise BiDiError(f"firefox exited ({self.proc.returncode}):\n{text[-3000:]}")
            await asyncio.sleep(0.1)
        raise BiDiError(f"firefox did not open WebDriver BiDi in {START_TIMEOUT_S} s:\n{text[-3000:]}")

    async def close(self) -> None:
        """End the session, then the whole process group, whatever state the browser is in (a
        hung page, a cancelled test): the process is stopped in any case."""
        try:
            if self._ws is not None and not self._ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.command("session.end", {}), 5)
        finally:
            await asyncio.to_thread(self._stop_process)
            if self._reader is not None:
                self._reader.cancel()
            if self._ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._ws.close(), 5)
            if self._http is not None:
                await self._http.close()

    def _stop_process(self) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # children (content processes) too
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # any content process left behind
            return

    # -- the protocol --------------------------------------------------------------------------

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                future = self._pending.pop(data["id"])
                if not future.done():
                    future.set_result(data)
            elif data.get("method") == "log.entryAdded":
                entry = data["params"]
                line = f"[{entry.get('level')}] {entry.get('text')}"
                (self.errors if entry.get("type") == "javascript" else self.console).append(line)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BiDiError("the BiDi connection closed"))

    async def command(self, method: str, params: dict) -> dict:
        assert self._ws is not None, "start() first"
        ident = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        try:
            answer = await asyncio.wait_for(future, COMMAND_TIMEOUT_S)
        except TimeoutError:
            self._pending.pop(ident, None)
            raise BiDiError(f"{method}: no answer in {COMMAND_TIMEOUT_S} s") from None
        if answer.get("type") == "error":
            raise BiDiError(f"{method}: {answer.get('error')}: {answer.get('message')}")
        return answer["result"]

    # -- what tests use ------------------------------------------------------------------------

    async def navigate(self, url: str) -> None:
        params = {"context": self.context, "url": url, "wait": "complete"}
        await self.command("browsingContext.navigate", params)

    async def url(self) -> str:
        return await self.evaluate("location.href")

    async def _script(self, method: str, params: dict) -> dict:
        target = {"context": self.context}
        result = await self.command(method, {"target": target, "awaitPromise": True, **params})
        if result.get("type") == "exception":
            details = result.get("exceptionDetails", {})
            raise BiDiError(f"script threw: {details.get('text')}")
        return result["result"]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JS expression (promises awaited) as a Python value."""
        return from_remote(await self._script("script.evaluate", {"expression": expression}))

    async def call(self, function: str, *args: Any) -> Any:
        """`function` (a JS function declaration, may be async) called with JSON-able args."""
        arguments = [{"type": "string", "value": json.dumps(a)} for a in args]
        wrapper = f"(...a) => ({function})(...a.map((x) => JSON.parse(x)))"
        params = {"functionDeclaration": wrapper, "arguments": arguments}
        return from_remote(await self._script("script.callFunction", params))

    async def wait_for(self, expression: str, timeout_s: float = 20, what: str | None = None) -> Any:
        """Poll until the JS expression is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(BiDiError):  # e.g. a navigation in between
                value = await self.evaluate(expression)
                if value:
                    return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"not true within {timeout_s} s: {what or expression} (last: {value!r})")

    async def wait_visible(self, selector: str, timeout_s: float = 20) -> None:
        found = f"document.querySelector({json.dumps(selector)})"
        js = f"(() => {{ const e = {found}; return !!e && e.checkVisibility(); }})()"
        await self.wait_for(js, timeout_s, f"{selector} visible")

    async def text(self, selector: str) -> str:
        return await self.evaluate(f"document.querySelector({json.dumps(selector)})?.textContent ?? ''")

    async def click(self, selector: str, timeout_s: float = 20) -> None:
        """A real pointer click in the middle of the (visible) element: a user activation, as
        a tap is on the phone (the page may start audio playback from it)."""
        await self.wait_visible(selector, timeout_s)
        node = await self._script(
            "script.evaluate",
            {
                "expression": f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                "e.scrollIntoView({block: 'center'}); return e; })()",
                "resultOwnership": "root",
            },
        )
        origin = {"type": "element", "element": {"sharedId": node["sharedId"]}}
        await self.command(
            "input.performActions",
            {
                "context": self.context,
                "actions": [
                    {
                        "type": "pointer",
                        "id": "mouse",
                        "parameters": {"pointerType": "mouse"},
                        "actions": [
                            {"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
                            {"type": "pointerDown", "button": 0},
                            {"type": "pointerUp", "button": 0},
                        ],
                    }
                ],
            },
        )

    async def screenshot(self, path: Path) -> None:
        shot = await self.command("browsingContext.captureScreenshot", {"context": self.context})
        await asyncio.to_thread(_write_bytes, path, base64.b64decode(shot["data"]))

    def log_text(self) -> str:
        parts = ["## console", *self.console, "## page errors", *self.errors]
        if self.log_path.exists():
            parts += ["## firefox output", self.log_path.read_text(errors="replace")[-20000:]]
        return "\n".join(parts) + "\n"


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
