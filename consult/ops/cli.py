"""The ``consult`` command: serve | init | demo | user add | user passwd | certs | config | backup |
backup verify | restore | audit verify | verify | turn-config | recordings purge | secrets export |
secrets import | secrets fingerprint | secrets accept (each with --help)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import secrets
import ssl
import sys
from pathlib import Path
from typing import Any

from consult import __version__
from consult.core.engine import open_database
from consult.core.migrations import migrate_settings


class CLIError(Exception):
    """A mistake by the person at the keyboard: printed without a traceback."""


def _settings(args: argparse.Namespace, **overrides: Any):
    from consult.core.config import load_settings

    return load_settings(
        Path(args.config) if args.config else None,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        **overrides,
    )


def _where(settings: Any) -> str:
    """The database, as a person reads it: the SQLite file, or the PostgreSQL URL without password."""
    from consult.core.engine import database_path

    if settings.database_url:
        from consult.core.pg import redact

        return redact(settings.database_url)
    return str(database_path(settings))


def _database(settings: Any, hint: str = "") -> Any:
    """The database `settings` name; for SQLite, it must exist already."""
    from consult.core.engine import database_path

    if not settings.database_url and not database_path(settings).exists():
        raise CLIError(f"no database at {database_path(settings)}{hint}")
    return open_database(settings)


def cmd_init(args: argparse.Namespace) -> int:
    from consult.core.config import ensure_secrets

    settings = ensure_secrets(_settings(args))
    (settings.data_dir / "keys").mkdir(parents=True, exist_ok=True, mode=0o700)
    for sub in ("uploads", "recordings"):  # on the shared file system if there is one
        (settings.files_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    applied = migrate_settings(settings)
    print(f"Database {_where(settings)}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from consult.accounts.passwords import Passwords
    from consult.ops import demo

    settings = _settings(args)
    migrate_settings(settings)
    accounts = demo.seed(
        open_database(settings),
        Passwords(settings.argon2_time_cost, settings.argon2_memory_kib),
    )
    notice = (
        f"{settings.data_dir} is a demo now: 'consult serve' runs it in demo mode (a banner on"
        " every page, the payment simulator). Never serve patients from it."
    )
    if not accounts:
        print(
            "Demo data already present (passwords were printed when it was created;"
            " reset them with 'consult user passwd' or from the admin page)."
        )
        print(notice)
        return 0
    print("Demo accounts (passwords are shown only this once):")
    for a in accounts:
        print(f"  {a.role:8} {a.login:14} {a.password}   {a.name}")
    print(notice)
    return 0


def production_problems(settings: Any, demo_accounts: list[str]) -> list[str]:
    """Why these settings are unsafe for patients, each with its fix; empty when they are safe."""
    where = settings.data_dir / "consult.toml"
    problems = []
    if settings.payment_provider == "simulator":
        problems.append(
            "payment_provider is 'simulator': its Pay button confirms visits without taking any"
            ' money.\n    Fix: set payment_provider = "cashier" (patients pay at the hospital'
            f" counter) in {where} or CONSULT_PAYMENT_PROVIDER, or leave it unset."
        )
    if not settings.public_url:
        problems.append(
            "public_url is not set: call links, calendar files, QR codes and SMS would point at"
            " whatever address a request names (or at localhost).\n    Fix: set public_url ="
            f' "https://consult.your-hospital.example" (the address patients open) in {where}'
            " or CONSULT_PUBLIC_URL."
        )
    if demo_accounts:
        problems.append(
            f"demo accounts exist in {_where(settings)}: {', '.join(demo_accounts)}"
            " (made by 'consult demo'; their passwords were printed to a terminal).\n    Fix:"
            " serve patients from a data directory made by 'consult init' alone, never one that"
            " held demo data."
        )
    return problems


def _mode_of(settings: Any) -> tuple[bool, list[str]]:
    """(marked as a demo by `consult demo`, demo accounts present) for the data directory."""
    from consult.core import mode
    from consult.ops import demo

    migrate_settings(settings)  # what the app does first anyway; old databases gain the marks table
    return _database(settings).read_sync(lambda d: (mode.is_demo_sync(d), demo.demo_accounts_sync(d)))


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from consult.app import create_app
    from consult.core.logs import RedactingAccessLogger, setup_logging
    from consult.ops import edge

    overrides: dict[str, Any] = {"host": args.host, "port": args.port}
    if args.no_tls:
        overrides["tls"] = False
    if args.cert:
        overrides["tls_cert"] = args.cert
    if args.key:
        overrides["tls_key"] = args.key
    settings = _settings(args, **overrides)
    marked, demo_accounts = _mode_of(settings)
    check_cluster_secrets(settings)
    settings = dataclasses.replace(settings, demo=bool(args.demo or marked))
    if not settings.demo:
        problems = production_problems(settings, demo_accounts)
        if problems:
            raise CLIError(
                "refusing to start: this server is not safe for patients yet.\n"
                + "".join(f"  - {p}\n" for p in problems)
                + "To run a demonstration instead, use a data directory seeded by 'consult demo',"
                " or pass 'consult serve --demo' (every page then says it is a demo)."
                " The production checklist is in docs/install.md."
            )
    setup_logging(settings.log_json, settings.mask_addresses)
    ssl_context = None
    scheme = "http"
    if settings.tls:
        cert, key = Path(settings.tls_cert), Path(settings.tls_key)
        if not cert.exists() or not key.exists():
            raise CLIError(
                f"TLS certificate {cert} or key {key} not found: run 'consult certs' "
                "or pass --no-tls behind a TLS-terminating proxy"
            )
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(cert, key)
        scheme = "https"
    app = create_app(settings)
    if not settings.demo:  # demo mode starts at once for tries (and reloads edited templates anyway)
        from consult.core.templates import compile_templates

        compile_templates(app)
    from consult.core import keys
    from consult.ops.certs import lan_addresses

    hosts = ["localhost"] + [a for a in lan_addresses() if ":" not in a and a != "127.0.0.1"]
    if settings.host not in ("0.0.0.0", "::"):  # noqa: S104
        hosts = [settings.host]
    if settings.demo:
        why = "--demo" if args.demo else "data directory seeded by 'consult demo'"
        print(f"DEMO MODE ({why}): not for patients. Payments: {app[keys.SETTINGS].payment_provider}.")
    print("Consult is running. Open:", flush=True)
    for h in hosts:
        print(f"  {scheme}://{h}:{settings.port}/", flush=True)
    asyncio.run(edge.serve(app, settings, ssl_context=ssl_context, access_log_class=RedactingAccessLogger))
    return 0


def _fingerprints(settings: Any) -> tuple[str, str | None]:
    """(this node's secrets' fingerprint, the one recorded in the database: the cluster's)."""
    from consult.core import cluster
    from consult.ops import secrets_bundle

    mine = secrets_bundle.current(settings).fingerprint()
    migrate_settings(settings)
    return mine, open_database(settings).read_sync(cluster.recorded_fingerprint_sync)


def check_cluster_secrets(settings: Any) -> None:
    """At every start: record this node's secrets' fingerprint if none is recorded, refuse to
    start if the recorded one (the cluster's) is another."""
    from consult.core import cluster
    from consult.ops import secrets_bundle

    mine = secrets_bundle.current(settings).fingerprint()
    recorded = open_database(settings).write_sync(lambda d: cluster.record_fingerprint_sync(d, mine))
    if recorded != mine:
        raise CLIError(
            f"refusing to start: this node's secrets (fingerprint {mine}) are not the cluster's"
            f" (fingerprint {recorded}, recorded in the database by the first node that started).\n"
            "  Call links, sessions and prescriptions signed here would fail on every other node.\n"
            "  Fix: on a node that runs, 'consult secrets export FILE'; copy FILE here and run"
            " 'consult secrets import FILE' (with --force to replace these secrets), then start again.\n"
            "  If the cluster's secrets were changed on purpose on every node, record the new ones"
            " once with 'consult secrets accept'."
        )


def cmd_secrets_export(args: argparse.Namespace) -> int:
    from consult.ops import secrets_bundle

    bundle = secrets_bundle.current(_settings(args))
    path = Path(args.file)
    try:
        secrets_bundle.export(bundle, path, force=args.force)
    except FileExistsError:
        raise CLIError(f"{path} exists: choose another name, or --force to replace it") from None
    print(f"Wrote {path} (mode 0600): every secret and key a node needs. Fingerprint {bundle.fingerprint()}.")
    print(
        "Copy it to each node over a secure channel, run 'consult secrets import FILE' there, then delete it."
    )
    return 0


def cmd_secrets_import(args: argparse.Namespace) -> int:
    from consult.ops import secrets_bundle

    settings = _settings(args)
    try:
        bundle = secrets_bundle.read(Path(args.file))
    except FileNotFoundError:
        raise CLIError(f"{args.file}: no such file") from None
    except secrets_bundle.BundleError as exc:
        raise CLIError(f"{args.file}: {exc}") from None
    different = secrets_bundle.differences(bundle, settings.data_dir)
    if different and not args.force:
        raise CLIError(
            f"{settings.data_dir} already has other secrets ({', '.join(different)}); importing would"
            " end every session and call link made with them. Pass --force to replace them."
        )
    secrets_bundle.install(bundle, settings.data_dir)
    print(f"Imported the secrets into {settings.data_dir}. Fingerprint {bundle.fingerprint()}.")
    for name in secrets_bundle.overridden(bundle, settings):
        print(
            f"warning: {name} is also set in consult.toml or CONSULT_{name.upper()}, to another value,"
            " and that one wins: remove it there, or this node keeps refusing to start.",
            file=sys.stderr,
        )
    return 0


def cmd_secrets_fingerprint(args: argparse.Namespace) -> int:
    mine, recorded = _fingerprints(_settings(args))
    print(f"this node:   {mine}")
    print(f"the cluster: {recorded or '(none recorded yet: the first start records it)'}")
    return 0 if recorded in (None, mine) else 1


def cmd_secrets_accept(args: argparse.Namespace) -> int:
    from consult.core import cluster

    settings = _settings(args)
    mine, recorded = _fingerprints(settings)
    open_database(settings).write_sync(lambda d: cluster.replace_fingerprint_sync(d, mine))
    print(f"The cluster's secrets are now this node's (fingerprint {mine}; was {recorded or 'none'}).")
    print("Every other node must have them too ('consult secrets export' / 'import') or it will not start.")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    from consult.accounts import users as accounts
    from consult.accounts.passwords import Passwords, check_strength
    from consult.core.config import ensure_secrets
    from consult.core.errors import ConsultError

    settings = ensure_secrets(_settings(args))
    migrate_settings(settings)
    try:
        username = phone = None
        if args.role == "patient":
            if not args.phone:
                raise CLIError("a patient needs --phone")
            phone = accounts.normalize_phone(args.phone)
        else:
            if not args.username:
                raise CLIError(f"a {args.role} needs --username")
            username = accounts.normalize_username(args.username)
        password = args.password
        generated = False
        if password is None and sys.stdin.isatty():
            password = getpass.getpass("Password: ")
        if not password:
            password = secrets.token_urlsafe(9)
            generated = True
        problem = check_strength(password)
        if problem:
            raise CLIError(problem)
        pw_hash = Passwords(settings.argon2_time_cost, settings.argon2_memory_kib).hash(password)
        user_id = open_database(settings).write_sync(
            lambda db: accounts.create_user_sync(
                db,
                role=args.role,
                display_name=args.name,
                password_hash=pw_hash,
                username=username,
                phone=phone,
            )
        )
    except ConsultError as exc:
        raise CLIError(exc.message) from None
    print(
        f"Created {args.role} #{user_id} ({username or phone})"
        + (f" with password {password}" if generated else "")
    )
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    from consult.accounts import users as accounts
    from consult.accounts.passwords import Passwords, check_strength
    from consult.core.errors import ConsultError

    settings = _settings(args)
    database = _database(settings, hint="; run 'consult init' first")
    try:
        column, value = (
            ("phone", accounts.normalize_phone(args.login))
            if args.login.lstrip("+").isdigit()
            else ("username", accounts.normalize_username(args.login))
        )
    except ConsultError as exc:
        raise CLIError(exc.message) from None
    password = args.password or secrets.token_urlsafe(9)
    problem = check_strength(password)
    if problem:
        raise CLIError(problem)
    pw_hash = Passwords(settings.argon2_time_cost, settings.argon2_memory_kib).hash(password)

    def write(db) -> int:
        row = db.execute(f"SELECT id FROM users WHERE {column} = ?", [value]).fetchone()  # noqa: S608
        if row is None:
            raise CLIError(f"no account {args.login!r}")
        accounts.set_password_sync(db, row[0], pw_hash, action="account.reset_password", role="cli")
        return row[0]

    database.write_sync(write)
    print(
        f"New password for {args.login}: {password}"
        if not args.password
        else f"Password changed for {args.login}"
    )
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from consult.ops.certs import generate

    cert, key, created = generate(Path(args.dir), args.host or [], force=args.force)
    print(("Created" if created else "Kept existing") + f" development certificate {cert} (key {key})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from consult.core.config import describe, ensure_secrets, settings_markdown

    if args.markdown:
        sys.stdout.write(settings_markdown())
        return 0
    settings = _settings(args)
    if (settings.data_dir / "secrets.json").exists():
        settings = ensure_secrets(settings)
    values = settings.masked()
    if args.json:
        print(json.dumps(values, indent=2, ensure_ascii=False))
        return 0
    for name, _default, help_text in describe():
        print(f"{name} = {values[name]!r}\n    {help_text}  (env CONSULT_{name.upper()})")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    if args.path == "verify" and args.dir is not None:
        return _backup_verify(Path(args.dir))
    if args.dir is not None:
        raise CLIError(
            f"unexpected argument {args.dir!r}: use 'consult backup DIR' or 'consult backup verify DIR'"
        )
    from consult.ops.backup import backup

    settings = _settings(args)
    try:
        result = backup(settings.data_dir, Path(args.path), files_dir=settings.files_dir)
    except (FileNotFoundError, FileExistsError) as exc:
        raise CLIError(str(exc)) from None
    print(
        f"Backup written to {args.path}: database {result.database_bytes} bytes, {result.files} files"
        f" ({result.linked} hard links, {result.copied} copies, {result.bytes} bytes of reports and"
        f" recordings) in {result.seconds:.1f} s"
    )
    print(f"  database integrity: {result.integrity}; audit chain: {result.audit}")
    for note in result.notes:
        print(f"  note: {note}")
    for problem in result.problems:
        print(f"  PROBLEM: {problem}")
    if result.problems:
        print(f"Backup complete, with {len(result.problems)} problem(s) listed above.")
        return 1
    return 0


def _backup_verify(path: Path) -> int:
    from consult.ops.backup import verify

    result = verify(path)
    for note in result.notes:
        print(f"  note: {note}")
    for problem in result.problems:
        print(f"PROBLEM: {problem}")
    if result.problems:
        print(f"FAILED: {path}: {len(result.problems)} problem(s), {result.checked} files checked")
        return 1
    print(f"OK: {path}: {result.checked} files match, database intact")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from consult.ops.backup import RestoreRefused, restore

    settings = _settings(args)
    try:
        checked, moved = restore(
            Path(args.backup), settings.data_dir, force=args.force, ignore_problems=args.ignore_problems
        )
    except RestoreRefused as exc:
        for problem in exc.problems:
            print(f"PROBLEM: {problem}", file=sys.stderr)
        raise CLIError(
            f"not restoring {args.backup}: {len(exc.problems)} problem(s) listed above"
            " (--ignore-problems restores it anyway)"
        ) from None
    except FileExistsError as exc:
        raise CLIError(str(exc)) from None
    for problem in checked.problems:
        print(f"  restored despite: {problem}")
    if moved is not None:
        print(f"Moved the previous data directory aside to {moved}")
    print(f"Restored {args.backup} into {settings.data_dir} ({checked.checked} files verified)")
    return 0


def cmd_migrate_to_postgres(args: argparse.Namespace) -> int:
    from consult.core.engine import database_path
    from consult.core.pg import redact
    from consult.ops.to_postgres import CopyError, copy_sqlite_to_postgres

    settings = _settings(args)
    url = args.to or settings.database_url
    if not url.startswith(("postgresql://", "postgres://")):
        raise CLIError("give the PostgreSQL database with --to postgresql://... or the database_url setting")
    source = database_path(settings)
    print(f"Copying {source} into {redact(url)} ...")
    try:
        report = copy_sqlite_to_postgres(source, url, progress=lambda t, n: print(f"  {t}: {n} rows"))
    except CopyError as exc:
        raise CLIError(f"nothing copied: {exc}") from None
    rows = sum(report.tables.values())
    print(f"Done: {rows} rows in {len(report.tables)} tables; audit trail {report.audit}.")
    print("Set database_url on every node to serve from PostgreSQL.")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from consult.audit import chain as audit

    settings = _settings(args)
    ok, message = _database(settings).read_sync(audit.verify)
    print(("OK: " if ok else "FAILED: ") + message)
    return 0 if ok else 1


def cmd_recordings_purge(args: argparse.Namespace) -> int:
    import time

    from consult.calls import recordings

    settings = _settings(args)
    database = _database(settings)
    days = settings.recording_retention_days if args.older_than_days is None else args.older_than_days
    if days < 0:
        raise CLIError("--older-than-days must be 0 or more")
    if days == 0 and args.older_than_days is None:
        print("recording_retention_days is 0: recordings are kept forever; nothing deleted.")
        return 0
    found = recordings.purge(database, settings.files_dir, days, dry_run=args.dry_run, now=time.time())
    verb = "Would delete" if args.dry_run else "Deleted"
    for item in found:
        print(f"{verb} recording {item['id']} (visit {item['visit_id']}, {item['role']}): {item['path']}")
    total = sum(item["size"] or 0 for item in found)
    print(f"{verb} {len(found)} recordings older than {days:g} days, {total} bytes.")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from consult.clinical import signing

    settings = _settings(args)
    try:
        public = (
            signing.PublicKey.from_pem(Path(args.key).read_bytes())
            if args.key
            else signing.load_public(settings.data_dir)
        )
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read the hospital's public key: {exc}") from None
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    verdict = signing.verify(data, public)
    if not verdict.valid:
        print(f"INVALID: {verdict.reason}")
        return 1
    doc = verdict.document or {}
    print(f"VALID: {verdict.reason}")
    print(f"  number  {doc.get('number')}")
    print(f"  issued  {doc.get('issued_at')}")
    print(f"  doctor  {(doc.get('doctor') or {}).get('name')}")
    print(f"  patient {(doc.get('patient') or {}).get('name')}")
    if "diagnosis" in doc:  # format 2: the outpatient prescription
        print(f"  diagnosis {doc.get('diagnosis')}")
        print(f"  allergies {doc.get('allergies')}")
    for item in doc.get("items") or []:
        if isinstance(item, dict):
            print(f"  - {item.get('drug', '')} {item.get('strength', '')}".rstrip())
    print(f"  key     {verdict.key_id}")
    return 0


def cmd_turn_config(args: argparse.Namespace) -> int:
    from consult.calls import turn
    from consult.core.config import ensure_secrets

    settings = ensure_secrets(_settings(args))
    port = args.listening_port or turn.port_from_urls(settings.turn_urls) or turn.DEFAULT_PORT
    options = turn.TurnOptions(
        listening_port=port,
        tls_listening_port=args.tls_listening_port,
        min_port=args.min_port,
        max_port=args.max_port,
        external_ip=args.external_ip,
        listening_ips=tuple(args.listening_ip or ()),
        relay_ip=args.relay_ip,
        allow_peers=tuple(args.allow_peer or ()),
        cert=args.cert,
        pkey=args.pkey,
        server_name=args.server_name,
    )
    try:
        text = turn.render(settings, options)
    except turn.TurnConfigError as exc:
        raise CLIError(str(exc)) from None
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    output = Path(args.output) if args.output else settings.data_dir / "turnserver.conf"
    turn.write(output, text)
    print(f"Wrote {output} (mode 0600: it holds the TURN secret); realm {settings.turn_realm!r}.")
    print(
        f"Open {port}/udp and {port}/tcp"
        + (f", {options.tls_listening_port}/tcp" if options.cert else "")
        + f" and relay ports {options.min_port}-{options.max_port}/udp; then run:"
    )
    print(f"  turnserver -c {output}")
    if not settings.turn_urls:
        print("Set turn_urls (e.g. turn:turn.example.org:3478?transport=udp) so browsers use it.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="consult", description="Consult: self-hosted video follow-up clinic.")
    p.add_argument("--version", action="version", version=f"consult {__version__}")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CONSULT_DATA_DIR"),
        help="data directory (database, uploads, recordings, secrets); default ./data",
    )
    p.add_argument("--config", help="TOML settings file (default <data-dir>/consult.toml if present)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", help="run the web and signaling server")
    s.add_argument("--host", help="listen address (default 0.0.0.0)")
    s.add_argument("--port", type=int, help="listen port (default 8443)")
    s.add_argument("--cert", help="TLS certificate (PEM)")
    s.add_argument("--key", help="TLS private key (PEM)")
    s.add_argument("--no-tls", action="store_true", help="serve plain HTTP (behind a TLS proxy, or tests)")
    s.add_argument(
        "--demo",
        action="store_true",
        help="demo mode, not for patients: a banner on every page, the payment simulator, links"
        " from the browser's address (default: demo only if 'consult demo' seeded the data directory)",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("init", help="create the data directory and migrate the database")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("demo", help="add demo departments, doctors, schedules and accounts (idempotent)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("user", help="manage accounts")
    usub = s.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    a = usub.add_parser("add", help="create an account")
    a.add_argument("--role", choices=["patient", "doctor", "admin", "pharmacist"], required=True)
    a.add_argument("--username", help="staff sign-in name")
    a.add_argument("--phone", help="patient mobile number")
    a.add_argument("--name", required=True, help="full name as shown to others")
    a.add_argument("--password", help="password (prompted for, or generated when omitted)")
    a.set_defaults(func=cmd_user_add)
    pw = usub.add_parser("passwd", help="set a new password (signs the account out everywhere)")
    pw.add_argument("login", help="staff username or patient mobile number")
    pw.add_argument("--password", help="new password (generated and printed when omitted)")
    pw.set_defaults(func=cmd_user_passwd)

    s = sub.add_parser("certs", help="generate a self-signed development TLS certificate")
    s.add_argument("--dir", default="certs", help="directory for dev-cert.pem and dev-key.pem")
    s.add_argument("--host", action="append", help="extra host name or address (repeatable)")
    s.add_argument("--force", action="store_true", help="replace an existing valid certificate")
    s.set_defaults(func=cmd_certs)

    s = sub.add_parser("config", help="print the effective settings, secrets masked")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--markdown", action="store_true", help="print the settings reference (docs/settings.md)")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser(
        "backup",
        help="consistent online copy of the database and files; 'backup verify DIR' checks one",
        usage="consult backup DIR\n       consult backup verify DIR",
        description="Write a consistent backup into the new directory DIR while the server runs"
        " (exit 1: written, with problems listed), or check one with 'verify' (exit 1: problems).",
    )
    s.add_argument("path", metavar="DIR", help="new, empty directory to write the backup into; or 'verify'")
    s.add_argument("dir", nargs="?", metavar="BACKUP_DIR", help="with 'verify': the backup to check")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("restore", help="restore a verified backup into a new data directory")
    s.add_argument("backup", metavar="BACKUP_DIR", help="a directory written by 'consult backup'")
    s.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="the data directory to create (must be empty or new unless --force)",
    )
    s.add_argument("--force", action="store_true", help="move a non-empty data directory aside first")
    s.add_argument(
        "--ignore-problems", action="store_true", help="restore even if verification finds problems"
    )
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("secrets", help="the secrets and keys every node of a cluster shares")
    ssub = s.add_subparsers(dest="secrets_command", metavar="ACTION", required=True)
    e = ssub.add_parser("export", help="write every secret and key a node needs into FILE (mode 0600)")
    e.add_argument("file", metavar="FILE")
    e.add_argument("--force", action="store_true", help="replace FILE if it exists")
    e.set_defaults(func=cmd_secrets_export)
    i = ssub.add_parser(
        "import", help="install the secrets of FILE (from 'secrets export') into the data directory"
    )
    i.add_argument("file", metavar="FILE")
    i.add_argument("--force", action="store_true", help="replace secrets the data directory already has")
    i.set_defaults(func=cmd_secrets_import)
    f = ssub.add_parser(
        "fingerprint", help="this node's secrets' fingerprint and the cluster's (exit 1 if they differ)"
    )
    f.set_defaults(func=cmd_secrets_fingerprint)
    a = ssub.add_parser(
        "accept", help="record this node's secrets as the cluster's (after changing them everywhere)"
    )
    a.set_defaults(func=cmd_secrets_accept)

    s = sub.add_parser(
        "migrate-to-postgres",
        help="copy this data directory's SQLite database into an empty PostgreSQL database"
        " (database_url or --to), verified, in one transaction",
    )
    s.add_argument("--to", metavar="URL", help="postgresql://... (default: the database_url setting)")
    s.set_defaults(func=cmd_migrate_to_postgres)
    s = sub.add_parser("audit", help="audit trail tools")
    asub = s.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="check the hash chain of the audit trail")
    v.set_defaults(func=cmd_audit_verify)

    s = sub.add_parser("recordings", help="visit recordings")
    rsub = s.add_subparsers(dest="recordings_command", metavar="ACTION", required=True)
    rp = rsub.add_parser("purge", help="delete recordings older than the retention (each deletion audited)")
    rp.add_argument(
        "--older-than-days",
        type=float,
        help="delete recordings created more than this many days ago (default: recording_retention_days)",
    )
    rp.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    rp.set_defaults(func=cmd_recordings_purge)

    s = sub.add_parser("verify", help="check a downloaded prescription file's signature (exit 1 if invalid)")
    s.add_argument("file", help="the signed prescription file (RX-....json), or - for standard input")
    s.add_argument("--key", help="public key PEM to check against (default: this data directory's key)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("turn-config", help="write a coturn turnserver.conf matching TURN secret and realm")
    s.add_argument("--output", help="file to write (default <data-dir>/turnserver.conf; - for stdout)")
    s.add_argument("--external-ip", help="public address behind NAT: PUBLIC or PUBLIC/PRIVATE")
    s.add_argument("--listening-port", type=int, help="STUN/TURN port (default: from turn_urls, else 3478)")
    s.add_argument("--tls-listening-port", type=int, default=5349, help="TURN over TLS port (default 5349)")
    s.add_argument("--min-port", type=int, default=49152, help="relay port range start (default 49152)")
    s.add_argument("--max-port", type=int, default=49999, help="relay port range end (default 49999)")
    s.add_argument("--listening-ip", action="append", help="address to listen on (repeatable; default all)")
    s.add_argument("--relay-ip", help="address relays are opened on")
    s.add_argument(
        "--allow-peer", action="append", help="CIDR the relay may reach despite the private-range ban"
    )
    s.add_argument("--cert", help="TLS certificate (PEM) for turns: URLs")
    s.add_argument("--pkey", help="TLS private key (PEM)")
    s.add_argument("--server-name", help="server name coturn reports")
    s.set_defaults(func=cmd_turn_config)
    return p


def main(argv: list[str] | None = None) -> int:
    from consult.core.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CLIError, ConfigError) as exc:
        print(f"consult: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
