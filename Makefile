# relay: `make run` starts everything, `make test` runs the tests. Both set themselves up.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTHON  ?= python3

.PHONY: install run test test-cluster lint bench clean chromium postgresql chaos rehearse

# One line per step with its time (ops/step.py, standard library only, run by $(PYTHON)).
STEP    := $(PYTHON) -m ops.step

$(STAMP): pyproject.toml
	@$(STEP) --skip-if $(PY) --needs-python 3.11 setup 1/3 "creating the virtualenv $(VENV) with $(PYTHON)" -- $(PYTHON) -m venv $(VENV)
	@$(STEP) setup 2/3 "upgrading pip" -- $(PY) -m pip install --quiet --upgrade pip
	@$(STEP) setup 3/3 "installing Python packages: pip install -e '.[dev]' (first run: 20 s to a minute)" -- $(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Extra arguments, as honcho start takes them: make run ARGS="-c worker=3" (ops/supervise.py)
run: install
	@$(PY) -m ops.run $(ARGS)

# Browser tests drive Debian's chromium through Playwright (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The chaos test starts a private PostgreSQL from Debian's binaries (never the system server).
postgresql:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "installing Debian's PostgreSQL for the chaos test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The AI SDK test's npm packages (exact versions, tests/aisdk/package-lock.json), installed
# again only when the lock changes or node_modules is gone.
AISDK_STAMP := tests/aisdk/node_modules/.installed-stamp

$(AISDK_STAMP): tests/aisdk/package-lock.json
	npm ci --prefix tests/aisdk --no-audit --no-fund --loglevel=error
	touch $(AISDK_STAMP)

# The example AI SDK front end's packages (examples/ai-sdk-chat/package-lock.json), for its
# browser test (tests/test_example_aisdk.py); again only when the lock changes.
EXAMPLE_STAMP := examples/ai-sdk-chat/node_modules/.installed-stamp

$(EXAMPLE_STAMP): examples/ai-sdk-chat/package-lock.json
	npm ci --prefix examples/ai-sdk-chat --no-audit --no-fund --loglevel=error
	touch $(EXAMPLE_STAMP)

# Four test processes (pytest-xdist) on two cores
# (on a 2-core AMD EPYC VM, 2026-12-04: 11 min 20 s on SQLite, 12 min 54 s with PostgreSQL;
# CPU-bound, so six processes were no faster); tests are handed out two at a time, the
# longest first (tests/conftest.py LONG_FIRST). PYTEST_ARGS="-n 0": one process.
test: install chromium postgresql $(AISDK_STAMP) $(EXAMPLE_STAMP)
	$(PY) -m pytest -n 4 --maxschedchunk 2 $(PYTEST_ARGS)

# The stream protocol's suites again with relay's data on a Redis Cluster of three primaries
# per stack (RELAY_TEST_LOG_CLUSTER, tests/conftest.py; the broker stays on a plain Redis):
# attach and resume from any seq over WebSocket and SSE, the batch form, catch-up, a web
# process killed mid-stream, cancel, retry (API and CLI), deletion, limits, idempotency.
# About 1 minute here; .ci/run runs it after make test.
CLUSTER_SUITES := tests/test_streaming.py tests/test_attach.py tests/test_retry_api.py \
	tests/test_catchup.py tests/test_websocket.py tests/test_deletion.py tests/test_limits.py \
	tests/test_idempotency.py tests/test_operations.py::test_streams_commands
test-cluster: install
	RELAY_TEST_LOG_CLUSTER=1 $(PY) -m pytest -n 4 --maxschedchunk 2 $(CLUSTER_SUITES) $(PYTEST_ARGS)

# The chaos test at a bigger size (tests/chaos.py); prints its figures as one JSON object.
# Other sizes: make chaos CHAOS_ARGS="--streams 100 --answer-s 60"; on Redis Sentinel, with a
# failover as the Redis fault: make chaos CHAOS_ARGS="--redis sentinel"
chaos: install postgresql
	$(PY) -m tests.chaos --streams 300 $(CHAOS_ARGS)

# Issue 12's multi-host rehearsal: two network namespaces (web + worker each) on one Redis, one
# host's link cut mid-stream. Needs root (ip netns, veth), so it is not part of make test.
# REHEARSE_ARGS=--log-cluster: the logs on a Redis Cluster; --sentinel: Redis under Sentinel,
# and the host cut off is the master's.
rehearse: install
	$(PY) -m tests.rehearsal $(REHEARSE_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
