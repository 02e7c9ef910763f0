# Everyday commands. `make run` and `make test` work on a fresh clone (python3 >= 3.11).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SECRET := var/secret-key

.PHONY: run web workers test faults lint format incus bench clean $(SECRET)

# A local secret key, made once and readable by you alone: outside production the settings use
# it when DJANGO_SECRET_KEY is unset, so the service (and manage.py in any terminal) runs with
# DEBUG off without setup.
$(SECRET):
	@test -s $@ || { mkdir -p $(@D) && umask 077 \
		&& $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))' > $@.new \
		&& mv $@.new $@ && echo "wrote a local secret key to $@"; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP) $(SECRET)
	$(BIN)/python manage.py migrate --noinput
	mkdir -p var/static
	scripts/run

# One role each, for a host of each kind (see the README's "Two hosts"): the web server alone
# (it migrates the shared database first), or the push workers alone.
web: $(STAMP) $(SECRET)
	$(BIN)/python manage.py migrate --noinput
	mkdir -p var/static
	scripts/run web

workers: $(STAMP) $(SECRET)
	scripts/run workers

test: $(STAMP) $(SECRET)
	$(BIN)/ruff check .
	$(BIN)/mypy uploads uploadsvc
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest -m "not faults" $(PYTEST_ARGS)

# Fault injection: stops incusd, restarts PostgreSQL (with a PostgreSQL DATABASE_URL), fills a
# tmpfs spool. Needs root and the local Incus; .ci/run runs it on PostgreSQL.
faults: $(STAMP) $(SECRET)
	$(BIN)/pytest -m faults $(PYTEST_ARGS)

lint: $(STAMP) $(SECRET)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy uploads uploadsvc

format: $(STAMP) $(SECRET)
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
