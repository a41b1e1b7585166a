"""Production and demo are different modes ("Safe to put on the internet").

`consult serve` refuses unsafe production settings (the real CLI, as a subprocess); a data dir
seeded by `consult demo`, or `serve --demo`, runs in demo mode with a banner on every page; the
payment simulator exists only there and serves only the order's own patient; links to patients
come from public_url, never from a request's Host in production.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from yarl import URL

from consult import booking
from consult.app import create_app
from consult.core import qr
from consult.core.config import ConfigError, for_mode, load_settings
from tests.conftest import csrf_of
from tests.harness.server import ConsultServer, free_port
from tests.test_booking import parse_ics
from tests.test_payments import payment_rows, start_payment, visit_row
from tests.test_reports import ADMIN, OTHER_PATIENT, PATIENT, build_world, sign_in

pytestmark = pytest.mark.locale("en")  # asserts English texts; Chinese ones are asked for by name

ROOT = Path(__file__).resolve().parent.parent
FAST = {"CONSULT_ARGON2_TIME_COST": "1", "CONSULT_ARGON2_MEMORY_KIB": "1024"}
PUBLIC = "https://consult.hospital.example"
BANNER = "Demo — not for patients"


def consult(data_dir: Path, *args: str, env: dict | None = None, timeout: float = 60):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONSULT_")}
    full_env.update({**FAST, **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "consult", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def serve(data_dir: Path, *extra: str, env: dict | None = None):
    """`consult serve` expected to refuse: it must exit at once, not listen."""
    port = str(free_port("127.0.0.1"))
    return consult(data_dir, "serve", "--host", "127.0.0.1", "--port", port, "--no-tls", *extra, env=env)


def refused(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "refusing to start" in proc.stderr or "cannot" in proc.stderr
    return proc.stderr


# -- serve refuses unsafe production settings -------------------------------------------------


def test_fresh_install_refuses_without_public_url(tmp_path):
    assert consult(tmp_path, "init").returncode == 0
    err = refused(serve(tmp_path))
    assert "public_url is not set" in err and "CONSULT_PUBLIC_URL" in err and "Fix:" in err
    # The default payment provider is the cashier: only the missing public_url is named.
    assert "simulator" not in err.split("To run a demonstration")[0]
    assert "docs/install.md" in err and "--demo" in err


def test_simulator_is_refused_in_production(tmp_path):
    consult(tmp_path, "init")
    err = refused(
        serve(tmp_path, env={"CONSULT_PUBLIC_URL": PUBLIC, "CONSULT_PAYMENT_PROVIDER": "simulator"})
    )
    assert "payment_provider is 'simulator'" in err and "without taking any money" in err
    assert 'payment_provider = "cashier"' in err
    assert "public_url" not in err.split("To run a demonstration")[0]


def test_demo_accounts_without_the_demo_mark_are_refused(tmp_path):
    """Demo data whose mark is gone (or predates it): its printed passwords must not go live."""
    consult(tmp_path, "init")
    assert consult(tmp_path, "demo").returncode == 0
    conn = sqlite3.connect(tmp_path / "consult.db")
    conn.execute("DELETE FROM instance_marks WHERE name = 'demo'")
    conn.commit()
    conn.close()
    err = refused(serve(tmp_path, env={"CONSULT_PUBLIC_URL": PUBLIC}))
    assert "demo accounts exist" in err
    assert all(login in err for login in ("admin", "dr.wang", "13800000000"))


def test_every_problem_is_listed_at_once(tmp_path):
    consult(tmp_path, "init")
    err = refused(serve(tmp_path, env={"CONSULT_PAYMENT_PROVIDER": "simulator"}))
    assert "payment_provider is 'simulator'" in err and "public_url is not set" in err


def test_demo_mode_cannot_come_from_a_file_or_the_environment(tmp_path):
    consult(tmp_path, "init")
    proc = serve(tmp_path, env={"CONSULT_DEMO": "1"})
    assert proc.returncode == 2 and "'demo' cannot be set in the environment" in proc.stderr
    (tmp_path / "consult.toml").write_text("demo = true\n")
    proc = serve(tmp_path)
    assert proc.returncode == 2 and "'demo' cannot be set in" in proc.stderr and "consult.toml" in proc.stderr


def test_consult_demo_marks_the_database_once_and_audits_it(tmp_path):
    consult(tmp_path, "init")
    first = consult(tmp_path, "demo").stdout
    assert "demo now" in first and "Never serve patients from it" in first
    consult(tmp_path, "demo")
    conn = sqlite3.connect(tmp_path / "consult.db")
    assert conn.execute("SELECT name FROM instance_marks").fetchall() == [("demo",)]
    assert conn.execute("SELECT count(*) FROM audit_log WHERE action = 'instance.demo'").fetchone()[0] == 1
    assert "OK" in consult(tmp_path, "audit", "verify").stdout


# -- servers that do start ----------------------------------------------------------------------


def fetch(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def local_server(tmp_path: Path, name: str, *, env: dict | None = None) -> ConsultServer:
    return ConsultServer(
        tmp_path / f"{name}-data",
        log_dir=tmp_path,
        host="127.0.0.1",
        port=free_port("127.0.0.1"),
        env={**FAST, "CONSULT_DEFAULT_LOCALE": "en", **(env or {})},
        name=name,
    )


NO_PUBLIC_URL = {"CONSULT_PUBLIC_URL": ""}  # the harness gives servers their origin otherwise


def test_a_data_dir_made_by_consult_demo_serves_in_demo_mode(tmp_path):
    server = local_server(tmp_path, "demo", env=NO_PUBLIC_URL)
    server.init(demo=True)  # init + demo, then plain `serve`: no flag, no public_url
    with server:
        status, page = fetch(server.url("/login"))
        assert status == 200 and BANNER in page and 'data-testid="demo-banner"' in page
    assert "DEMO MODE" in server.stdout_path.read_text()


def test_serve_demo_flag_runs_a_fresh_dir_in_demo_mode(tmp_path):
    server = local_server(tmp_path, "flag", env=NO_PUBLIC_URL)
    server.cli("init")
    server.argv.append("--demo")
    with server:
        status, page = fetch(server.url("/login"))
        assert status == 200 and BANNER in page


def test_a_production_server_starts_with_public_url_and_has_no_simulator(tmp_path):
    server = local_server(tmp_path, "prod", env={"CONSULT_PUBLIC_URL": PUBLIC})
    server.init()
    with server:
        status, page = fetch(server.url("/login"))
        assert status == 200 and BANNER not in page and "demo-banner" not in page
        assert fetch(server.url("/simulator/pay/C123"))[0] == 404
    assert "DEMO MODE" not in server.stdout_path.read_text()


# -- settings -----------------------------------------------------------------------------------


def test_payment_provider_follows_the_mode(tmp_path):
    production = load_settings(env={}, data_dir=tmp_path)
    assert production.payment_provider == "" and not production.demo
    assert for_mode(production).payment_provider == "cashier"
    assert for_mode(load_settings(env={}, data_dir=tmp_path, demo=True)).payment_provider == "simulator"
    chosen = load_settings(env={}, data_dir=tmp_path, demo=True, payment_provider="cashier")
    assert for_mode(chosen).payment_provider == "cashier"
    with pytest.raises(ConfigError, match="demo mode"):
        for_mode(load_settings(env={"CONSULT_PAYMENT_PROVIDER": "simulator"}, data_dir=tmp_path))
    with pytest.raises(ConfigError, match="demo mode"):
        create_app(load_settings(env={}, data_dir=tmp_path, payment_provider="simulator"))


@pytest.mark.parametrize("url", ["consult.hospital.example", "ftp://x", "https://"])
def test_public_url_must_be_absolute(tmp_path, url):
    with pytest.raises(ConfigError, match="public_url"):
        load_settings(env={"CONSULT_PUBLIC_URL": url}, data_dir=tmp_path)


# -- the simulator serves only the order's own patient ------------------------------------------


@pytest.fixture
async def demo_world(client, settings, make_user):
    assert settings.demo  # tests/conftest.py: in-process apps are demos unless asked otherwise
    w = build_world(client, settings, make_user)
    yield w
    w.db.close()


async def no_payment_happens(world) -> None:
    await asyncio.sleep(0.3)  # a wrongly sent callback would arrive meanwhile
    assert [p["status"] for p in payment_rows(world)] == ["pending"]
    assert visit_row(world)["status"] == "held"


async def test_an_anonymous_session_cannot_pay_another_s_order(demo_world):
    world = demo_world
    order = await start_payment(world)
    client = world.client
    client.session.cookie_jar.clear()  # a fresh anonymous session that knows the order id
    token = await csrf_of(client, "/login")
    resp = await client.get(f"/simulator/pay/{order}", allow_redirects=False)
    assert resp.status == 303
    location = URL(resp.headers["Location"])
    assert location.path == "/login" and location.query["next"] == f"/simulator/pay/{order}"
    resp = await client.post(
        f"/simulator/pay/{order}", data={"csrf_token": token, "action": "pay"}, allow_redirects=False
    )
    assert resp.status == 401
    assert "sign in" in (await resp.text()).lower()
    await no_payment_happens(world)


@pytest.mark.parametrize("intruder", [OTHER_PATIENT, ADMIN])
async def test_another_account_cannot_pay_someone_s_order(demo_world, intruder):
    world = demo_world
    order = await start_payment(world)
    token = await sign_in(world.client, intruder)
    resp = await world.client.get(f"/simulator/pay/{order}")
    assert resp.status == 404 and "This payment does not exist." in await resp.text()
    resp = await world.client.post(
        f"/simulator/pay/{order}", data={"csrf_token": token, "action": "pay"}, allow_redirects=False
    )
    assert resp.status == 404
    await no_payment_happens(world)


async def test_the_owner_pays_through_the_simulator(demo_world):
    world = demo_world
    order = await start_payment(world)  # signed in as the patient who booked
    page = await world.client.get(f"/simulator/pay/{order}")
    assert page.status == 200
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', await page.text()).group(1)
    resp = await world.client.post(
        f"/simulator/pay/{order}", data={"csrf_token": token, "action": "pay"}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == f"/pay/{order}"
    for _ in range(100):
        if visit_row(world)["status"] == "confirmed":
            break
        await asyncio.sleep(0.05)
    assert visit_row(world)["status"] == "confirmed"
    assert [p["status"] for p in payment_rows(world)] == ["paid"]


async def test_production_pays_at_the_counter_and_has_no_simulator(aiohttp_client, make_settings, make_user):
    settings = make_settings(demo=False, public_url=PUBLIC)
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    try:
        order = await start_payment(world)
        assert payment_rows(world)[0]["provider"] == "cashier"
        assert (await client.get(f"/simulator/pay/{order}")).status == 404
        resp = await client.post("/api/payments/callback/simulator", json={"order_id": order})
        assert resp.status == 404  # no simulator callbacks either, however signed
    finally:
        world.db.close()


# -- the banner ---------------------------------------------------------------------------------


async def test_banner_in_demo_mode_in_the_user_s_language(client, make_user):
    make_user("patient", PATIENT)
    assert BANNER in await (await client.get("/login")).text()
    zh = await (await client.get("/login", headers={"Accept-Language": "zh-CN"})).text()
    assert "演示系统——请勿用于真实患者" in zh and BANNER not in zh
    await sign_in(client, PATIENT)
    assert 'data-testid="demo-banner"' in await (await client.get("/patient")).text()
    missing = await client.get("/no/such/page")
    assert missing.status == 404 and 'data-testid="demo-banner"' in await missing.text()


async def test_no_banner_in_production(aiohttp_client, make_settings, make_user):
    client = await aiohttp_client(create_app(make_settings(demo=False, public_url=PUBLIC)))
    make_user("patient", PATIENT)
    assert "demo-banner" not in await (await client.get("/login")).text()
    await sign_in(client, PATIENT)
    assert "demo-banner" not in await (await client.get("/patient")).text()


# -- links come from public_url ---------------------------------------------------------------


async def confirmed_world(aiohttp_client, settings, make_user):
    client = await aiohttp_client(create_app(settings))
    world = build_world(client, settings, make_user)
    world.db.write_sync(
        lambda d: d.execute("UPDATE visits SET status = 'confirmed' WHERE id = ?", [world.visit_id])
    )
    return client, world


@pytest.mark.parametrize("demo", [False, True])
async def test_links_use_public_url_whatever_the_host(aiohttp_client, make_settings, make_user, demo):
    settings = make_settings(demo=demo, public_url=PUBLIC + "/")
    client, world = await confirmed_world(aiohttp_client, settings, make_user)
    try:
        await sign_in(client, PATIENT)
        hostile = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
        page = await (await client.get(f"/visits/{world.public_id}", headers=hostile)).text()
        call_url = re.search(r'value="([^"]+)" class="call-url"', page).group(1)
        assert call_url.startswith(PUBLIC + "/call/"), call_url
        svg = await (await client.get(f"/visits/{world.public_id}/qr.svg", headers=hostile)).read()
        assert svg == qr.svg(call_url)
        ics = await (await client.get(f"/visits/{world.public_id}/visit.ics", headers=hostile)).read()
        assert parse_ics(ics.decode())["URL"] == f"{PUBLIC}/visits/{world.public_id}"
        assert b"evil.example" not in ics
        await booking.after_confirmed(client.server.app, world.visit_id)  # the SMS
        (body,) = world.db.read_sync(lambda d: [r[0] for r in d.execute("SELECT body FROM outbox")])
        assert f"{PUBLIC}/visits/{world.public_id}" in body and "localhost" not in body
    finally:
        world.db.close()


async def test_demo_without_public_url_may_use_the_request_origin(aiohttp_client, settings, make_user):
    client, world = await confirmed_world(aiohttp_client, settings, make_user)
    try:
        await sign_in(client, PATIENT)
        ics = parse_ics((await (await client.get(f"/visits/{world.public_id}/visit.ics")).read()).decode())
        assert ics["URL"] == str(client.make_url(f"/visits/{world.public_id}"))
    finally:
        world.db.close()


def test_production_never_takes_a_link_from_the_request(make_settings):
    settings = for_mode(make_settings(demo=False))
    with pytest.raises(ConfigError, match="public_url"):
        booking.base_url(settings, None)
    assert booking.base_url(for_mode(make_settings(demo=False, public_url=PUBLIC))) == PUBLIC
