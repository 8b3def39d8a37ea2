# `make test` and `make demo` work on a fresh machine: they build their own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench chaos fuzz clean test-system test-fast

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check orchestrator tests bench tests_system
	$(BIN)/ruff format --check orchestrator
	$(BIN)/mypy --strict orchestrator tests bench
	$(BIN)/mypy --strict tests_system  # apart: its conftest is another "conftest"

test: lint
	$(BIN)/python -m pytest -q

# The in-process layer alone (tests/test_fast_*.py: real store, git and gates on a fake
# clock, no daemon process), for a quick loop while editing.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m fast

# The service under a real systemd (tests_system/, not part of `make test`): boots Debian
# with systemd as PID 1 in a container (../shared/tools/systemd-box, or
# $ORCHESTRATOR_SYSTEMD_BOX), installs from this checkout and follows README's "Run as a
# service". The image is built once into $ORCHESTRATOR_BOX_CACHE
# (/var/cache/orchestrator-system-tests). Skips, saying why, where containers cannot run.
test-system: $(STAMP)
	$(BIN)/python -m pytest -q tests_system

# The long versions of the chaos test and the fuzzers (`make test` runs short ones); the
# figures they print go in docs/reliability.md. Override the sizes, e.g.
# `make chaos CHAOS_SEEDS="42" CHAOS_KILLS=50` to rerun one seed harder.
CHAOS_SEEDS ?= 1 2 3 4 5 6 7 8 9 10
CHAOS_KILLS ?= 25
FUZZ_EXAMPLES ?= 2000
FUZZ_RAW_CONNECTIONS ?= 20000
FUZZ_RANDOM_INPUTS ?= 100000
FUZZ_SEED ?= 1

chaos: $(STAMP)
	CHAOS_SEEDS="$(CHAOS_SEEDS)" CHAOS_KILLS=$(CHAOS_KILLS) \
		$(BIN)/python -m pytest -q -s -o timeout=0 tests/test_chaos.py tests/test_crash_recovery.py

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RAW_CONNECTIONS=$(FUZZ_RAW_CONNECTIONS) \
		FUZZ_RANDOM_INPUTS=$(FUZZ_RANDOM_INPUTS) FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/python -m pytest -q -s -o timeout=0 tests/test_fuzz_protocol.py tests/test_fuzz_handoff.py \
		tests/test_hostile.py

# make demo DEMO_ARGS=--mcp: the agents are the claude recipe on a stand-in that talks MCP.
demo: $(STAMP)
	$(BIN)/orchestrator demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

# README's picture of the live page, taken by its browser test (needs /usr/bin/chromium).
.PHONY: page-screenshot
page-screenshot: $(STAMP)
	ORCHESTRATOR_PAGE_SCREENSHOT=$(CURDIR)/docs/page.png \
		$(BIN)/python -m pytest -q -s tests/test_page.py -k browser

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# --- make install-service: the daemon as a systemd service (README, "Run as a service") ---
# Run as root: `sudo make install-service`. DESTDIR stages every file under another root
# (packaging, tests); then nothing is done to the running system: no user is created and
# systemd is not reloaded.
DESTDIR ?=
# The virtual environment the units run the daemon from (ExecStart= is rewritten to it).
SERVICE_PREFIX ?= /opt/orchestrator
UNITDIR ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
CONFDIR ?= /etc/orchestrator
BINDIR ?= /usr/local/bin
SERVICE_UNITS := orchestrator.service orchestrator.socket orchestrator-worker@.service

.PHONY: install-service install-service-package install-service-files

install-service: install-service-package install-service-files

# The package in its own venv, not pip into the system Python: the service's dependencies
# stay apart from the distribution's, and re-running this upgrades it in place. A venv
# records its own path in its scripts, so one built under DESTDIR runs only once moved to
# SERVICE_PREFIX by whatever copies the staged tree there.
install-service-package:
	$(PYTHON) -m venv $(DESTDIR)$(SERVICE_PREFIX)
	$(DESTDIR)$(SERVICE_PREFIX)/bin/python -m pip install --quiet --upgrade pip
	$(DESTDIR)$(SERVICE_PREFIX)/bin/python -m pip install --quiet --upgrade .
	install -d $(DESTDIR)$(BINDIR)
	ln -sfn $(SERVICE_PREFIX)/bin/orchestrator $(DESTDIR)$(BINDIR)/orchestrator

# Units, the user, and a config and a worker example that are never overwritten.
install-service-files:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(CONFDIR)/workers
	for unit in $(SERVICE_UNITS); do \
	  sed 's|/opt/orchestrator/bin/orchestrator|$(SERVICE_PREFIX)/bin/orchestrator|g' \
	    "systemd/$$unit" > "$(DESTDIR)$(UNITDIR)/$$unit" && \
	  chmod 0644 "$(DESTDIR)$(UNITDIR)/$$unit" || exit 1; \
	done
	install -m 0644 systemd/orchestrator.sysusers $(DESTDIR)$(SYSUSERSDIR)/orchestrator.conf
	install -m 0644 systemd/worker.env.example $(DESTDIR)$(CONFDIR)/workers/worker.env.example
	@conf=$(DESTDIR)$(CONFDIR)/orchestrator.toml; fresh=; \
	if [ ! -e "$$conf" ]; then \
	  install -m 0640 config/orchestrator.toml "$$conf" && fresh=1 || exit 1; \
	fi; \
	if [ -z "$(DESTDIR)" ]; then \
	  if command -v systemd-sysusers >/dev/null 2>&1; then \
	    systemd-sysusers $(SYSUSERSDIR)/orchestrator.conf; \
	  else \
	    id orchestrator >/dev/null 2>&1 || useradd --system --user-group \
	      --home-dir /var/lib/orchestrator --shell /usr/sbin/nologin orchestrator; \
	    id orchestrator-agent >/dev/null 2>&1 || useradd --system --user-group \
	      --home-dir /var/lib/orchestrator-agent --shell /usr/sbin/nologin orchestrator-agent; \
	  fi && \
	  chgrp orchestrator "$$conf" && \
	  agent=$$(id -u orchestrator-agent) && \
	  if [ -n "$$fresh" ]; then \
	    sed -i "s/^allowed_uids = \[\]/allowed_uids = [$$agent]  # orchestrator-agent: orchestrator-worker@.service/" "$$conf" && \
	    echo "daemon.allowed_uids = [$$agent] (orchestrator-agent) in $$conf"; \
	  elif ! grep -Eq "^allowed_uids *=.*[^0-9]$$agent([^0-9]|$$)" "$$conf"; then \
	    echo "note: $$conf was kept; add $$agent (orchestrator-agent) to daemon.allowed_uids" \
	      "for orchestrator-worker@ units"; \
	  fi && \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi && \
	  echo "installed; set repository.path in $(CONFDIR)/orchestrator.toml, then:" && \
	  echo "  systemctl enable --now orchestrator.socket orchestrator.service"; \
	fi
