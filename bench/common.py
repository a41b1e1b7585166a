"""Pieces the benchmarks share (each benchmark is still one command of its own).

Benchmarks never import from tests/: what they share with the test harness (the private
network namespace, a Consult server subprocess) is kept here in the form a benchmark needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


async def wait_ready(base: str, proc: subprocess.Popen, within: float = 60) -> None:
    """Wait until the server process answers /healthz, or fail with why it did not."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            try:
                async with s.get(base + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not become ready")


PATIENT_PASSWORD = "bench patient password 1"
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def add_patients(db_path: Path, count: int, prefix: str = "139") -> list[str]:
    """`count` patient accounts written straight into SQLite; returns their mobile numbers.

    One argon2 hash with the parameters the benchmarks give the server (CONSULT_ARGON2_TIME_COST=1,
    CONSULT_ARGON2_MEMORY_KIB=1024), so that signing in does not rehash. Sign-up itself is not
    benchmarked: it needs an SMS code and is throttled per address, as it should be.
    """
    from argon2 import PasswordHasher

    hashed = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PATIENT_PASSWORD)
    now = time.time()
    phones = [f"{prefix}{i:08d}" for i in range(count)]
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany(
            "INSERT INTO users (role, phone, display_name, password_hash, created, password_changed)"
            " VALUES ('patient', ?, ?, ?, ?, ?)",
            [(p, f"患者{p[-4:]}", hashed, now, now) for p in phones],
        )
    conn.close()
    return phones


async def sign_in(session: aiohttp.ClientSession, base: str, identifier: str, password: str) -> str:
    """Sign in through the real form; returns the CSRF token of the signed-in session."""
    async with session.get(base + "/login") as r:
        token = CSRF_RE.search(await r.text()).group(1)
    data = {"identifier": identifier, "password": password, "csrf_token": token}
    async with session.post(base + "/login", data=data, allow_redirects=False) as r:
        if r.status != 303:
            raise RuntimeError(f"sign-in of {identifier} failed: {r.status} {(await r.text())[:300]}")
        location = r.headers.get("Location", "/")
    async with session.get(base + location if location.startswith("/") else location) as r:
        found = CSRF_RE.search(await r.text())
    return found.group(1) if found else token


def loadavg() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages: a benchmark prints them before and after."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used so far, from /proc: a figure the
    other processes of a shared machine move far less than they move wall-clock rates."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- a private network namespace ----------------------------------------------------------------

BRIDGE_ADDR = "10.99.0.1"  # the same bridge as the test run's (tests/netns.py)
_BRIDGE = "br0"
_CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def enter_private_netns() -> str:
    """Unshare this process's network namespace (needs root); return the bridge address.

    Call it before any thread starts: every thread and child process (the server, Chromium)
    inherits the namespace, which has loopback plus a port-less bridge with 10.99.0.1/24 (a
    non-loopback address for aioice and Chromium) and no route out.
    """
    if os.environ.get("CONSULT_TEST_NETNS") == str(os.getpid()):
        return BRIDGE_ADDR
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(
            f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}; the benchmark must run as root "
            "(or with CAP_SYS_ADMIN) so that it can never reach a real network"
        )
    _ip("link", "set", "lo", "up")
    _ip("link", "add", _BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", _BRIDGE)
    _ip("link", "set", _BRIDGE, "up")
    os.environ["CONSULT_TEST_NETNS"] = str(os.getpid())
    return BRIDGE_ADDR


# -- the real Consult server as a subprocess ----------------------------------------------------


class ServerStartError(RuntimeError):
    """The server or a CLI command failed; the message has the log tail."""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "<no log>"
    return ("…" if len(data) > limit else "") + data[-limit:].decode("utf-8", "replace")


class ConsultServer:
    """`python -m consult --data-dir DIR serve --host H --port P --no-tls` in its own session.

    stdout and stderr go to `<log_dir>/<name>.stdout.log` and `.stderr.log`; `cli` runs the
    CLI's other commands (`init`, `demo`, `user passwd`) with the same environment. `stop`
    signals the whole process group: SIGTERM, then SIGKILL after `stop_timeout`.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        log_dir: Path | str,
        host: str = BRIDGE_ADDR,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "consult",
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        serve_args: Sequence[str] = (),
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.tls = tls  # (certificate, key): serve https/wss instead of --no-tls
        self.serve_args = list(serve_args)  # e.g. --demo: demo mode without `consult demo` data
        self.log_dir = Path(log_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.name = name
        # Not seeded by `consult demo`: production mode, which serve allows only with public_url.
        self.extra_env = {"CONSULT_PUBLIC_URL": self.origin, **(env or {})}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = self.log_dir / f"{name}.stdout.log"
        self.stderr_path = self.log_dir / f"{name}.stderr.log"

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.origin + (path if path.startswith("/") else "/" + path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}

    def logs(self) -> str:
        return (
            f"--- {self.stdout_path.name} ---\n{_tail(self.stdout_path)}\n"
            f"--- {self.stderr_path.name} ---\n{_tail(self.stderr_path)}"
        )

    def cli_argv(self) -> list[str]:
        return [sys.executable, "-m", "consult", "--data-dir", str(self.data_dir)]

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run `python -m consult --data-dir DIR ARGS...`; raise ServerStartError if it fails."""
        proc = subprocess.run(
            [*self.cli_argv(), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise ServerStartError(
                f"`consult {' '.join(args)}` failed with status {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
            )
        return proc

    def init(self, *, demo: bool = False) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cli("init")
        if demo:
            self.cli("demo")

    def start(self) -> None:
        argv = [*self.cli_argv(), "serve", "--host", self.host, "--port", str(self.port)]
        argv += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])] if self.tls else ["--no-tls"]
        argv += self.serve_args
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env(),
                cwd=ROOT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        # No proxy from the environment: the address is only on our bridge.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.tls:  # a self-signed development certificate
            handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))  # noqa: S323
        opener = urllib.request.build_opener(*handlers)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise ServerStartError(f"{self.name} exited with status {code}\n{self.logs()}")
            try:
                with opener.open(self.url("/healthz"), timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} not healthy within {self.startup_timeout:.0f} s\n{self.logs()}"
                )
            time.sleep(0.1)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL after `stop_timeout`; return the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._signal(signal.SIGKILL)  # nothing of the group may outlive the benchmark
        return self.proc.returncode

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)
