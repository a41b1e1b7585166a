"""nginx in front of a Consult server, configured with the very site block docs/install.md shows.

`site_config()` takes the ```nginx block that follows the `<!-- nginx-site` marker in
docs/install.md; `render_site()` changes only what must differ in a test (addresses, ports,
certificate paths; the IPv6 listens go, the namespace has no IPv6) and fails if any of those
lines is no longer in the docs, so that the docs and the tested file cannot drift apart.
`NginxProxy` writes a minimal nginx.conf around it (pid, logs and temp paths in its own
directory) and runs `nginx -p DIR -c nginx.conf -g 'daemon off;'` in its own process group.
"""

from __future__ import annotations

import os
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.programs import require_program
from tests.harness.server import BRIDGE_ADDR, REPO_ROOT, ServerProcess, free_port

INSTALL_DOC = REPO_ROOT / "docs" / "install.md"
_BLOCK = re.compile(r"<!-- nginx-site\b.*?-->\s*```nginx\n(.*?)```", re.S)

DOC_CERT = "/etc/consult/tls/fullchain.pem"
DOC_KEY = "/etc/consult/tls/privkey.pem"
DOC_UPSTREAM = "http://127.0.0.1:8443"

# Certificate errors are expected (a self-signed development certificate): only the answer counts.
_insecure = ssl.create_default_context()
_insecure.check_hostname = False
_insecure.verify_mode = ssl.CERT_NONE
_opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_insecure)
)


def site_config(doc: Path = INSTALL_DOC) -> str:
    match = _BLOCK.search(doc.read_text(encoding="utf-8"))
    if match is None:
        raise AssertionError(f"{doc}: no ```nginx block after a <!-- nginx-site --> marker")
    return match.group(1)


def _replace(text: str, old: str, new: str, count: int = 1) -> str:
    found = text.count(old)
    if found != count:
        raise AssertionError(f"docs/install.md's nginx block has {old!r} {found} times, expected {count}")
    return text.replace(old, new)


def render_site(
    *, host: str, port: int, redirect_port: int, upstream: str, cert: Path, key: str | Path
) -> str:
    text = site_config()
    text = _replace(text, "    listen [::]:80;\n", "")
    text = _replace(text, "    listen [::]:443 ssl;\n", "")
    text = _replace(text, "listen 80;", f"listen {host}:{redirect_port};")
    text = _replace(text, "listen 443 ssl;", f"listen {host}:{port} ssl;")
    text = _replace(text, DOC_CERT, str(cert))
    text = _replace(text, DOC_KEY, str(key))
    return _replace(text, DOC_UPSTREAM, upstream, count=2)


def main_config(directory: Path, site: Path) -> str:
    """Everything a site needs from nginx.conf, inside `directory` (no /var, no /etc/nginx)."""
    temp = "\n".join(
        f"    {name}_temp_path {directory / ('tmp-' + name)};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, workers would switch to `nobody`, who cannot read pytest's private tmp_path.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\n"
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {directory / 'access.log'};\n"
        f"{temp}\n"
        f"    include {site};\n"
        "}\n"
    )


class NginxProxy(ServerProcess):
    """nginx on https://HOST:PORT in front of `upstream` (e.g. "http://127.0.0.1:PORT"), with the
    site block of docs/install.md and a development certificate for HOST."""

    def __init__(
        self,
        directory: Path,
        upstream: str,
        *,
        host: str = BRIDGE_ADDR,
        port: int | None = None,
        name: str = "nginx",
    ) -> None:
        from consult.ops.certs import generate

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.redirect_port = free_port(host)
        self.upstream = upstream
        self.cert, self.key, _ = generate(self.directory / "tls", [host])
        self.site_path = self.directory / "consult-site.conf"
        self.conf_path = self.directory / "nginx.conf"
        self.site_path.write_text(
            render_site(
                host=host,
                port=self.port,
                redirect_port=self.redirect_port,
                upstream=upstream,
                cert=self.cert,
                key=self.key,
            )
        )
        self.conf_path.write_text(main_config(self.directory, self.site_path))
        argv = [
            require_program("nginx"),
            "-p",
            str(self.directory),
            "-c",
            str(self.conf_path),
            "-e",
            str(self.directory / "error.log"),
            "-g",
            "daemon off;",
        ]
        super().__init__(argv, health_url=f"{self.origin}/healthz", log_dir=self.directory, name=name)
        self.error_log = self.directory / "error.log"
        self.access_log = self.directory / "access.log"

    @property
    def origin(self) -> str:
        return f"https://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.origin + (path if path.startswith("/") else "/" + path)

    def _probe(self) -> int | str:
        try:
            with _opener.open(self.health_url, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, urllib.error.URLError) as e:
            return repr(e)

    def logs(self) -> str:
        from tests.harness.server import tail

        return super().logs() + f"\n--- error.log ---\n{tail(self.error_log)}"
