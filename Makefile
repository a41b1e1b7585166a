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

# Every test on SQLite (the embedded default), then every test that reaches the database again
# on PostgreSQL, browser tests included (a throwaway server the harness starts; tests about the
# SQLite file itself skip).
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
# Browser tests run on PostgreSQL too, except those about media and networks rather than data:
# Firefox's calls, H.264 and the network faults (their server side is the same signaling and
# files on either engine); with them a second pass would take CI too close to its 30 minutes.
# They pass on PostgreSQL as well (CONSULT_TEST_ENGINE=postgresql pytest tests/test_browser_*.py).
# The cluster's browser test starts its own PostgreSQL, so it runs once too.
BROWSER_ONCE := tests/test_browser_firefox.py tests/test_browser_h264.py tests/test_browser_network.py \
	tests/test_browser_cluster.py
ENGINE_TESTS := $(filter-out $(BROWSER_ONCE) $(ENGINE_INDEPENDENT),$(wildcard tests/test_*.py))

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
