"""HAProxy in front of several nodes, configured with the very file the repository ships
(deploy/haproxy.cfg).

`render_config()` changes only what must differ in a test (the two `bind` lines, the
certificate path, the `server` lines of every backend, `maxconn` under a test's open-file
limit) and fails if any of those lines is no longer in the shipped file, so that it and the
tested configuration cannot drift apart. bench/cluster.py renders it the same way with a copy of
this function in bench/cluster_parts.py (benchmarks never import tests/): change both together.
`HAProxy` writes it into its own directory with a development certificate for its host and
runs `haproxy -db -f haproxy.cfg` (foreground, logs on stdout) in its own process group.

`StandInNode` is a tiny aiohttp server that stands in for a Consult node where only routing
matters: `/healthz` answers 200, every other path answers with the node's name and the path,
and `/ws/rooms/<id>` is a WebSocket that answers each message with the node's name (a plain
GET there is answered like any other path).
"""

from __future__ import annotations

import socket
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.harness.programs import require_program
from tests.harness.server import REPO_ROOT, ServerProcess, free_port

SHIPPED = REPO_ROOT / "deploy" / "haproxy.cfg"
SHIPPED_CERT = "/etc/consult/tls/haproxy.pem"
SHIPPED_SERVERS = ("    server node1 10.0.0.11:8443 check\n", "    server node2 10.0.0.12:8443 check\n")
BACKENDS = 2  # backends in the shipped file, each with the SHIPPED_SERVERS lines

# Certificate errors are expected (a self-signed development certificate): only the answer counts.
INSECURE = ssl.create_default_context()
INSECURE.check_hostname = False
INSECURE.verify_mode = ssl.CERT_NONE
_opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=INSECURE)
)


def _replace(text: str, old: str, new: str, count: int = 1) -> str:
    found = text.count(old)
    if found != count:
        raise AssertionError(f"deploy/haproxy.cfg has {old!r} {found} times, expected {count}")
    return text.replace(old, new)


def render_config(
    *,
    host: str,
    port: int,
    redirect_port: int,
    pem: Path,
    nodes: Sequence[tuple[str, int]],
    path: Path = SHIPPED,
) -> str:
    """The shipped configuration with this test's addresses; `nodes` are (host, port) pairs,
    named node1, node2, ... as in the shipped file."""
    text = path.read_text(encoding="utf-8")
    # Debian's unit raises the open-file limit HAProxy needs for 20000; a test has a low one.
    text = _replace(text, "    maxconn 20000\n", "    maxconn 2000\n")
    text = _replace(text, "    bind :80\n", f"    bind {host}:{redirect_port}\n")
    text = _replace(text, "    bind :443 ssl crt ", f"    bind {host}:{port} ssl crt ")
    text = _replace(text, SHIPPED_CERT, str(pem))
    servers = "".join(f"    server node{i} {h}:{p} check\n" for i, (h, p) in enumerate(nodes, start=1))
    return _replace(text, "".join(SHIPPED_SERVERS), servers, count=BACKENDS)


def fetch(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET, any status; certificate not checked."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an HTTP URL: {url}")
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (checked above)
    try:
        with _opener.open(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


class HAProxy(ServerProcess):
    """HAProxy with deploy/haproxy.cfg on https://HOST:PORT in front of `nodes` ((host, port) pairs)."""

    def __init__(
        self,
        directory: Path,
        nodes: Sequence[tuple[str, int]],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        name: str = "haproxy",
    ) -> None:
        from consult.ops.certs import generate

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.redirect_port = free_port(host)
        self.nodes = list(nodes)
        cert, key, _ = generate(self.directory / "tls", [host])
        self.pem = self.directory / "haproxy.pem"
        self.pem.write_bytes(cert.read_bytes() + key.read_bytes())
        self.pem.chmod(0o600)
        self.conf_path = self.directory / "haproxy.cfg"
        self.conf_path.write_text(
            render_config(
                host=host, port=self.port, redirect_port=self.redirect_port, pem=self.pem, nodes=self.nodes
            )
        )
        argv = [require_program("haproxy"), "-db", "-f", str(self.conf_path)]
        super().__init__(argv, health_url=f"{self.origin}/", log_dir=self.directory, name=name)

    @property
    def origin(self) -> str:
        return f"https://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.origin + (path if path.startswith("/") else "/" + path)

    def check(self) -> None:
        """`haproxy -c`: the rendered file is valid (raises with HAProxy's words if not)."""
        import subprocess

        done = subprocess.run([self.argv[0], "-c", "-f", str(self.conf_path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise AssertionError(f"haproxy -c failed:\n{done.stdout}{done.stderr}")

    def _probe(self) -> int | str:
        """Ready once the TLS front answers a handshake (whether the nodes are up or not)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as raw:
                with INSECURE.wrap_socket(raw, server_hostname=self.host):
                    return self.expected_status
        except OSError as e:
            return repr(e)


# The stand-in node: argv[1] name, argv[2] host, argv[3] port.
_STANDIN = """
import sys
from aiohttp import web

name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def healthz(request):
    return web.Response(text="ok")

async def room(request):
    ws = web.WebSocketResponse()
    if not ws.can_prepare(request).ok:
        return await anything(request)
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(name + " " + request.path + " " + msg.data)
    return ws

async def anything(request):
    return web.json_response({"node": name, "path": request.path,
                              "forwarded_for": request.headers.get("X-Forwarded-For"),
                              "forwarded_proto": request.headers.get("X-Forwarded-Proto")})

app = web.Application()
app.router.add_get("/healthz", healthz)
app.router.add_get("/ws/rooms/{room}", room)
app.router.add_route("*", "/{tail:.*}", anything)
web.run_app(app, host=host, port=port, print=None, handle_signals=True)
"""


class StandInNode(ServerProcess):
    """A stand-in for a Consult node (routing tests): http://HOST:PORT, named `name`."""

    def __init__(
        self, directory: Path, name: str, *, host: str = "127.0.0.1", port: int | None = None
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        super().__init__(
            [sys.executable, "-c", _STANDIN, name, host, str(self.port)],
            health_url=f"http://{host}:{self.port}/healthz",
            log_dir=directory,
            name=name,
        )

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)
