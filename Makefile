VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= data

.PHONY: run test test-postgresql test-deps lint install install-dev clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/consult --data-dir $(DATA) certs --dir certs
	$(VENV)/bin/consult --data-dir $(DATA) init
	$(VENV)/bin/consult --data-dir $(DATA) demo
	$(VENV)/bin/consult --data-dir $(DATA) serve --cert certs/dev-cert.pem --key certs/dev-key.pem --port 8443

lint: install-dev
	$(VENV)/bin/ruff check .

# The Debian packages the tests run (chromium, coturn, ...), installed when missing: first,
# since making the venv may need python3-venv.
test-deps:
	bash scripts/install-test-deps.sh

# Every test on SQLite (the embedded default), then every test that reaches the database and is
# not a browser test on PostgreSQL (a throwaway server the harness starts; tests about the SQLite file itself skip).
# The browser tests' server code is the same on both engines; the cluster's browser test runs
# on PostgreSQL in the first pass.
# Run once, in the first pass: files that never reach Consult's database (the signaling and
# recording packages, the harness, the architecture and translation rules, static files and the
# page shell, the listening edge, TURN config, PDF rendering), those that start their own
# PostgreSQL whatever the engine (the cluster's tests), and two that start many real servers to
# test what the database does not decide (nginx in front, the secrets' files): CI's 30 minutes.
ENGINE_INDEPENDENT := tests/test_architecture.py tests/test_install_deps.py tests/test_pg_translate.py \
	tests/test_recording_writer.py tests/test_recording.py tests/test_recording_pool.py \
	tests/test_signaling.py tests/test_signaling_limits.py tests/test_sessionlog_charts.py \
	tests/test_bench_cluster.py tests/test_harness.py tests/test_harness_postgres.py \
	tests/test_haproxy.py tests/test_cluster.py tests/test_cluster_parts.py \
	tests/test_migrate_to_postgres.py tests/test_i18n.py tests/test_language_check.py \
	tests/test_static.py tests/test_web_shell.py tests/test_edge.py tests/test_turn_config.py \
	tests/test_pdf_active.py tests/test_nginx.py tests/test_cluster_secrets.py
# Browser tests under other names.
BROWSER_TESTS := tests/test_browser_% tests/test_prescriptions_browser.py tests/test_prescriptions_pharmacy_browser.py
# The browser journeys that write and read the most run on PostgreSQL too: booking and uploads,
# the whole patient journey in Chinese with its call, the clinic board (live over LISTEN/NOTIFY)
# and the prescription. Every browser test passes on PostgreSQL (CONSULT_TEST_ENGINE=postgresql
# pytest tests/test_browser_*.py); the rest (media, networks, recording, Firefox) would take CI
# past its 30 minutes in a second pass.
BROWSER_ON_BOTH := tests/test_browser_booking.py tests/test_browser_zh.py tests/test_browser_board.py \
	tests/test_browser_bookux.py tests/test_browser_slotday.py tests/test_prescriptions_browser.py
ENGINE_TESTS := $(filter-out $(BROWSER_TESTS) $(ENGINE_INDEPENDENT),$(wildcard tests/test_*.py)) $(BROWSER_ON_BOTH)

# Tests run side by side on PYTEST_WORKERS processes (pytest-xdist; each worker its own network
# namespace, PostgreSQL and browsers): most of a test's time is waiting for a timer, a browser or a
# server to start, so 3 workers on 2 cores take about half the time of one. PYTEST_WORKERS=0 runs
# them one after another in this process.
PYTEST_WORKERS ?= 3
PYTEST := $(VENV)/bin/python -m pytest $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist worksteal)

test:
	bash scripts/install-test-deps.sh
	@$(MAKE) --no-print-directory install-dev
	$(VENV)/bin/ruff check .
	$(PYTEST)
	CONSULT_TEST_ENGINE=postgresql $(PYTEST) $(ENGINE_TESTS)

test-postgresql: install-dev
	CONSULT_TEST_ENGINE=postgresql $(PYTEST) $(ENGINE_TESTS)

clean:
	rm -rf $(VENV) $(DATA) certs/*.pem
