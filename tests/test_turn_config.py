"""``consult turn-config``: a coturn file sharing the server's secret and realm, private to root."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from consult.calls import turn
from consult.core.config import ensure_secrets, load_settings

ROOT = Path(__file__).resolve().parent.parent


def run_cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONSULT_")}
    return subprocess.run(
        [sys.executable, "-m", "consult", "--data-dir", str(data_dir), "turn-config", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=60,
    )


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_file_matches_the_servers_secret_and_realm_and_is_private(data_dir, tmp_path):
    out = tmp_path / "etc" / "turnserver.conf"
    env = {"CONSULT_TURN_REALM": "turn.hospital.example"}
    result = run_cli(
        data_dir,
        "--output",
        str(out),
        "--external-ip",
        "203.0.113.7/10.1.2.3",
        "--allow-peer",
        "10.20.0.0/16",
        "--min-port",
        "50000",
        "--max-port",
        "50100",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600

    # The same secret the web server will sign TURN credentials with (secrets.json).
    settings = ensure_secrets(load_settings(env=env, data_dir=data_dir))
    lines = directives(out.read_text())
    assert f"static-auth-secret={settings.turn_secret}" in lines
    assert "realm=turn.hospital.example" in lines
    for needed in (
        "use-auth-secret",
        "fingerprint",
        "no-cli",
        "no-multicast-peers",
        "listening-port=3478",
        "min-port=50000",
        "max-port=50100",
        "external-ip=203.0.113.7/10.1.2.3",
        "denied-peer-ip=10.0.0.0-10.255.255.255",
        "denied-peer-ip=192.168.0.0-192.168.255.255",
        "denied-peer-ip=127.0.0.0-127.255.255.255",
        "allowed-peer-ip=10.20.0.0-10.20.255.255",
        "no-tls",
    ):
        assert needed in lines, needed
    assert not any(line.startswith("cert=") for line in lines)
    assert settings.turn_secret not in result.stdout  # never printed


def test_rewrite_tightens_permissions_and_port_follows_turn_urls(data_dir, tmp_path):
    out = tmp_path / "turnserver.conf"
    out.write_text("old")
    out.chmod(0o644)
    env = {"CONSULT_TURN_URLS": "stun:turn.example:3479,turn:turn.example:3479?transport=udp"}
    result = run_cli(data_dir, "--output", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert "listening-port=3479" in directives(out.read_text())
    assert not list(tmp_path.glob(".*.tmp"))


def test_default_output_is_in_the_data_dir_and_tls_lines_when_given(data_dir):
    result = run_cli(data_dir, "--cert", "/etc/ssl/turn.pem", "--pkey", "/etc/ssl/turn.key")
    assert result.returncode == 0, result.stderr
    path = data_dir / "turnserver.conf"
    lines = directives(path.read_text())
    assert {"cert=/etc/ssl/turn.pem", "pkey=/etc/ssl/turn.key", "tls-listening-port=5349"} <= set(lines)
    assert "no-tls" not in lines
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--external-ip", "not-an-ip"], "not an IP address"),
        (["--allow-peer", "10.0.0.0/33"], "not an address or CIDR"),
        (["--min-port", "60000", "--max-port", "50000"], "below its end"),
        (["--listening-port", "49200"], "outside the relay port range"),
        (["--cert", "/etc/ssl/turn.pem"], "both a certificate"),
        (["--cert", "/tmp/a b.pem", "--pkey", "/tmp/k.pem"], "paths with spaces"),
    ],
)
def test_bad_options_are_refused_without_writing(data_dir, args, message):
    result = run_cli(data_dir, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (data_dir / "turnserver.conf").exists()


def test_render_refuses_a_secret_that_would_break_the_file(settings):
    settings = dataclasses.replace(ensure_secrets(settings), turn_secret="abc\nno-auth")
    with pytest.raises(turn.TurnConfigError):
        turn.render(settings, turn.TurnOptions())


def test_stdout_output(data_dir):
    result = run_cli(data_dir, "--output", "-")
    assert result.returncode == 0
    assert "use-auth-secret" in result.stdout


def test_every_option_is_documented_for_the_admin():
    import argparse

    from consult.ops.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = (ROOT / "docs" / "install.md").read_text()
    options = [o for a in commands.choices["turn-config"]._actions for o in a.option_strings if o != "--help"]
    assert options
    for option in options:
        if option.startswith("--"):
            assert f"`{option}" in text, option
