"""Settings: declared once, each with a default and a help text.

Sources, later ones winning: defaults, a TOML file (``--config`` or ``<data_dir>/consult.toml``),
``CONSULT_<NAME>`` environment variables, then explicit overrides (CLI flags, tests).
Secrets that are not given are generated once into ``<data_dir>/secrets.json`` (mode 0600).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SECRET_NAMES = ("session_key", "turn_secret", "payment_secret")
# Chosen by what a data directory is (`consult demo`) or by `serve --demo`, never by a file or
# the environment: a stray line in consult.toml must not turn a hospital's server into a demo.
MODE_ONLY = ("demo",)
PAYMENT_PROVIDERS = ("cashier", "simulator")


def setting(default: Any, help: str, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    data_dir: Path = setting(Path("data"), "Directory for the database, uploads, recordings, keys.")
    database_url: str = setting(
        "",
        "PostgreSQL for several nodes (postgresql://user:password@host/db); empty: the embedded"
        " SQLite database in data_dir (one node). `consult migrate-to-postgres` copies one into the other.",
        secret=True,
    )
    shared_dir: str = setting(
        "",
        "Directory for uploaded reports and recordings that every node of a cluster mounts (NFS):"
        " each node writes whole files under names no other node picks. Empty: the data directory.",
    )
    host: str = setting("0.0.0.0", "Address the HTTP server listens on.")  # noqa: S104
    port: int = setting(8443, "Port the HTTP server listens on.")
    tls: bool = setting(
        True, "Serve HTTPS (cameras need a secure context). Off only behind a proxy or in tests."
    )
    tls_cert: str = setting("certs/dev-cert.pem", "TLS certificate (PEM).")
    tls_key: str = setting("certs/dev-key.pem", "TLS private key (PEM).")
    public_url: str = setting(
        "",
        "Base URL of this server as patients reach it (https://consult.example-hospital.cn): every"
        " call link, .ics, QR code and SMS is built from it. Required by `consult serve` outside"
        " demo mode; in demo mode, if empty, links use the address the browser used.",
    )
    hospital_name: str = setting("Consult Hospital", "Hospital name shown on pages and documents.")
    pharmacist_review: bool = setting(
        False,
        "A signed prescription waits for a pharmacist's approval (staff role pharmacist, page"
        " /pharmacy) before the patient sees it; a pharmacist may return it to the doctor with a reason.",
    )
    timezone: str = setting("Asia/Shanghai", "Time zone in which times are shown to people.")
    default_locale: str = setting("zh_CN", "Language when the browser expresses no preference (zh_CN or en).")
    session_key: str = setting("", "Key that signs CSRF tokens and call links.", secret=True)
    db_optimize_hours: float = setting(
        6.0,
        "Refresh the database's query-planner statistics (PRAGMA optimize, bounded) at start-up and"
        " then every this many hours, so list and search pages keep their indexes as tables grow."
        " 0: only at start-up.",
    )
    session_idle_minutes: int = setting(60, "A session ends after this much inactivity.")
    session_absolute_hours: int = setting(12, "A session ends this long after sign-in, however active.")
    session_cache_seconds: float = setting(
        2.0,
        "How long a node may answer for a session from memory before reading it from the database"
        " again (every request reads its session). Signing out, a password change and deactivation"
        " on this node end the session here at once; on another node of a cluster (or by the CLI)"
        " they take effect within this many seconds. 0: read every request's session from the database.",
    )
    login_max_failures: int = setting(
        5,
        "Failed sign-ins on one account from one address (or one trusted device) before each"
        " further try there waits a growing delay: 1 s, 2 s, 4 s … up to login_max_delay_seconds.",
    )
    login_max_failures_account_total: int = setting(
        20,
        "Failed sign-ins on one account from all addresses together before every try on it from a"
        " device that never signed in to it waits a growing delay. Devices that did are exempt.",
    )
    login_max_failures_per_address: int = setting(
        100,
        "Failed sign-ins from one address (an IPv6 /64) before its tries on accounts that already"
        " have failures, or on unknown names, wait a growing delay. Accounts without failures are"
        " never held back by it, so one NAT or proxy cannot block everyone behind it.",
    )
    login_max_delay_seconds: int = setting(
        300, "Longest wait a sign-in throttle imposes; nobody is ever locked out for longer."
    )
    login_window_minutes: int = setting(
        15, "A sign-in throttle's counters are forgotten after this long without a failure."
    )
    register_max_per_address: int = setting(
        10,
        "Registrations one address may make at once; the allowance refills evenly over"
        " register_window_minutes (then 429 with Retry-After).",
    )
    register_window_minutes: int = setting(60, "Time over which the registration allowance refills.")
    phone_region: str = setting(
        "CN",
        "Mobile numbers new patients may register with: CN (mainland China, 11 digits starting 13"
        " to 19; a +86 or 0086 in front, spaces and dashes are accepted and dropped) or"
        " international (an optional + and 6 to 15 digits). Numbers already stored are not checked"
        " again: those accounts still sign in.",
    )
    sms_provider: str = setting(
        "outbox",
        "Where text messages (one-time codes, visit notices) go: outbox keeps them in the database,"
        " readable on the admin's outbox page. A gateway implements consult.core.outbox.SmsProvider.",
    )
    sms_code_minutes: int = setting(
        10,
        "A one-time code sent by SMS (confirming a new patient's number, resetting a patient's"
        " password) works for this many minutes.",
    )
    sms_code_attempts: int = setting(
        5, "Wrong entries of one code before it stops working (a new code must be asked for)."
    )
    sms_code_resend_seconds: int = setting(60, "Shortest time between two codes sent to one number.")
    sms_code_max_per_number: int = setting(
        5, "Codes sent to one number within sms_code_window_minutes; then it waits for the window."
    )
    sms_code_max_per_address: int = setting(
        20,
        "Codes one address (an IPv6 /64) may have sent at once; the allowance refills evenly over"
        " sms_code_window_minutes (then 429 with Retry-After).",
    )
    sms_code_window_minutes: int = setting(
        60, "Time over which the per-number and per-address code limits count."
    )
    sms_code_max_pending: int = setting(
        10000,
        "Numbers with a code outstanding at once (one stored row each, removed when it expires);"
        " beyond it new codes are refused until some expire, so a flood cannot grow the database.",
    )
    argon2_time_cost: int = setting(3, "Argon2 time cost for password hashes.")
    argon2_memory_kib: int = setting(65536, "Argon2 memory cost (KiB) for password hashes.")
    currency: str = setting("CNY", "Currency of visit fees (ISO 4217).")
    default_fee_minor: int = setting(5000, "Default visit fee in minor units (fen).")
    visit_minutes: float = setting(15.0, "Default length of a visit in minutes.")
    warning_minutes: float = setting(2.0, "Warn both parties this long before the visit ends.")
    visit_seconds_override: float = setting(
        0.0, "If above 0, every visit lasts this many seconds, whatever the doctor's length (tests)."
    )
    hold_minutes: float = setting(15.0, "How long an unpaid booking holds its slot.")
    cancel_free_hours: float = setting(
        24.0, "Patients may cancel or reschedule until this long before a visit; later only staff can."
    )
    booking_lead_minutes: float = setting(10.0, "Slots starting sooner than this are not offered.")
    reaper_interval_seconds: float = setting(
        30.0, "How often expired holds are released and due visit reminders queued (jobs send them)."
    )
    job_poll_seconds: float = setting(
        1.0, "How often the job worker looks for due jobs (it is also woken when one is queued)."
    )
    job_concurrency: int = setting(4, "Jobs the worker runs at once (refunds, messages).")
    job_timeout_seconds: float = setting(60.0, "A job attempt taking longer than this fails and is retried.")
    job_max_attempts: int = setting(8, "Attempts before a job is marked dead (shown in logs and /metrics).")
    job_retry_base_seconds: float = setting(
        10.0, "Wait before a failed job's first retry; doubled after each failure."
    )
    job_retry_max_seconds: float = setting(3600.0, "Longest wait between two attempts of a job.")
    job_retention_days: float = setting(14.0, "Finished jobs are deleted this many days after they finish.")
    payment_provider: str = setting(
        "",
        "How patients pay: cashier (at the hospital counter; staff mark the order paid on"
        " /admin/payments) or simulator (a stand-in gateway that takes no money: demo mode only)."
        " Empty: cashier, or simulator in demo mode.",
    )
    payment_secret: str = setting(
        "", "Key shared with the payment gateway for signed callbacks.", secret=True
    )
    upload_max_mb: float = setting(20.0, "Largest accepted test-report file (MB).")
    visit_upload_max_mb: float = setting(60.0, "Largest total of test reports per visit (MB).")
    files_sweep_interval_seconds: float = setting(
        300.0,
        "How often upload temp files no upload is using are removed and report files are checked"
        " against their rows (files without a row are quarantined); 0: at start-up only.",
    )
    turn_urls: tuple[str, ...] = setting((), "TURN server URLs given to browsers (self-hosted coturn).")
    stun_urls: tuple[str, ...] = setting((), "STUN server URLs given to browsers (self-hosted only).")
    turn_secret: str = setting("", "Shared secret with coturn (use-auth-secret).", secret=True)
    turn_realm: str = setting("consult", "TURN realm.")
    ice_transport_policy: str = setting("all", "all, or relay to force every call through TURN.")
    recording_policy: str = setting(
        "off",
        "Record visits: off, on_request (if both consent) or always (a visit is held only if both"
        " consent). Departments and doctors may override it.",
    )
    recording_workers: int = setting(
        0,
        "Worker processes that receive and write recording legs (each new leg goes to the one with"
        " the fewest); 0: one per CPU core. A worker that dies cuts its legs (kept as incomplete"
        " files) and is restarted.",
    )
    recording_retention_days: int = setting(
        3650, "`consult recordings purge` deletes recordings older than this many days (0: never)."
    )
    disk_min_free_mb: float = setting(
        200.0,
        "/healthz answers 503 when the disk of the data directory has less free space than this"
        " (MB); a full disk refuses every write.",
    )
    header_timeout_seconds: float = setting(
        15.0,
        "A client must send a request's complete headers within this many seconds of connecting"
        " (or of its previous response; idle keep-alive connections close then too). With TLS, the"
        " handshake too.",
    )
    max_connections_per_address: int = setting(
        100,
        "Open connections allowed from one client address (an IPv6 client: its /64); more are"
        " closed at once. 0: no limit. Connections from trusted_proxies are never counted.",
    )
    accept_error_log_interval_seconds: float = setting(
        60.0, "When the server runs out of file descriptors, log that at most once per this many seconds."
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "Addresses or CIDR ranges of reverse proxies in front of Consult (e.g. 127.0.0.1). Only"
        " from these are Forwarded and X-Forwarded-For/-Proto/-Host believed: the client is the"
        " right-most address in the chain that is not a trusted proxy. Empty: trust nobody.",
    )
    mask_addresses: bool = setting(False, "Store only the network part of client addresses in logs.")
    log_json: bool = setting(False, "Write structured JSON log lines.")
    metrics_allow: tuple[str, ...] = setting(
        (), "Addresses or CIDR ranges that may read /metrics without signing in (Prometheus)."
    )
    demo: bool = setting(
        False,
        "Demo mode: a banner on every page, the payment simulator, demo accounts allowed. Not a"
        " setting you write: a data directory seeded by `consult demo` is in demo mode, or"
        " `consult serve --demo` asks for it.",
    )

    def masked(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "********"
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    @property
    def files_dir(self) -> Path:
        """Where uploads and recordings live: `shared_dir`, or the data directory."""
        return Path(self.shared_dir) if self.shared_dir else self.data_dir


def describe() -> list[tuple[str, Any, str]]:
    return [(f.name, f.default, f.metadata["help"]) for f in dataclasses.fields(Settings)]


class ConfigError(ValueError):
    pass


def _coerce(name: str, raw: Any, target: Any) -> Any:
    kind = type(target)
    try:
        if isinstance(target, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if isinstance(target, Path):
            return Path(raw)
        if isinstance(target, tuple):
            if isinstance(raw, list | tuple):
                return tuple(str(x) for x in raw)
            return tuple(x.strip() for x in str(raw).split(",") if x.strip())
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: cannot use {raw!r} as {kind.__name__}") from None


def load_settings(
    config_file: Path | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    env = dict(os.environ if env is None else env)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}

    def apply(source: dict[str, Any], where: str) -> None:
        for key, raw in source.items():
            if key not in fields:
                raise ConfigError(f"unknown setting {key!r} in {where}")
            if key in MODE_ONLY and where != "the command line":
                raise ConfigError(
                    f"{key!r} cannot be set in {where}: demo mode comes from a data directory"
                    " made by 'consult demo', or from 'consult serve --demo'"
                )
            values[key] = _coerce(key, raw, fields[key].default)

    data_dir = Path(overrides.get("data_dir") or env.get("CONSULT_DATA_DIR") or "data")
    if config_file is None and env.get("CONSULT_CONFIG"):
        config_file = Path(env["CONSULT_CONFIG"])
    if config_file is None and (data_dir / "consult.toml").exists():
        config_file = data_dir / "consult.toml"
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                apply(tomllib.load(fh), str(config_file))
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
    apply(
        {k[8:].lower(): v for k, v in env.items() if k.startswith("CONSULT_") and k[8:].lower() in fields},
        "the environment",
    )
    apply({k: v for k, v in overrides.items() if v is not None}, "the command line")
    settings = Settings(**values)
    if settings.ice_transport_policy not in {"all", "relay"}:
        raise ConfigError("ice_transport_policy must be 'all' or 'relay'")
    if settings.recording_policy not in {"off", "on_request", "always"}:
        raise ConfigError("recording_policy must be 'off', 'on_request' or 'always'")
    public = urlsplit(settings.public_url)
    if settings.public_url and (public.scheme not in ("http", "https") or not public.netloc):
        raise ConfigError(
            "public_url must be an absolute address such as https://consult.example-hospital.cn"
        )
    if settings.payment_provider not in {"", *PAYMENT_PROVIDERS}:
        raise ConfigError("payment_provider must be 'cashier' or 'simulator' (demo mode only)")
    for value in settings.trusted_proxies:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies: {value!r} is not an IP address or network") from None
    if settings.phone_region not in {"CN", "international"}:
        raise ConfigError("phone_region must be 'CN' or 'international'")
    if settings.sms_provider not in {"outbox"}:
        raise ConfigError("sms_provider must be 'outbox'")
    for name in (
        "login_max_delay_seconds",
        "login_window_minutes",
        "register_max_per_address",
        "register_window_minutes",
        "sms_code_minutes",
        "sms_code_attempts",
        "sms_code_max_per_number",
        "sms_code_max_per_address",
        "sms_code_window_minutes",
        "sms_code_max_pending",
    ):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    return settings


def for_mode(settings: Settings) -> Settings:
    """The settings as the app runs them: the payment provider chosen for the mode.

    Empty ``payment_provider`` means cashier in production and the simulator in demo mode; the
    simulator outside demo mode is refused, since it confirms visits without taking money.
    """
    provider = settings.payment_provider or ("simulator" if settings.demo else "cashier")
    if provider == "simulator" and not settings.demo:
        raise ConfigError(
            "payment_provider 'simulator' confirms visits without taking money and runs only in"
            ' demo mode; set payment_provider = "cashier" (or leave it empty)'
        )
    return dataclasses.replace(settings, payment_provider=provider)


def ensure_secrets(settings: Settings) -> Settings:
    """Fill in missing secrets from <data_dir>/secrets.json, generating them on first run."""
    missing = [n for n in SECRET_NAMES if not getattr(settings, n)]
    if not missing:
        return settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "secrets.json"
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text())
    changed = False
    for name in SECRET_NAMES:
        if not stored.get(name):
            stored[name] = secrets.token_urlsafe(32)
            changed = True
    if changed:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(stored, fh)
        os.replace(tmp, path)
    return dataclasses.replace(settings, **{n: stored[n] for n in missing})


def settings_markdown() -> str:
    """The settings reference in docs/settings.md (a test keeps the two identical)."""
    lines = [
        "# Settings",
        "",
        "Generated by `consult config --markdown`; do not edit by hand. Each setting can be given in",
        "the TOML file (`<data-dir>/consult.toml` or `--config`) by its name, or in the environment",
        "as `CONSULT_<NAME>`. Secrets left empty are generated into `<data-dir>/secrets.json`.",
        "",
        "| setting | default | what it does |",
        "|---|---|---|",
    ]
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ", ".join(default) or "(none)"
        elif f.name in SECRET_NAMES:  # generated; other secret settings (database_url) are only masked
            default = "(generated)"
        elif default == "":
            default = "(empty)"
        lines.append(f"| `{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
