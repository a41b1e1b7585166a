"""A coturn ``turnserver.conf`` that matches this server's TURN secret and realm.

Browsers get short-lived credentials computed from ``turn_secret`` (coturn's ``use-auth-secret``
scheme, see ``docs/install.md``), so coturn must share that secret and realm. The relay must
never become a door into the hospital network: every private and special-purpose range is
denied as a peer, and only the ranges the admin names with ``--allow-peer`` are let through.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from consult.core.config import Settings

DEFAULT_PORT = 3478
DEFAULT_TLS_PORT = 5349
DEFAULT_MIN_PORT = 49152
DEFAULT_MAX_PORT = 49999

# Peers a relay must never reach: RFC 1918, CGNAT, loopback, link-local, documentation,
# benchmarking, multicast/reserved, and their IPv6 counterparts (ULA, link-local, NAT64, 6to4...).
DENIED_PEER_RANGES = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)

SAFE_PATH_RE = re.compile(r"^[^\s\"'#;]+$")


class TurnConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TurnOptions:
    listening_port: int = DEFAULT_PORT
    tls_listening_port: int = DEFAULT_TLS_PORT
    min_port: int = DEFAULT_MIN_PORT
    max_port: int = DEFAULT_MAX_PORT
    external_ip: str | None = None  # "PUBLIC" or "PUBLIC/PRIVATE" behind 1:1 NAT
    listening_ips: tuple[str, ...] = ()
    relay_ip: str | None = None
    allow_peers: tuple[str, ...] = field(default_factory=tuple)
    cert: str | None = None
    pkey: str | None = None
    server_name: str | None = None


def _range(cidr: str) -> str:
    """coturn wants ``first-last`` (older releases do not read CIDR notation)."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.num_addresses == 1:
        return str(net.network_address)
    return f"{net.network_address}-{net.broadcast_address}"


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise TurnConfigError(f"{what}: {value!r} is not an IP address") from None


def _port(value: int, what: str) -> int:
    if not 1 <= int(value) <= 65535:
        raise TurnConfigError(f"{what} must be between 1 and 65535")
    return int(value)


def _path(value: str, what: str) -> str:
    if not SAFE_PATH_RE.match(value):
        raise TurnConfigError(
            f"{what}: paths with spaces, quotes, '#' or ';' cannot be written to coturn's file"
        )
    return value


def port_from_urls(urls: Sequence[str]) -> int | None:
    """The port in the first plain ``turn:`` URL the server hands to browsers, if any."""
    for url in urls:
        if not url.startswith("turn:"):
            continue
        host_port = url[5:].split("?", 1)[0]
        try:
            port = urlsplit("//" + host_port).port
        except ValueError:
            continue
        return port or DEFAULT_PORT
    return None


def validate(options: TurnOptions) -> TurnOptions:
    _port(options.listening_port, "listening port")
    _port(options.tls_listening_port, "TLS listening port")
    _port(options.min_port, "relay port range start")
    _port(options.max_port, "relay port range end")
    if options.min_port >= options.max_port:
        raise TurnConfigError("the relay port range start must be below its end")
    if options.min_port <= options.listening_port <= options.max_port:
        raise TurnConfigError("the listening port must lie outside the relay port range")
    if options.external_ip:
        parts = options.external_ip.split("/")
        if len(parts) > 2:
            raise TurnConfigError("external IP: use PUBLIC or PUBLIC/PRIVATE")
        for p in parts:
            _ip(p, "external IP")
    for ip in options.listening_ips:
        _ip(ip, "listening IP")
    if options.relay_ip:
        _ip(options.relay_ip, "relay IP")
    for cidr in options.allow_peers:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise TurnConfigError(f"allowed peer range {cidr!r} is not an address or CIDR range") from None
    if bool(options.cert) != bool(options.pkey):
        raise TurnConfigError("TLS needs both a certificate and its private key")
    if options.cert:
        _path(options.cert, "certificate")
    if options.pkey:
        _path(options.pkey, "private key")
    if options.server_name and not re.match(r"^[A-Za-z0-9.-]{1,253}$", options.server_name):
        raise TurnConfigError("server name: letters, digits, '.' and '-' only")
    return options


def render(settings: Settings, options: TurnOptions) -> str:
    """The file's text. ``settings`` must already have its secrets filled in (``ensure_secrets``)."""
    validate(options)
    if not settings.turn_secret:
        raise TurnConfigError("no TURN secret: run 'consult init' first")
    if not re.match(r"^[\x21-\x7e]+$", settings.turn_secret) or not re.match(
        r"^[\x21-\x7e]+$", settings.turn_realm
    ):
        raise TurnConfigError("the TURN secret and realm must be printable ASCII without spaces")
    tls = bool(options.cert)
    lines = [
        "# coturn configuration written by 'consult turn-config'. It holds the TURN secret: keep it 0600.",
        "# Regenerate it after changing turn_secret or turn_realm (see docs/install.md).",
        "",
        "# Ports: open listening-port on UDP and TCP, the TLS port on TCP (and UDP for DTLS),",
        "# and the whole relay range on UDP in the firewall.",
        f"listening-port={options.listening_port}",
    ]
    if tls:
        lines.append(f"tls-listening-port={options.tls_listening_port}")
    for ip in options.listening_ips:
        lines.append(f"listening-ip={ip}")
    if options.relay_ip:
        lines.append(f"relay-ip={options.relay_ip}")
    if options.external_ip:
        lines += [
            "# Behind NAT: the public address browsers reach (PUBLIC or PUBLIC/PRIVATE).",
            f"external-ip={options.external_ip}",
        ]
    lines += [
        f"min-port={options.min_port}",
        f"max-port={options.max_port}",
        "",
        "# Authentication: time-limited credentials computed by Consult from the shared secret.",
        "use-auth-secret",
        f"static-auth-secret={settings.turn_secret}",
        f"realm={settings.turn_realm}",
    ]
    if options.server_name:
        lines.append(f"server-name={options.server_name}")
    lines += [
        "fingerprint",
        "stale-nonce=600",
        "",
        "# Hardening: no telnet console, no multicast, WebRTC needs UDP relays only.",
        "no-cli",
        "no-multicast-peers",
        "no-tcp-relay",
        "no-software-attribute",
        "user-quota=12",
        "total-quota=1200",
    ]
    if tls:
        lines += [
            "",
            "# TLS (turns: URLs) for networks that only let HTTPS-like traffic out.",
            f"cert={options.cert}",
            f"pkey={options.pkey}",
            "no-tlsv1",
            "no-tlsv1_1",
        ]
    else:
        lines += ["", "# No certificate given: TLS and DTLS listeners are off.", "no-tls", "no-dtls"]
    lines += [
        "",
        "# Relays may only reach public addresses: a TURN server must not become a way into",
        "# the hospital network. Ranges named with --allow-peer (the hospital LAN) are let through.",
    ]
    lines += [f"denied-peer-ip={_range(c)}" for c in DENIED_PEER_RANGES]
    for cidr in options.allow_peers:
        lines.append(f"allowed-peer-ip={_range(cidr)}")
    lines.append("")
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a 0600 file: it contains the shared secret."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
