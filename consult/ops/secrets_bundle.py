"""Every secret and key a node needs, in one file: `consult secrets export` and `import`.

A cluster's nodes must share them: the session key signs CSRF tokens and call links, the TURN
secret is coturn's, the payment secret the gateway's, and the Ed25519 key signs prescriptions
that pharmacies check against one published public key. Generated per node they would break
every link, session and prescription that crosses nodes, so one node makes them and every
other node imports them (docs/install.md, "Several nodes").

The file is JSON, mode 0600: ``{"format": "consult-secrets", "version": 1, "fingerprint": ...,
"secrets": {name: value}, "keys": {"prescription-ed25519.pem": PEM}}``. Only the private key
travels; its public half is derived again on import.

`fingerprint()` names a set of secrets without revealing them: SHA-256 over the SHA-256 of
their canonical JSON (and the signing key's id). `consult serve` records it in the database at
the first start and refuses to start when its own differs (`consult/core/cluster.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consult.clinical import signing
from consult.core.config import SECRET_NAMES, Settings, ensure_secrets
from consult.core.files import write_atomic

FORMAT = "consult-secrets"
VERSION = 1
SECRETS_FILE = "secrets.json"
MAX_BUNDLE_BYTES = 64 * 1024


class BundleError(ValueError):
    """The file is not a secrets bundle this version can import (the message says why)."""


@dataclass(frozen=True)
class Bundle:
    secrets: dict[str, str]
    signing_key: str  # PEM (PKCS8) of the prescription signing key

    @property
    def signing_key_id(self) -> str:
        key = serialization.load_pem_private_key(self.signing_key.encode("ascii"), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise BundleError("the signing key is not an Ed25519 private key")
        return signing.key_id(key.public_key())

    def fingerprint(self) -> str:
        material = json.dumps(
            {"secrets": self.secrets, "signing_key": self.signing_key_id},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("utf-8")
        inner = hashlib.sha256(material).digest()
        return hashlib.sha256(b"consult-secrets-fingerprint-1:" + inner).hexdigest()[:32]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "fingerprint": self.fingerprint(),
                "secrets": self.secrets,
                "keys": {signing.PRIVATE_NAME: self.signing_key},
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Bundle:
        try:
            data = json.loads(text)
        except ValueError:
            raise BundleError("not a secrets file (not JSON)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError("not a secrets file made by 'consult secrets export'")
        if data.get("version") != VERSION:
            raise BundleError(
                f"secrets file version {data.get('version')!r}; this Consult reads version {VERSION}"
            )
        values = data.get("secrets")
        if not isinstance(values, dict) or set(values) != set(SECRET_NAMES):
            raise BundleError(f"the secrets file must hold exactly {', '.join(SECRET_NAMES)}")
        if not all(isinstance(v, str) and len(v) >= 16 for v in values.values()):
            raise BundleError("every secret in the file must be text of at least 16 characters")
        keys = data.get("keys")
        if not isinstance(keys, dict) or not isinstance(keys.get(signing.PRIVATE_NAME), str):
            raise BundleError(f"the secrets file has no {signing.PRIVATE_NAME}")
        bundle = cls({n: values[n] for n in SECRET_NAMES}, keys[signing.PRIVATE_NAME])
        try:
            bundle.signing_key_id  # noqa: B018 (parses the key)
        except (ValueError, TypeError) as exc:
            raise BundleError(f"the signing key in the file is not usable: {exc}") from None
        if data.get("fingerprint") not in (None, bundle.fingerprint()):
            raise BundleError("the file's fingerprint does not match its contents (edited or damaged)")
        return bundle


def current(settings: Settings) -> Bundle:
    """This node's secrets as it would run with them: generated now if it has none yet (what
    its first start would do), the signing key too, so that the fingerprint never changes later."""
    settings = ensure_secrets(settings)
    signing.load_or_create(settings.data_dir)
    private_path, _ = signing.key_paths(settings.data_dir)
    return Bundle({n: getattr(settings, n) for n in SECRET_NAMES}, private_path.read_text("ascii"))


def stored(data_dir: Path) -> tuple[dict[str, str], str | None]:
    """What the data directory holds (secrets.json, the private key), without generating anything."""
    path = data_dir / SECRETS_FILE
    values = json.loads(path.read_text()) if path.exists() else {}
    private_path, _ = signing.key_paths(data_dir)
    return values, private_path.read_text("ascii") if private_path.exists() else None


def differences(bundle: Bundle, data_dir: Path) -> list[str]:
    """Names of what the data directory already holds with another value (none: safe to import)."""
    values, key = stored(data_dir)
    names = [n for n in SECRET_NAMES if values.get(n) and values[n] != bundle.secrets[n]]
    if key is not None:
        mine = Bundle(bundle.secrets, key)
        if mine.signing_key_id != bundle.signing_key_id:
            names.append(signing.PRIVATE_NAME)
    return names


def overridden(bundle: Bundle, settings: Settings) -> list[str]:
    """Secrets that consult.toml or CONSULT_* set to another value (they win over secrets.json)."""
    return [n for n in SECRET_NAMES if getattr(settings, n) and getattr(settings, n) != bundle.secrets[n]]


def export(bundle: Bundle, path: Path, *, force: bool = False) -> None:
    """Write the bundle to `path`, mode 0600, atomically; an existing file only with `force`."""
    write_atomic(path, bundle.to_json().encode("utf-8"), 0o600, replace=force)


def read(path: Path) -> Bundle:
    with open(path, "rb") as fh:
        data = fh.read(MAX_BUNDLE_BYTES + 1)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError("not a secrets file (far too large)")
    try:
        return Bundle.from_json(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BundleError("not a secrets file (not UTF-8 text)") from None


def install(bundle: Bundle, data_dir: Path) -> None:
    """Write the bundle into the data directory: secrets.json and the signing key, each
    replaced atomically (the public key is derived again from the private one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = signing.key_paths(data_dir)
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(private_path, bundle.signing_key.encode("ascii"), 0o600, replace=True)
    values, _ = stored(data_dir)
    values.update(bundle.secrets)
    write_atomic(data_dir / SECRETS_FILE, json.dumps(values).encode("utf-8"), 0o600, replace=True)
    public_path.unlink(missing_ok=True)  # written again from the new private key
    signing.load_or_create(data_dir)
