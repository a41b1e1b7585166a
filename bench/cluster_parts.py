"""What bench/cluster.py needs to run a cluster: a throwaway PostgreSQL and HAProxy with the
shipped deploy/haproxy.cfg.

Benchmarks never import from tests/, so this DUPLICATES, in the small form a benchmark needs,
tests/harness/postgres.py (initdb into a temporary directory as the `postgres` user via setpriv,
durability off) and tests/harness/haproxy.py (`render_config`: the shipped file with only the
bind lines, certificate path, server lines and maxconn changed, failing if any of those lines is
no longer in the file). Change both places together.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import ROOT, free_port

# -- programs -----------------------------------------------------------------------------------


def find_program(name: str) -> str:
    """On PATH, in sbin (haproxy) or in Debian's versioned PostgreSQL directory (initdb)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        dirs = sorted(
            (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()),
            key=lambda p: int(p.parent.name),
            reverse=True,
        )
        found = shutil.which(name, path=os.pathsep.join(map(str, dirs))) if dirs else None
    if found is None:
        raise SystemExit(f"{name} is not installed (scripts/install-test-deps.sh installs it)")
    return found


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return "<no log>"


# -- PostgreSQL ---------------------------------------------------------------------------------

PG_SETTINGS = {  # the test harness's: speed over durability on a small shared machine
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


class Postgres:
    """One throwaway cluster: `start()` (initdb + postgres), `socket_url(db)`, `stop()` (and the
    directory is removed). As root it runs as the `postgres` user, as PostgreSQL insists."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.directory: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    @property
    def log_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "postgres.log"

    def socket_url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.directory}&port={self.port}"

    def _as_owner(self) -> list[str]:
        if self.owner is None:
            return []
        return [
            find_program("setpriv"),
            f"--reuid={self.owner.pw_uid}",
            f"--regid={self.owner.pw_gid}",
            "--init-groups",
        ]

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        return env

    def start(self) -> Postgres:
        self.directory = Path(tempfile.mkdtemp(prefix="consult-bench-pg-"))
        if self.owner is not None:
            os.chown(self.directory, self.owner.pw_uid, self.owner.pw_gid)
        data = self.directory / "data"
        done = subprocess.run(
            [*self._as_owner(), find_program("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-locale", "--no-sync"],
            capture_output=True, env=self._env(), cwd=self.directory, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"initdb failed:\n{(done.stdout + done.stderr).decode(errors='replace')}")
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"\nlisten_addresses = '{self.host}'\nport = {self.port}\n")
            conf.write(f"unix_socket_directories = '{self.directory}'\n")
            conf.writelines(f"{k} = {v}\n" for k, v in PG_SETTINGS.items())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self._as_owner(), find_program("postgres"), "-D", str(data)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self._env(),
                cwd=self.directory, start_new_session=True,
            )  # fmt: skip
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"postgres exited while starting:\n{_tail(self.log_path)}")
            try:
                with psycopg.connect(self.socket_url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"postgres did not start:\n{_tail(self.log_path)}") from None
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.socket_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.socket_url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


# -- HAProxy ------------------------------------------------------------------------------------

SHIPPED = ROOT / "deploy" / "haproxy.cfg"
SHIPPED_CERT = "/etc/consult/tls/haproxy.pem"
SHIPPED_SERVERS = ("    server node1 10.0.0.11:8443 check\n", "    server node2 10.0.0.12:8443 check\n")
BACKENDS = 2


def _replace(text: str, old: str, new: str, count: int = 1) -> str:
    found = text.count(old)
    if found != count:
        raise SystemExit(f"deploy/haproxy.cfg has {old!r} {found} times, expected {count}")
    return text.replace(old, new)


def render_config(
    *, host: str, port: int, redirect_port: int, pem: Path, nodes: Sequence[tuple[str, int]]
) -> str:
    """The shipped configuration with this run's addresses (as tests/harness/haproxy.py does)."""
    text = SHIPPED.read_text(encoding="utf-8")
    text = _replace(text, "    maxconn 20000\n", "    maxconn 4000\n")
    text = _replace(text, "    bind :80\n", f"    bind {host}:{redirect_port}\n")
    text = _replace(text, "    bind :443 ssl crt ", f"    bind {host}:{port} ssl crt ")
    text = _replace(text, SHIPPED_CERT, str(pem))
    servers = "".join(f"    server node{i} {h}:{p} check\n" for i, (h, p) in enumerate(nodes, start=1))
    return _replace(text, "".join(SHIPPED_SERVERS), servers, count=BACKENDS)


INSECURE = ssl.create_default_context()
INSECURE.check_hostname = False
INSECURE.verify_mode = ssl.CERT_NONE


class HAProxy:
    """`haproxy -db -f haproxy.cfg` (foreground, logs to haproxy.log) on https://HOST:PORT."""

    def __init__(
        self, directory: Path, nodes: Sequence[tuple[str, int]], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        from consult.ops.certs import generate

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        cert, key, _ = generate(self.directory / "tls", [host])
        self.pem = self.directory / "haproxy.pem"
        self.pem.write_bytes(cert.read_bytes() + key.read_bytes())
        self.pem.chmod(0o600)
        self.conf = self.directory / "haproxy.cfg"
        self.conf.write_text(
            render_config(host=host, port=self.port, redirect_port=free_port(host), pem=self.pem, nodes=nodes)
        )
        self.log_path = self.directory / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"https://{self.host}:{self.port}"

    def log(self) -> str:
        return _tail(self.log_path, 1_000_000)

    def start(self) -> HAProxy:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [find_program("haproxy"), "-db", "-f", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"haproxy exited:\n{_tail(self.log_path)}")
            with contextlib.suppress(OSError):
                with socket.create_connection((self.host, self.port), timeout=2) as raw:
                    with INSECURE.wrap_socket(raw, server_hostname=self.host):
                        return self
            if time.monotonic() > deadline:
                raise SystemExit(f"haproxy did not start:\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
