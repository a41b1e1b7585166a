"""A throwaway PostgreSQL for a test session: Debian's server programs, a fresh cluster in a
temporary directory, thrown away when the session ends.

`PostgresServer(host=..., port=...)` runs `initdb` into a new directory under /tmp and starts
`postgres` on a unix socket in that directory plus TCP on `host:port` (127.0.0.1 by default; a
test whose nodes run in the private network namespace passes the bridge address). PostgreSQL
refuses to run as root, so as root both run as the `postgres` user (`setpriv`), which owns the
directory; as an ordinary user they run as that user. Durability is off (fsync,
synchronous_commit, full_page_writes): a crash loses a throwaway cluster, nothing else.

Every test gets its own database: `create_database()` copies the prepared template database
(`CREATE DATABASE ... TEMPLATE`, a file copy, far faster than building a schema), and
`drop_database()` removes it with whatever connections are still open on it.

The fixtures (`postgres_server`, session-scoped and started on first use; `postgres_url`, one
fresh database per test, its server log kept in test-artifacts/<test>/ when the test failed)
are in tests/harness/fixtures.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.harness.programs import require_program
from tests.harness.server import ServerStartError, free_port, tail

SUPERUSER = "postgres"
TEMPLATE_DB = "consult_template"
# Settings for speed and for a small machine shared by several test runs.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %d '",
}


class PostgresServer:
    """One PostgreSQL cluster in its own temporary directory; `start()`, `stop()`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 60.0):
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.startup_timeout = startup_timeout
        self.directory: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._owner = _run_as()

    # -- where --------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory

    @property
    def log_path(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL over TCP (what a Consult node in the namespace would be given)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def socket_url(self, dbname: str = "postgres") -> str:
        """The same database over the unix socket."""
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return tail(self.log_path) if self.directory else "<not started>"

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        if self.running:
            raise RuntimeError("PostgreSQL is already running")
        initdb = require_program("initdb")
        postgres = require_program("postgres")
        # Not pytest's tmp_path: /tmp/pytest-of-root is root's alone, and the server is not root.
        self.directory = Path(tempfile.mkdtemp(prefix="consult-pg-"))
        if self._owner is not None:
            os.chown(self.directory, self._owner.pw_uid, self._owner.pw_gid)
        self._run(
            [
                initdb,
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            log=self.directory / "initdb.log",
        )
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# tests/harness/postgres.py\n")
            conf.write(f"listen_addresses = '{self.host}'\nport = {self.port}\n")
            conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
            for name, value in SERVER_SETTINGS.items():
                conf.write(f"{name} = {value}\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self._as_owner(), postgres, "-D", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_env(),
                cwd=self.directory,
                start_new_session=True,
            )
        try:
            self._wait_ready()
            with self.connect() as conn:
                conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        """Fast shutdown (SIGINT: disconnect everyone, no checkpoint wait), SIGKILL after 10 s;
        the directory goes too. Returns the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal(signal.SIGINT)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait()
            self._signal(signal.SIGKILL)  # any backend left in the group
            code = self.proc.returncode
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        return code

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------

    def connect(self, dbname: str = "postgres"):
        """An autocommit psycopg connection as the superuser, over the unix socket."""
        import psycopg

        return psycopg.connect(self.socket_url(dbname), autocommit=True, connect_timeout=10)

    def create_database(self, name: str | None = None, *, template: str = TEMPLATE_DB) -> str:
        """A fresh database copied from `template`; its name."""
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def databases(self) -> set[str]:
        with self.connect() as conn:
            rows = conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate").fetchall()
        return {row[0] for row in rows}

    # -- inside -------------------------------------------------------------------------------

    def _as_owner(self) -> list[str]:
        if self._owner is None:
            return []
        return [
            require_program("setpriv"),
            f"--reuid={self._owner.pw_uid}",
            f"--regid={self._owner.pw_gid}",
            "--init-groups",
        ]

    def _run(self, argv: list[str], *, log: Path) -> None:
        done = subprocess.run(
            [*self._as_owner(), *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_env(),
            cwd=self.directory,
            timeout=self.startup_timeout,
        )
        log.write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            raise ServerStartError(f"{argv[0]} failed with status {done.returncode}:\n{tail(log)}")

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"postgres exited with status {code} while starting:\n{self.logs()}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                last = str(e).strip()
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"postgres did not accept connections on {self.host}:{self.port} within "
                    f"{self.startup_timeout:.0f} s ({last}):\n{self.logs()}"
                )
            time.sleep(0.1)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def _run_as() -> pwd.struct_passwd | None:
    """The account the server runs as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise ServerStartError(
            "PostgreSQL refuses to run as root and there is no `postgres` user: "
            "`apt-get install postgresql` creates it"
        ) from None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", TZ="UTC")
    return env
