"""Test harness: real server subprocesses, headless Chromium (Playwright) and coturn.

- `tests.harness.server`: `ServerProcess` (any command + HTTP health URL) and `ConsultServer`.
- `tests.harness.turn`: `TurnServer` (coturn with TURN REST credentials).
- `tests.harness.postgres`: `PostgresServer` (a throwaway PostgreSQL cluster, a database per test).
- `tests.harness.haproxy`: `HAProxy` (deploy/haproxy.cfg as shipped) and `StandInNode` (routing tests).
- `tests.harness.nginx`: `NginxProxy` (nginx with the site block of docs/install.md, TLS).
- `tests.harness.browser`: Chromium launch, per-page request/console logs, failure artifacts,
  `save_screenshot(page, name)` (test-artifacts/screenshots/).
- `tests.harness.axe`: `axe_check(page, name)`, axe-core's WCAG 2 A/AA rules on the open page.
- `tests.harness.a11y`: touch targets, text at 200 %, and `PageAudit` (all checks on each page).
- `tests.harness.firefox`: `Firefox` (headless Firefox ESR over WebDriver BiDi, the second engine).
- `tests.harness.fixtures`: the pytest fixtures; `from tests.harness.fixtures import *` in
  `tests/conftest.py` (this also imports the `pytest_runtest_makereport` hook).

Everything assumes the test process already lives in the private network namespace set up by
`tests/netns.py` (bridge address 10.99.0.1).
"""
