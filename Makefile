# milterd: `make run` brings up clamd, spamd and milterd; `make test` runs every test.
# Both install what they need first (Debian packages, then the virtualenv), idempotently.

PYTHON ?= python3
VENV   := .venv
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := gcc libmilter-dev postfix clamav-daemon clamav-testfiles spamassassin spamd spamc \
                razor pyzor python3-gdbm miltertest iproute2

.PHONY: deps install run bench bench-quick test test-unit test-integration test-e2e lint check-config clean

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "make deps: installing" $$missing; \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

install: deps $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/python -m tests.run_local

test: install
	$(VENV)/bin/python -m pytest -q tests

test-unit: install
	$(VENV)/bin/python -m pytest -q tests/unit

test-integration: install
	$(VENV)/bin/python -m pytest -q tests/integration

test-e2e: install
	$(VENV)/bin/python -m pytest -q tests/e2e

lint: install
	$(VENV)/bin/ruff check milterd tests
	$(VENV)/bin/ruff format --check milterd tests

check-config: install
	$(VENV)/bin/milterd check-config --config systemd/milterd.toml

clean:
	rm -rf $(VENV) .run build *.egg-info

bench: install
	$(VENV)/bin/python -m bench.run

bench-quick: install
	$(VENV)/bin/python -m bench.run --quick
