from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from consult.core.config import ConfigError, ensure_secrets, load_settings

ROOT = Path(__file__).resolve().parent.parent
FAST = {"CONSULT_ARGON2_TIME_COST": "1", "CONSULT_ARGON2_MEMORY_KIB": "1024"}


def consult(data_dir: Path, *args: str, env: dict | None = None, check: bool = True):
    full_env = {**os.environ, **FAST, **(env or {})}
    full_env.pop("CONSULT_DATA_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "consult", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"consult {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_settings_from_file_and_environment(tmp_path):
    cfg = tmp_path / "consult.toml"
    cfg.write_text('port = 9000\nhospital_name = "From File"\nturn_urls = ["turn:a:3478"]\n')
    s = load_settings(cfg, env={"CONSULT_PORT": "9100", "CONSULT_MASK_ADDRESSES": "yes"})
    assert s.port == 9100  # the environment wins over the file
    assert s.hospital_name == "From File"
    assert s.turn_urls == ("turn:a:3478",)
    assert s.mask_addresses is True
    s = load_settings(cfg, env={}, port=9200)
    assert s.port == 9200  # explicit overrides win over both


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("nonsense = 1\n", {}, "unknown setting 'nonsense'"),
        ("port = 'abc'\n", {}, "cannot use 'abc' as int"),
        ("", {"CONSULT_ICE_TRANSPORT_POLICY": "sometimes"}, "ice_transport_policy"),
        ("port = [\n", {}, "config file"),
    ],
)
def test_bad_settings_are_explained(tmp_path, content, env, message):
    cfg = tmp_path / "consult.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, env=env)


def test_secrets_generated_once_with_private_permissions(tmp_path):
    s1 = ensure_secrets(load_settings(env={}, data_dir=tmp_path))
    s2 = ensure_secrets(load_settings(env={}, data_dir=tmp_path))
    assert s1.session_key and s1.session_key == s2.session_key and s1.turn_secret != s1.session_key
    assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600


def test_config_command_masks_secrets(tmp_path):
    consult(tmp_path, "init")
    out = consult(tmp_path, "config", "--json").stdout
    values = json.loads(out)
    assert values["session_key"] == "********"
    secrets = json.loads((tmp_path / "secrets.json").read_text())
    assert secrets["session_key"] not in out


def test_bad_arguments_give_a_message_not_a_traceback(tmp_path):
    proc = consult(tmp_path, "user", "add", "--role", "doctor", "--name", "X", check=False)
    assert proc.returncode == 2
    assert "needs --username" in proc.stderr and "Traceback" not in proc.stderr
    proc = consult(tmp_path, "frobnicate", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = consult(tmp_path / "empty", "backup", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "consult init" in proc.stderr
    proc = consult(tmp_path, "serve", "--port", "notaport", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["serve", "init", "demo", "user", "certs", "config", "backup", "audit"])
def test_every_command_has_help(tmp_path, command):
    proc = consult(tmp_path, command, "--help")
    assert "usage: consult" in proc.stdout


def test_demo_is_idempotent_and_prints_passwords_once(tmp_path):
    consult(tmp_path, "init")
    first = consult(tmp_path, "demo").stdout
    assert "admin" in first and "13800000000" in first
    second = consult(tmp_path, "demo").stdout
    assert "already present" in second
    conn = sqlite3.connect(tmp_path / "consult.db")
    assert conn.execute("SELECT count(*) FROM users WHERE username = 'admin'").fetchone()[0] == 1


def test_certs_cover_localhost_and_are_kept(tmp_path):
    from cryptography import x509

    out = consult(tmp_path, "certs", "--dir", str(tmp_path / "certs")).stdout
    assert "Created" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "dev-cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert (tmp_path / "certs" / "dev-key.pem").stat().st_mode & 0o777 == 0o600
    assert "Kept existing" in consult(tmp_path, "certs", "--dir", str(tmp_path / "certs")).stdout


async def test_backup_restores_to_a_working_copy(tmp_path, aiohttp_client):
    from consult.app import create_app
    from tests.conftest import login

    data = tmp_path / "data"
    consult(data, "init")
    consult(
        data,
        "user",
        "add",
        "--role",
        "doctor",
        "--username",
        "dr.b",
        "--name",
        "B",
        "--password",
        "backup pass 1",
    )
    (data / "uploads" / "ab").mkdir(parents=True)
    (data / "uploads" / "ab" / "file1").write_bytes(b"%PDF-1.4 report")
    consult(data, "backup", str(tmp_path / "copy"))
    # A file no row names (an orphan, a temp file) is not part of the backup.
    assert not (tmp_path / "copy" / "uploads" / "ab" / "file1").exists()
    assert (tmp_path / "copy" / "secrets.json").read_bytes() == (data / "secrets.json").read_bytes()
    # A second backup into the same place is refused rather than mixed.
    assert consult(data, "backup", str(tmp_path / "copy"), check=False).returncode == 2

    restored = load_settings(
        env={},
        data_dir=tmp_path / "copy",
        tls=False,
        argon2_time_cost=1,
        argon2_memory_kib=1024,
        default_locale="en",
    )
    client = await aiohttp_client(create_app(restored))
    await login(client, "dr.b", "backup pass 1")
    assert (await client.get("/doctor")).status == 200


def test_audit_verify_command(tmp_path):
    consult(tmp_path, "init")
    consult(
        tmp_path,
        "user",
        "add",
        "--role",
        "admin",
        "--username",
        "admin1",
        "--name",
        "A",
        "--password",
        "audit pass 1",
    )
    assert "OK" in consult(tmp_path, "audit", "verify").stdout
    conn = sqlite3.connect(tmp_path / "consult.db")
    conn.execute("UPDATE audit_log SET action = 'tampered' WHERE id = 1")
    conn.commit()
    proc = consult(tmp_path, "audit", "verify", check=False)
    assert proc.returncode == 1 and "row 1" in proc.stdout


def test_every_setting_is_documented():
    from consult.core.config import settings_markdown

    documented = (ROOT / "docs" / "settings.md").read_text()
    assert documented == settings_markdown(), "run: consult config --markdown > docs/settings.md"


def test_every_command_is_in_the_readme():
    from consult.ops.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        assert name in readme, f"command {name!r} is not mentioned in README.md"
