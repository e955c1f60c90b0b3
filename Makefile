# milterd: `make run` brings up clamd, spamd and milterd; `make test` runs every test.
# Both install what they need first (Debian packages, then the virtualenv), idempotently.

PYTHON ?= python3
VENV   := .venv
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := gcc python3-dev python3-venv libmilter-dev postfix clamav-daemon clamav-testfiles spamassassin spamd spamc \
                razor pyzor python3-gdbm miltertest iproute2 libarchive13 libmagic1 mariadb-server unar arj macutils
# `make bench` also compares with amavisd-new and sends CPython's email test messages.
BENCH_PACKAGES := amavisd-new libpython3.11-testsuite unbound

# Install the missing ones of $(1). A policy-rc.d that refuses, for the time of the install, keeps the
# packages' init scripts from starting system-wide daemons (amavis on :10024) on machines without systemd.
define apt_install
	@missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing" $$missing; \
	    guard=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	        $(SUDO) chmod 755 /usr/sbin/policy-rc.d; guard=1; }; \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; rc=$$?; \
	    [ -z "$$guard" ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi
endef

.PHONY: deps bench-deps install run bench bench-quick test test-unit test-integration test-e2e lint check-config clean

deps:
	$(call apt_install,$(DEB_PACKAGES))

bench-deps:
	$(call apt_install,$(BENCH_PACKAGES))

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
	$(VENV)/bin/ruff check milterd tests bench
	$(VENV)/bin/ruff format --check milterd tests bench

check-config: install
	$(VENV)/bin/milterd check-config --config systemd/milterd.toml

clean:
	rm -rf $(VENV) .run build *.egg-info

# A benchmark, not a test: ~15 min (bench-quick ~3 min); the table lands in .run/bench.md.
bench: install bench-deps
	$(VENV)/bin/python -m bench.run

bench-quick: install bench-deps
	$(VENV)/bin/python -m bench.run --quick
