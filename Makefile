# Everyday commands. `make run` and `make test` work on a fresh clone (python3 >= 3.11).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SECRET := var/secret-key

# A local secret key, made once, so the service runs with DEBUG off without setup.
export DJANGO_SECRET_KEY ?= $(shell mkdir -p var && { test -s $(SECRET) || (umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))' > $(SECRET)); } && cat $(SECRET))

.PHONY: run test faults lint format incus bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python manage.py migrate --noinput
	mkdir -p var/static
	scripts/run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy uploads uploadsvc
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest -m "not faults" $(PYTEST_ARGS)

# Fault injection: stops incusd, restarts PostgreSQL (with a PostgreSQL DATABASE_URL), fills a
# tmpfs spool. Needs root and the local Incus; .ci/run runs it on PostgreSQL.
faults: $(STAMP)
	$(BIN)/pytest -m faults $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy uploads uploadsvc

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Install and start a local Incus with test instances (Debian, as root).
incus:
	scripts/incus-test-env

# The benchmarks also need the queue references (the `bench` extra). BENCH_ARGS=--quick: a smoke run.
$(VENV)/.bench-stamp: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-stamp
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var/spool var/test-*.sqlite3*
