# tradebot: `make demo` (the bot on embedded defaults) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/tradebot
export DJANGO_SETTINGS_MODULE := tradebot.settings

.PHONY: venv migrate static demo test test-sqlite test-postgres test-faults drill bench run web clean

$(STAMP): requirements.txt requirements-dev.txt
	@set -e; \
	if [ ! -x $(PY) ]; then \
	  python=$$(scripts/find-python) || exit 1; \
	  echo "Creating $(VENV) with $$python"; \
	  "$$python" -m venv $(VENV); \
	fi; \
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip; \
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt; \
	touch $(STAMP)

venv: $(STAMP)

migrate: venv
	$(PY) manage.py migrate --noinput

# The admin's CSS and JS into var/static, served by WhiteNoise with DEBUG off.
static: venv
	$(PY) manage.py collectstatic --noinput -v0

demo: venv static
	$(PY) manage.py demo

# Three passes: the whole suite on SQLite (TEST_WORKERS processes), then the
# PostgreSQL/Redis/Celery tests against the local servers, with the fault suite
# (its own private servers) running beside both (scripts/test-all says why).
# Set REQUIRE_SERVICES=1 (CI does) to turn a missing PostgreSQL or Redis into a
# failure instead of a skip; TEST_SERIAL=1 runs the passes one after the other.
TEST_WORKERS ?= 2
test: venv
	PY=$(PY) scripts/test-all

test-sqlite: venv
	$(PY) -m pytest -m "not postgres and not faults" -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-postgres: venv
	DATABASE_URL=$(PG_TEST_URL) REDIS_URL=$${REDIS_URL:-redis://127.0.0.1:6379/0} $(PY) -m pytest -m "postgres and not faults" $(PYTEST_ARGS)

# The fault suite (#16) starts its OWN PostgreSQL and Redis on private ports (never the shared servers).
test-faults: venv
	$(PY) -m pytest -m faults $(PYTEST_ARGS)

drill: venv
	@mkdir -p var; rm -f var/drill.jsonl
	FAULT_REPORT=var/drill.jsonl $(PY) -m pytest -m faults -q $(PYTEST_ARGS) || true
	$(PY) scripts/drill_table.py var/drill.jsonl

bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

run: venv migrate static
	$(PY) manage.py runbot

web: venv migrate static
	$(PY) manage.py runserver 127.0.0.1:8000

clean:
	rm -rf $(VENV) var .pytest_cache
