"""Development TLS certificate: self-signed, for localhost and this machine's LAN addresses,
so a phone on the same Wi-Fi can open the pages (cameras need HTTPS)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def lan_addresses() -> list[str]:
    """Addresses of this machine's interfaces, read locally (no packet is sent)."""
    found: set[str] = set()
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[2] in ("inet", "inet6"):
                addr = parts[3].split("/")[0]
                ip = ipaddress.ip_address(addr)
                if not ip.is_link_local:
                    found.add(addr)
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    except OSError:
        pass
    found.update({"127.0.0.1", "::1"})
    return sorted(found)


def needs_new(cert_path: Path, hosts: list[str]) -> bool:
    if not cert_path.exists():
        return True
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return True
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=30):
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(
        san.get_values_for_type(x509.DNSName)
    )
    return not set(hosts) <= have


def generate(
    directory: Path, extra_hosts: list[str] | None = None, force: bool = False
) -> tuple[Path, Path, bool]:
    """Write dev-cert.pem and dev-key.pem; return (cert, key, created)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "dev-cert.pem", directory / "dev-key.pem"
    hosts = ["localhost", socket.gethostname(), *lan_addresses(), *(extra_hosts or [])]
    hosts = list(dict.fromkeys(h for h in hosts if h))
    if not force and key_path.exists() and not needs_new(cert_path, hosts):
        return cert_path, key_path, False
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Consult development certificate")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, True
