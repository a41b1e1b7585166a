"""Start real servers as subprocesses and wait until they answer.

`ServerProcess` is generic: any argv plus an HTTP health URL. `ConsultServer` builds the argv of
`python -m consult --data-dir DIR serve --host H --port P --no-tls` and runs the CLI's other
commands (`init`, `demo`) with the same environment.

The blocking methods (`start`, `stop`, `restart`, `kill9`) do not depend on an event loop, so
they work from fixtures of any scope; the `a*` variants run them in a worker thread so that an
asyncio test (and the Playwright connection on its loop) keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

BRIDGE_ADDR = "10.99.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Ports handed out by `free_port` lie below Linux's ephemeral range (32768-60999), so that a
# socket Chromium or coturn opens meanwhile cannot take a port between picking and binding.
_PORT_RANGE = (20000, 32000)
_given_ports: set[int] = set()

# No proxy from the environment for health checks: the address is only on our bridge.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """The process died or did not become healthy in time; the message has its log tail."""


def free_port(host: str = BRIDGE_ADDR, *, udp: bool = False) -> int:
    """A port that is free on `host` for TCP (and UDP too if `udp`), not handed out before."""
    for _ in range(500):
        port = random.randrange(*_PORT_RANGE)
        if port in _given_ports:
            continue
        kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp else [])
        try:
            for kind in kinds:
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        _given_ports.add(port)
        return port
    raise RuntimeError(f"no free port on {host}")


def tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "<no log>"
    text = data[-limit:].decode("utf-8", "replace")
    return ("…" if len(data) > limit else "") + text


class ServerProcess:
    """A subprocess that serves HTTP; healthy once `health_url` answers `expected_status`.

    stdout and stderr go to `<log_dir>/<name>.stdout.log` and `<name>.stderr.log` (appended to
    on `restart`). The process gets its own session, so `stop` and `kill9` signal its whole
    process group and nothing else.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        health_url: str,
        log_dir: Path | str,
        name: str = "server",
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        expected_status: int = 200,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.health_url = health_url
        self.log_dir = Path(log_dir)
        self.name = name
        self.extra_env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else REPO_ROOT
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.expected_status = expected_status
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stdout_path = self.log_dir / f"{name}.stdout.log"
        self.stderr_path = self.log_dir / f"{name}.stderr.log"

    # -- state -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def logs(self) -> str:
        return (
            f"--- {self.stdout_path.name} ---\n{tail(self.stdout_path)}\n"
            f"--- {self.stderr_path.name} ---\n{tail(self.stderr_path)}"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} {self.health_url}>"

    # -- blocking control --------------------------------------------------------------------

    def start(self) -> ServerProcess:
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        banner = f"=== start #{self.starts}: {' '.join(self.argv)}\n".encode()
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            out.write(banner)
            err.write(banner)
            out.flush()
            err.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env(),
                cwd=self.cwd,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        last = "no answer yet"
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {code} before {self.health_url} answered "
                    f"(argv: {self.argv})\n{self.logs()}"
                )
            status = self._probe()
            if status == self.expected_status:
                return
            last = f"last answer: {status}"
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} not healthy at {self.health_url} within "
                    f"{self.startup_timeout:.0f} s ({last})\n{self.logs()}"
                )
            time.sleep(0.1)

    def _probe(self) -> int | str:
        try:
            with _opener.open(self.health_url, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, urllib.error.URLError) as e:
            return repr(e)

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
        # Children left in the group (none expected) must not outlive the test.
        self._signal(signal.SIGKILL)
        return self.proc.returncode

    def kill9(self) -> int:
        """Crash the server: SIGKILL its process group without any warning."""
        if self.proc is None:
            raise RuntimeError(f"{self!r} was never started")
        self._signal(signal.SIGKILL)
        return self.proc.wait()

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- asyncio-friendly wrappers -----------------------------------------------------------

    async def astart(self) -> ServerProcess:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)

    async def arestart(self) -> ServerProcess:
        return await asyncio.to_thread(self.restart)

    async def akill9(self) -> int:
        return await asyncio.to_thread(self.kill9)


class ConsultServer(ServerProcess):
    """The real Consult server: `python -m consult --data-dir DIR serve ... --no-tls`."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        log_dir: Path | str,
        port: int | None = None,
        host: str = BRIDGE_ADDR,
        env: Mapping[str, str] | None = None,
        name: str = "consult",
        startup_timeout: float = 20.0,
        cwd: Path | str | None = None,
        serve_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        argv = [
            *self.cli_argv(),
            "serve",
            "--host",
            host,
            "--port",
            str(self.port),
            "--no-tls",
            *serve_args,  # e.g. --demo: demo mode for a data dir not seeded by `consult demo`
        ]
        # A data dir not seeded by `consult demo` is served in production mode, which `serve`
        # allows only with a public_url: the server's own origin, unless `env` names another.
        env = {"CONSULT_PUBLIC_URL": self.origin, **(env or {})}
        super().__init__(
            argv,
            health_url=f"{self.origin}/healthz",
            log_dir=log_dir,
            name=name,
            env=env,
            cwd=cwd,
            startup_timeout=startup_timeout,
        )

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    base_url = origin

    def url(self, path: str = "/") -> str:
        return self.origin + (path if path.startswith("/") else "/" + path)

    def cli_argv(self) -> list[str]:
        return [sys.executable, "-m", "consult", "--data-dir", str(self.data_dir)]

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run `python -m consult --data-dir DIR ARGS...` with the server's environment."""
        argv = [*self.cli_argv(), *args]
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.cwd,
            timeout=timeout,
            check=False,
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{self.name}.cli.log", "a") as log:
            log.write(f"=== {' '.join(argv)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise ServerStartError(
                f"`consult {' '.join(args)}` failed with status {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
            )
        return proc

    def init(self, *, demo: bool = False) -> None:
        """`consult init`, and `consult demo` if `demo` (which makes the data dir a demo one)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cli("init")
        if demo:
            self.cli("demo")


def start_consult(
    tmp_path: Path,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    demo: bool = True,
    name: str = "consult",
) -> ConsultServer:
    """init (+ demo) a fresh data dir under `tmp_path` and start the server; blocking."""
    server = ConsultServer(tmp_path / f"{name}-data", log_dir=tmp_path, port=port, env=env, name=name)
    server.init(demo=demo)
    server.start()
    return server
