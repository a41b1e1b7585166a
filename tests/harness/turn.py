"""coturn inside the test network namespace, with TURN REST (time-limited) credentials."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness.programs import require_program
from tests.harness.server import BRIDGE_ADDR, free_port, tail

STUN_MAGIC = 0x2112A442


def turn_rest_credentials(secret: str, user: str = "test", ttl: int = 3600) -> tuple[str, str]:
    """(username, password) for coturn's --use-auth-secret: "<expiry>:<user>", b64 HMAC-SHA1."""
    username = f"{int(time.time()) + ttl}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def stun_binding_ok(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a STUN Binding request over UDP gets a Binding success response."""
    txid = secrets.token_bytes(12)
    request = struct.pack("!HHI", 0x0001, 0, STUN_MAGIC) + txid
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(request, (host, port))
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
    return len(data) >= 20 and data[:2] == b"\x01\x01" and data[8:20] == txid


class TurnServer:
    """`turnserver` on `listen_ips` (default the bridge address) with a random secret/realm.

    Attributes: `secret`, `realm`, `host`, `port`, `url` ("turn:10.99.0.1:PORT?transport=udp"),
    `log_path`. `credentials(user)` gives a REST username/password, `ice_server(user)` a dict to
    put into an `RTCConfiguration`'s `iceServers`.
    """

    def __init__(
        self,
        log_dir: Path | str,
        *,
        listen_ips: Sequence[str] = (BRIDGE_ADDR,),
        relay_ip: str | None = None,
        port: int | None = None,
        relay_ports: tuple[int, int] | None = None,
        secret: str | None = None,
        realm: str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.log_dir = Path(log_dir)
        self.listen_ips = list(listen_ips)
        self.host = self.listen_ips[0]
        self.relay_ip = relay_ip or self.host
        self.port = port if port is not None else self._pick_listen_port()
        if relay_ports is None:
            low = 40000 + secrets.randbelow(200) * 40  # 40000..47999, below the ephemeral range
            relay_ports = (low, low + 39)
        self.min_port, self.max_port = relay_ports
        self.secret = secret or secrets.token_hex(16)
        self.realm = realm or f"consult-test-{secrets.token_hex(4)}.invalid"
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)
        self.log_path = self.log_dir / f"turnserver-{self.port}.log"
        self.pidfile = self.log_dir / f"turnserver-{self.port}.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def _pick_listen_port(self) -> int:
        # coturn may also bind port+1 (RFC 5780 alternative port): keep both free.
        for _ in range(50):
            port = free_port(self.host, udp=True)
            with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((self.host, port + 1))
                return port
        raise RuntimeError("no free TURN port pair")

    @property
    def url(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=udp"

    @property
    def tcp_url(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=tcp"

    def credentials(self, user: str = "test", ttl: int = 3600) -> tuple[str, str]:
        return turn_rest_credentials(self.secret, user, ttl)

    def ice_server(self, user: str = "test", ttl: int = 3600, *, tcp: bool = False) -> dict:
        username, password = self.credentials(user, ttl)
        return {
            "urls": [self.tcp_url if tcp else self.url],
            "username": username,
            "credential": password,
        }

    def argv(self) -> list[str]:
        argv = [require_program("turnserver"), "-n"]
        argv += [f"--listening-ip={ip}" for ip in self.listen_ips]
        argv += [
            f"--relay-ip={self.relay_ip}",
            f"--listening-port={self.port}",
            f"--min-port={self.min_port}",
            f"--max-port={self.max_port}",
            "--use-auth-secret",
            f"--static-auth-secret={self.secret}",
            f"--realm={self.realm}",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--allow-loopback-peers",
            "--fingerprint",
            "--no-software-attribute",
            "--log-file=stdout",
            "--simple-log",
            f"--pidfile={self.pidfile}",
            # Not the system-wide /var/lib/turn/turndb.
            f"--userdb={self.log_dir / f'turndb-{self.port}'}",
            *self.extra_args,
        ]
        return argv

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> TurnServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
                start_new_session=True,
            )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self.proc is not None
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"turnserver exited with status {code}\n{tail(self.log_path)}")
            if self._tcp_listening() and stun_binding_ok(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"turnserver not answering on {self.host}:{self.port} within "
                    f"{self.startup_timeout:.0f} s\n{tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _tcp_listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    async def astart(self) -> TurnServer:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)

    def __enter__(self) -> TurnServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<TurnServer {self.url} realm={self.realm}>"
