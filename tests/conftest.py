from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from consult.accounts import users as accounts
from consult.accounts.passwords import Passwords
from consult.app import create_app
from consult.core.config import Settings, load_settings
from consult.core.db import Database
from consult.core.engine import open_database
from consult.core.migrations import migrate_settings
from tests.harness.engine import *  # noqa: F403
from tests.harness.engine import on_postgresql
from tests.harness.fixtures import *  # noqa: F403
from tests.harness.programs import missing_packages
from tests.language_check import Found, make_middleware
from tests.netns import enter_private_netns

# Tests that need the private network namespace (tests/netns.py): browsers, coturn, WebRTC media,
# or the real server on the bridge address. Everything else runs as an ordinary user, outside it.
NETNS_FIXTURES = {
    "browser",
    "consult_server",
    "consult_server_factory",
    "coturn",
    "doctor_page",
    "firefox",
    "nginx_proxy",
    "patient_page",
    "playwright",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "netns: needs the test run's private network namespace (root): WebRTC media, coturn, "
        "the server on the bridge address",
    )
    config.addinivalue_line(
        "markers",
        "locale(name): the language the test's app speaks to a request that names none "
        "(default zh_CN: what users get); tests that read English texts ask for 'en'",
    )
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): about the SQLite file itself (its backup, WAL, PRAGMAs, a full disk under "
        "SQLite, migrations of old files): skipped when CONSULT_TEST_ENGINE=postgresql",
    )


def needs_private_network(item: pytest.Item) -> bool:
    if item.get_closest_marker("netns") or item.get_closest_marker("browser"):
        return True
    return bool(NETNS_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if on_postgresql():
        for item in items:
            marker = item.get_closest_marker("sqlite_only")
            if marker:
                why = marker.args[0] if marker.args else "about the SQLite file"
                item.add_marker(pytest.mark.skip(reason=why))
    # Collection starts no threads; the namespace must be entered before any fixture does.
    if any(needs_private_network(item) for item in items):
        missing = missing_packages()
        if missing:
            raise pytest.UsageError(
                f"missing Debian packages: {' '.join(missing)}; `make test` as root installs them "
                "(scripts/install-test-deps.sh), or select only unit tests, e.g. tests/test_booking.py"
            )
        try:
            enter_private_netns()
        except RuntimeError as exc:
            hint = "or select only unit tests, e.g. tests/test_booking.py"
            raise pytest.UsageError(f"{exc} ({hint})") from None


FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 1024}
# In-process apps run in demo mode unless a test asks for production (`make_settings(demo=False)`):
# the simulator pays, and links may take the request's origin, as before production mode existed.
# What production mode changes is tested in tests/test_modes.py.
IN_PROCESS = {**FAST_ARGON2, "demo": True}
# Tests get what users get: Chinese. A test that reads English texts asks for them, with
# @pytest.mark.locale("en") (or an Accept-Language: en header on its requests).
TEST_LOCALE = "zh_CN"


def locale_for(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("locale")
    return marker.args[0] if marker else TEST_LOCALE


# -- no English sentence reaches a zh_CN page or JSON message (tests/language_check.py) -------

_FOUND = pytest.StashKey[Found]()


@pytest.fixture(autouse=True)
def english_on_zh_pages(request: pytest.FixtureRequest) -> Found:
    """What the language check found in this test (a test of the check itself may clear it)."""
    found = Found()
    request.node.stash[_FOUND] = found
    yield found
    if found.items and not found.reported:  # served during set-up or teardown
        pytest.fail(found.report(), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield
    found = item.stash.get(_FOUND, None)
    if found is not None and found.items:
        found.reported = True
        pytest.fail(found.report(), pytrace=False)
    return result


def _checked(app_or_server, found: Found):
    app = app_or_server if isinstance(app_or_server, web.Application) else getattr(app_or_server, "app", None)
    if isinstance(app, web.Application) and not app.frozen:
        app.middlewares.insert(0, make_middleware(found))
    return app_or_server


@pytest.fixture
def aiohttp_client(aiohttp_client, english_on_zh_pages: Found):
    """pytest-aiohttp's, with the language check on the app it serves."""

    async def make(app_or_server, *args, **kwargs):
        return await aiohttp_client(_checked(app_or_server, english_on_zh_pages), *args, **kwargs)

    return make


@pytest.fixture
def aiohttp_server(aiohttp_server, english_on_zh_pages: Found):
    """pytest-aiohttp's, with the language check on the app it serves."""

    async def make(app, *args, **kwargs):
        return await aiohttp_server(_checked(app, english_on_zh_pages), *args, **kwargs)

    return make


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def settings(data_dir: Path, database_url: str, request: pytest.FixtureRequest) -> Settings:
    return load_settings(
        env={},
        data_dir=data_dir,
        database_url=database_url,
        tls=False,
        default_locale=locale_for(request),
        **IN_PROCESS,
    )


@pytest.fixture
def make_settings(
    data_dir: Path, database_url: str, request: pytest.FixtureRequest
) -> Callable[..., Settings]:
    locale = locale_for(request)

    def make(**overrides) -> Settings:
        values = {
            "data_dir": data_dir,
            "database_url": database_url,
            "tls": False,
            "default_locale": locale,
            **IN_PROCESS,
            **overrides,
        }
        return load_settings(env={}, **values)

    return make


@pytest.fixture
def database(settings: Settings) -> Database:
    migrate_settings(settings)
    db = open_database(settings)
    yield db
    db.close()


@pytest.fixture
def make_user(settings: Settings) -> Callable[..., int]:
    """Create an account directly in the database; returns its id."""
    passwords = Passwords(1, 1024)

    def make(
        role: str = "patient",
        login: str | None = None,
        password: str = "correct horse",
        name: str = "Test Person",
    ) -> int:
        migrate_settings(settings)
        db = open_database(settings)
        kwargs = {"phone": login or "13900000001"} if role == "patient" else {"username": login or role}
        return db.write_sync(
            lambda d: accounts.create_user_sync(
                d, role=role, display_name=name, password_hash=passwords.hash(password), **kwargs
            )
        )

    return make


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


async def csrf_of(client, path: str = "/login") -> str:
    resp = await client.get(path)
    text = await resp.text()
    m = CSRF_RE.search(text)
    assert m, f"no CSRF token on {path}"
    return m.group(1)


async def login(client, identifier: str, password: str = "correct horse", expect: int = 303):
    token = await csrf_of(client)
    resp = await client.post(
        "/login",
        data={"identifier": identifier, "password": password, "csrf_token": token},
        allow_redirects=False,
    )
    assert resp.status == expect, await resp.text()
    return resp
