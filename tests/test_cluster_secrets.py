"""One set of secrets for every node (`consult secrets export/import`), and the fingerprint in
the database that stops a node with other secrets from starting (consult/ops/secrets_bundle.py,
consult/core/cluster.py)."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from consult.clinical import signing
from consult.core import cluster
from consult.core.config import SECRET_NAMES
from consult.core.db import Database
from consult.ops import secrets_bundle
from consult.ops.cli import main
from tests.harness.server import ConsultServer, ServerStartError


def _node(tmp_path: Path, name: str) -> ConsultServer:
    node = ConsultServer(tmp_path / f"{name}-data", log_dir=tmp_path, host="127.0.0.1", name=name)
    node.init(demo=True)
    return node


def _run(node: ConsultServer, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return node.cli(*args)
    except ServerStartError as exc:
        return subprocess.CompletedProcess(args, 2, "", str(exc))


def _secrets(node: ConsultServer) -> dict[str, str]:
    return json.loads((node.data_dir / "secrets.json").read_text())


def test_export_then_import_gives_a_second_node_the_same_secrets_and_key(tmp_path: Path):
    a, b = _node(tmp_path, "node-a"), _node(tmp_path, "node-b")
    bundle_path = tmp_path / "cluster-secrets.json"
    out = _run(a, "secrets", "export", str(bundle_path))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(bundle_path.stat().st_mode) == 0o600
    text = bundle_path.read_text()
    for name in SECRET_NAMES:
        assert _secrets(a)[name] in text
    assert "PRIVATE KEY" in text
    fingerprint = json.loads(text)["fingerprint"]
    # The fingerprint names the secrets without showing any of them, nor their plain hash.
    assert all(_secrets(a)[n] not in fingerprint for n in SECRET_NAMES)

    # Exporting over an existing file needs --force.
    again = _run(a, "secrets", "export", str(bundle_path))
    assert again.returncode != 0 and "exists" in again.stderr

    # node-b made its own secrets at `init`: importing over them needs --force.
    refused = _run(b, "secrets", "import", str(bundle_path))
    assert refused.returncode != 0
    assert "already has other secrets" in refused.stderr and "--force" in refused.stderr
    assert _secrets(b) != _secrets(a)
    done = _run(b, "secrets", "import", "--force", str(bundle_path))
    assert done.returncode == 0, done.stderr
    assert fingerprint in done.stdout
    assert _secrets(b) == _secrets(a)
    assert stat.S_IMODE((b.data_dir / "secrets.json").stat().st_mode) == 0o600
    a_private, a_public = signing.key_paths(a.data_dir)
    b_private, b_public = signing.key_paths(b.data_dir)
    assert b_private.read_bytes() == a_private.read_bytes()
    assert stat.S_IMODE(b_private.stat().st_mode) == 0o600
    assert signing.load_public(b.data_dir).key_id == signing.load_public(a.data_dir).key_id
    assert b_public.read_bytes() == a_public.read_bytes()
    assert not list(b.data_dir.glob(".*.tmp")) and not list((b.data_dir / "keys").glob(".*.tmp"))

    # Importing the same secrets again changes nothing and needs no --force.
    assert _run(b, "secrets", "import", str(bundle_path)).returncode == 0
    # A fresh node (no data directory yet) takes them without --force.
    c = ConsultServer(tmp_path / "node-c-data", log_dir=tmp_path, host="127.0.0.1", name="node-c")
    assert _run(c, "secrets", "import", str(bundle_path)).returncode == 0
    assert _secrets(c) == _secrets(a)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(format="other"), "not a secrets file"),
        (lambda d: d["secrets"].pop("turn_secret"), "exactly"),
        (lambda d: d["secrets"].update(session_key="short"), "at least 16"),
        (
            lambda d: d["keys"].update({signing.PRIVATE_NAME: "-----BEGIN PRIVATE KEY-----\nAAAA\n"}),
            "not usable",
        ),
        (lambda d: d["secrets"].update(session_key="x" * 40), "fingerprint does not match"),
    ],
)
def test_a_damaged_or_foreign_file_is_refused_with_the_reason(tmp_path: Path, capsys, change, why):
    data_dir, path = tmp_path / "data", tmp_path / "bundle.json"
    assert main(["--data-dir", str(data_dir), "secrets", "export", str(path)]) == 0
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    before = (data_dir / "secrets.json").read_bytes()
    capsys.readouterr()
    assert main(["--data-dir", str(data_dir), "secrets", "import", "--force", str(path)]) == 2
    assert why in capsys.readouterr().err
    assert (data_dir / "secrets.json").read_bytes() == before


def test_a_node_with_other_secrets_refuses_to_start_until_it_imports_the_clusters(tmp_path: Path):
    node = _node(tmp_path, "node")
    other = _node(tmp_path, "other")
    clusters = tmp_path / "cluster.json"
    foreign = tmp_path / "foreign.json"
    assert _run(node, "secrets", "export", str(clusters)).returncode == 0
    assert _run(other, "secrets", "export", str(foreign)).returncode == 0

    # The first start records the cluster's fingerprint in the database.
    node.start()
    node.stop()
    expected = json.loads(clusters.read_text())["fingerprint"]
    db = Database(node.data_dir / "consult.db")
    assert db.read_sync(cluster.recorded_fingerprint_sync) == expected

    # This node's secrets are replaced by another node's own: it refuses to start, and says why.
    assert _run(node, "secrets", "import", "--force", str(foreign)).returncode == 0
    with pytest.raises(ServerStartError) as refused:
        node.start()
    message = node.stderr_path.read_text()
    assert "refusing to start" in message, refused.value
    assert "consult secrets import" in message and expected in message
    assert db.read_sync(cluster.recorded_fingerprint_sync) == expected  # the cluster's stays
    checked = _run(node, "secrets", "fingerprint")
    assert checked.returncode != 0

    # With the cluster's secrets back it starts.
    assert _run(node, "secrets", "import", "--force", str(clusters)).returncode == 0
    node.start()
    node.stop()
    assert _run(node, "secrets", "fingerprint").returncode == 0


def test_accept_records_secrets_changed_on_purpose(tmp_path: Path):
    node = _node(tmp_path, "node")
    node.start()
    node.stop()
    rotated = tmp_path / "rotated.json"
    other = _node(tmp_path, "other")
    assert _run(other, "secrets", "export", str(rotated)).returncode == 0
    assert _run(node, "secrets", "import", "--force", str(rotated)).returncode == 0
    assert _run(node, "secrets", "accept").returncode == 0
    db = Database(node.data_dir / "consult.db")
    assert db.read_sync(cluster.recorded_fingerprint_sync) == json.loads(rotated.read_text())["fingerprint"]
    node.start()
    node.stop()


def test_the_fingerprint_is_a_hash_of_the_hash_and_follows_every_secret(tmp_path: Path):
    key = signing.load_or_create(tmp_path)
    pem = signing.key_paths(tmp_path)[0].read_text()
    base = secrets_bundle.Bundle({n: f"{n}-value-0123456789" for n in SECRET_NAMES}, pem)
    seen = {base.fingerprint()}
    for name in SECRET_NAMES:
        changed = secrets_bundle.Bundle({**base.secrets, name: "another-value-0123456789"}, pem)
        seen.add(changed.fingerprint())
    assert len(seen) == 1 + len(SECRET_NAMES)
    assert base.signing_key_id == key.key_id
    assert base.fingerprint() == secrets_bundle.Bundle(dict(base.secrets), pem).fingerprint()
