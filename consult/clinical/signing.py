"""The hospital's Ed25519 signing key and the signed-document format pharmacies check.

The private key lives in ``<data_dir>/keys/prescription-ed25519.pem`` (mode 0600), created on
first use; the public half is exported next to it as ``prescription-ed25519.pub.pem`` so it can
be handed to a pharmacy (and is served at ``/verify/key``).

A signed file is ``{"document": {...}, "signature": "<base64>", "key_id": "<fingerprint>"}``.
The signature covers the *canonical* JSON of ``document``: keys sorted, no insignificant
whitespace, UTF-8. Anyone can recompute those bytes from the file, so a verifier needs nothing
but this module's rules and the public key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from consult.core.i18n import _

KEY_DIR = "keys"
PRIVATE_NAME = "prescription-ed25519.pem"
PUBLIC_NAME = "prescription-ed25519.pub.pem"
SIGNATURE_BYTES = 64
MAX_FILE_BYTES = 256 * 1024  # a prescription file is a few KB; refuse anything absurd


class KeyMissing(FileNotFoundError):
    pass


def canonical(document: dict[str, Any]) -> bytes:
    """The exact bytes that are signed. Floats are refused: their text form is not canonical."""
    _check_types(document)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check_types(value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError("document keys must be strings")
            _check_types(v)
    elif isinstance(value, list):
        for v in value:
            _check_types(v)
    elif isinstance(value, float):
        raise TypeError("documents must not contain floats")
    elif value is not None and not isinstance(value, str | int | bool):
        raise TypeError(f"cannot sign a {type(value).__name__}")


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    """Fingerprint: SHA-256 of the raw 32-byte public key, first 128 bits in hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class PublicKey:
    key: Ed25519PublicKey
    key_id: str

    @classmethod
    def from_pem(cls, pem: bytes) -> PublicKey:
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return cls(key, key_id(key))

    @property
    def pem(self) -> bytes:
        return public_pem(self.key)


@dataclass(frozen=True)
class HospitalKey:
    private: Ed25519PrivateKey
    public: PublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, document: dict[str, Any]) -> dict[str, Any]:
        """Return the signed file's content for ``document``."""
        signature = self.private.sign(canonical(document))
        return {
            "document": document,
            "signature": base64.b64encode(signature).decode("ascii"),
            "key_id": self.key_id,
        }


def key_paths(data_dir: Path) -> tuple[Path, Path]:
    d = Path(data_dir) / KEY_DIR
    return d / PRIVATE_NAME, d / PUBLIC_NAME


def _load_private(path: Path) -> HospitalKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    pub = key.public_key()
    return HospitalKey(key, PublicKey(pub, key_id(pub)))


def _write_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Write ``path`` atomically unless it exists; False when another process won the race."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed or the file system widened it
        try:
            os.link(tmp, path)  # atomic, and refuses to replace: never two keys for one hospital
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create(data_dir: Path) -> HospitalKey:
    """The hospital key, generated on first use. Blocking file I/O: call it off the event loop."""
    private_path, public_path = key_paths(data_dir)
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not private_path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_exclusive(private_path, pem, 0o600)
    hospital = _load_private(private_path)
    _export_public(public_path, hospital.public)
    return hospital


def _export_public(path: Path, public: PublicKey) -> None:
    if path.exists():
        try:
            if PublicKey.from_pem(path.read_bytes()).key_id == public.key_id:
                return
        except ValueError:
            pass
        path.unlink()  # stale or damaged: the private key is the source of truth
    _write_exclusive(path, public.pem, 0o644)


def load_public(data_dir: Path) -> PublicKey:
    """The public key for verification only; never creates a key."""
    private_path, public_path = key_paths(data_dir)
    if public_path.exists():
        return PublicKey.from_pem(public_path.read_bytes())
    if private_path.exists():
        return _load_private(private_path).public
    raise KeyMissing(f"no prescription signing key in {private_path.parent}")


# -- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str
    code: str
    document: dict[str, Any] | None = None
    key_id: str | None = None


def _invalid(code: str, reason: str, **kw: Any) -> Verdict:
    return Verdict(False, reason, code, **kw)


def parse(data: bytes | str) -> dict[str, Any] | Verdict:
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            return _invalid("too_large", _("the file is too large to be a prescription"))
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return _invalid("not_json", _("the file is not UTF-8 text"))
    if len(data) > MAX_FILE_BYTES:
        return _invalid("too_large", _("the file is too large to be a prescription"))
    try:
        parsed = json.loads(data)
    except ValueError:
        return _invalid("not_json", _("the file is not valid JSON"))
    if not isinstance(parsed, dict):
        return _invalid("bad_format", _("the file is not a signed prescription (expected a JSON object)"))
    return parsed


def verify(data: bytes | str | dict[str, Any], public: PublicKey) -> Verdict:
    """Check a signed file. The reason is in the current language: the reader's on the verify
    page (this runs in the request's context), English in the CLI and logs (no request)."""
    parsed = data if isinstance(data, dict) else parse(data)
    if isinstance(parsed, Verdict):
        return parsed
    document, signature, kid = parsed.get("document"), parsed.get("signature"), parsed.get("key_id")
    if not isinstance(document, dict) or not isinstance(signature, str):
        return _invalid(
            "bad_format", _("the file is not a signed prescription (it needs 'document' and 'signature')")
        )
    try:
        sig = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return _invalid(
            "bad_signature", _("the signature is not valid base64"), document=document, key_id=kid
        )
    if len(sig) != SIGNATURE_BYTES:
        return _invalid(
            "bad_signature", _("the signature has the wrong length (damaged)"), document=document, key_id=kid
        )
    if kid is not None and kid != public.key_id:
        return _invalid(
            "other_key",
            _("the file was signed with another key (%(kid)s), not this hospital's key (%(ours)s)")
            % {"kid": kid, "ours": public.key_id},
            document=document,
            key_id=kid if isinstance(kid, str) else None,
        )
    try:
        message = canonical(document)
    except TypeError as exc:
        return _invalid(
            "bad_format", _("the document cannot be checked: %(error)s") % {"error": exc}, document=document
        )
    try:
        public.key.verify(sig, message)
    except InvalidSignature:
        return _invalid(
            "mismatch",
            _(
                "the signature does not match: the document was changed after signing,"
                " or it was not signed by this hospital"
            ),
            document=document,
            key_id=public.key_id,
        )
    return Verdict(
        True, _("signature valid: issued by this hospital and unchanged"), "valid", document, public.key_id
    )


class KeyHolder:
    """The hospital key, loaded (or generated) off the event loop on first use, then kept."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._key: HospitalKey | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> HospitalKey:
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    self._key = await asyncio.to_thread(load_or_create, self.data_dir)
        return self._key


SIGNING_KEY = web.AppKey("prescription_signing_key", KeyHolder)
