# wsgateway: the two commands a new machine needs are `make run` and `make test`.
# Both create .venv and install into it; `make test` also installs the Debian
# packages the tests need (as root, when missing).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The development config (demo backend, self-signed certificate, text logs);
# etc/wsgateway.ini is the production sample (docs/deploy.md).
CONFIG ?= etc/development.ini
# Where the self-signed development certificate of etc/development.ini's TLS
# listener lives (var/ is git-ignored: no private key is ever committed).
TLS_DIR ?= var/tls
SOURCES := setup.cfg pyproject.toml $(shell find wsgateway twisted -name '*.py' 2>/dev/null)
# Exact versions of every dependency, transitive ones and the build tools
# included: `make run`, `make test`, the bench targets and CI install these and
# nothing else. Regenerate with `make lock` (README, "Upgrading a dependency").
LOCK := requirements/lock.txt
# uv resolves the lock (only `make lock` uses it, from a venv of its own)
UV_VERSION ?= 0.13.10
LOCK_PYTHON ?= 3.11
PYTEST_ARGS ?=
# Two processes (this machine and CI have 2 cores; the integration tests
# mostly wait on daemons): groups of tests sharing a gateway stay together
# (tests/support/tiers.py group_of). PYTEST_WORKERS= runs it in one process.
PYTEST_WORKERS ?= -n 2 --dist loadgroup
# Debian packages the test suite needs (command -> package): chromium for
# tests/browser/ (Playwright drives it; it downloads no browser of its own),
# ss to read a listening socket's backlog, promtool to lint /metrics
# (tests/integration/test_promtool.py; Debian ships it only in `prometheus`:
# 19 MB, 96 MB installed, about 10 s). The tests start their own servers, so
# the install starts none of the packages' services (policy-rc.d, for the
# install only): no Prometheus on :9090, no redis-server on :6379.
SYSDEPS ?= chromium=chromium redis-server=redis-server systemd-analyze=systemd ss=iproute2 promtool=prometheus

.PHONY: bench-compare bench-variants bench-workers run test soak-tools typecheck test-latest lock check devcert bench bench-auth bench-ops bench-fanout bench-compress bench-history bench-shards soak sysdeps clean

run: $(BIN)/.installed devcert
	$(BIN)/twistd -n --pidfile= wsgateway --config $(CONFIG)

check: $(BIN)/.installed devcert
	$(BIN)/wsgateway-check $(CONFIG)

# Creates $(TLS_DIR)/key.pem (mode 0600) and cert.pem on first use; never overwrites.
devcert: $(BIN)/.installed
	$(BIN)/python -m wsgateway.dev.selfsigned $(TLS_DIR)

# The types first (seconds, and a type error fails fast), then the whole suite.
test: typecheck sysdeps soak-tools
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The Go load generator and echo upstream of bench/ (Debian's Go and gorilla/websocket), which
# tests/integration/test_soak.py runs make soak's scenarios with, shortened.
soak-tools:
	bash bench/run.sh --soak-tools

# mypy with the zope plugin, as configured in setup.cfg ([mypy]): 0 errors on wsgateway/.
typecheck: $(BIN)/.installed-test
	$(BIN)/mypy wsgateway twisted/plugins

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A plain (non-editable) install, so twistd finds the plugin the way it will
# on a server; redone whenever a source file or the lock changes. The build
# uses the locked setuptools and wheel of .venv (no isolated build env that
# would fetch the newest ones).
$(BIN)/.installed: $(BIN)/python $(SOURCES) $(LOCK)
	$(BIN)/pip install --quiet --constraint $(LOCK) pip setuptools wheel
	$(BIN)/pip install --quiet --constraint $(LOCK) --no-build-isolation .
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet --constraint $(LOCK) --no-build-isolation '.[test]'
	@touch $@

# Regenerates $(LOCK) from setup.cfg's ranges (every extra) and
# requirements/build.in: the newest versions they allow, resolved for
# CPython $(LOCK_PYTHON) on Linux. Then run `make test` and read tests/compat/.
# `make lock LOCK_UPGRADE=` keeps every pin it can (adding a dependency).
LOCK_UPGRADE ?= --upgrade
lock:
	test -x $(VENV)-lock/bin/uv || { $(PYTHON) -m venv $(VENV)-lock && \
	  $(VENV)-lock/bin/pip install --quiet uv==$(UV_VERSION); }
	$(VENV)-lock/bin/uv pip compile --quiet $(LOCK_UPGRADE) setup.cfg requirements/build.in --all-extras \
	  --python-version $(LOCK_PYTHON) --python-platform linux --custom-compile-command "make lock" -o $(LOCK)
	@echo "$(LOCK) regenerated: review 'git diff $(LOCK)', then run 'make test' before committing it"

# The whole suite against the newest releases setup.cfg allows (no lock), in
# a venv of its own: run it by hand before a dependency bump; not part of CI.
test-latest: sysdeps
	rm -rf $(VENV)-latest
	$(PYTHON) -m venv $(VENV)-latest
	$(VENV)-latest/bin/pip install --quiet --upgrade pip setuptools wheel
	$(VENV)-latest/bin/pip install --quiet --upgrade '.[test]'
	$(VENV)-latest/bin/pip freeze --exclude-editable | grep -v '^wsgateway' > $(VENV)-latest/versions.txt
	@echo "newest allowed versions (diff against $(LOCK)):"; diff <(grep -o '^[^ ]*==[^ ]*' $(LOCK) | tr A-Z_ a-z- | sort) \
	  <(tr A-Z_ a-z- < $(VENV)-latest/versions.txt | sort) || true
	$(VENV)-latest/bin/python -m pytest $(PYTEST_ARGS)

sysdeps:
	@missing=""; for pair in $(SYSDEPS); do cmd=$${pair%%=*}; pkg=$${pair##*=}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian packages:$$missing"; \
	    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	      chmod 755 /usr/sbin/policy-rc.d; trap 'rm -f /usr/sbin/policy-rc.d' EXIT; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing -- run: sudo apt-get install$$missing"; exit 1; fi; fi

# Benchmark (bench/run.sh, in this repository): the gateway against a direct
# connection, nginx, the Gin forwarder and Twisted's blind relay, in one run;
# it installs its Debian packages when run as root (see bench/README.md).
bench: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" TWISTD=$(CURDIR)/$(BIN)/twistd PYTHON=$(CURDIR)/$(BIN)/python \
	  GATEWAY_CMD="$(CURDIR)/$(BIN)/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/gateway.ini" \
	  GATEWAY_URL=ws://127.0.0.1:9500/ws REPS=$${REPS:-3} \
	  bash bench/run.sh $${TARGETS:-direct nginx1 gin twisted-relay gateway}

# This tree's gateway against the one of commit BASE (built into /tmp/wsgw-base with the same
# locked dependencies), interleaved in each repetition: a change's before/after in one run.
BASE_DIR ?= /tmp/wsgw-base
bench-compare: $(BIN)/.installed
	@test -n "$(BASE)" || { echo "usage: make bench-compare BASE=COMMIT [SCENARIOS='a b c e']"; exit 2; }
	rm -rf $(BASE_DIR) && mkdir -p $(BASE_DIR)
	git archive $(BASE) | tar -x -C $(BASE_DIR)
	$(PYTHON) -m venv $(BASE_DIR)/.venv
	$(BASE_DIR)/.venv/bin/pip install --quiet --constraint $(LOCK) pip setuptools wheel
	cd $(BASE_DIR) && .venv/bin/pip install --quiet --constraint $(CURDIR)/$(LOCK) --no-build-isolation .
	PATH="$(CURDIR)/$(BIN):$$PATH" TWISTD=$(CURDIR)/$(BIN)/twistd PYTHON=$(CURDIR)/$(BIN)/python \
	  GATEWAY_CMD="$(CURDIR)/$(BIN)/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/gateway.ini" \
	  BASE_GATEWAY_CMD="$(BASE_DIR)/.venv/bin/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/gateway.ini" \
	  GATEWAY_URL=ws://127.0.0.1:9500/ws REPS=$${REPS:-3} SCENARIOS="$${SCENARIOS:-a b c e}" \
	  bash bench/run.sh $${TARGETS:-twisted-relay gateway-base gateway}

# Scenario b with the admin port (metrics) on and JSON logs at info, beside the plain gateway.
bench-ops: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" TWISTD=$(CURDIR)/$(BIN)/twistd PYTHON=$(CURDIR)/$(BIN)/python \
	  GATEWAY_CMD="$(CURDIR)/$(BIN)/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/gateway-ops.ini" \
	  GATEWAY_URL=ws://127.0.0.1:9500/ws REPS=$${REPS:-3} SCENARIOS=$${SCENARIOS:-b} \
	  bash bench/run.sh $${TARGETS:-twisted-relay gateway}

# Scenarios a and b with one message-path feature on at a time: rate limit, mirror, at_least_once.
BENCH_VARIANTS ?= limit mirror durable
bench-variants: $(BIN)/.installed
	for v in $(BENCH_VARIANTS); do \
	  echo "## variant $$v (bench/gateway-$$v.ini)"; \
	  PATH="$(CURDIR)/$(BIN):$$PATH" TWISTD=$(CURDIR)/$(BIN)/twistd PYTHON=$(CURDIR)/$(BIN)/python \
	    GATEWAY_CMD="$(CURDIR)/$(BIN)/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/gateway-$$v.ini" \
	    GATEWAY_URL=ws://127.0.0.1:9500/ws REPS=$${REPS:-3} SCENARIOS="$${SCENARIOS:-a b}" \
	    bash bench/run.sh $${TARGETS:-twisted-relay gateway} || exit 1; \
	done

# Scenarios b and e with PIN=none (no core pinning): one gateway process, then workers = 2.
bench-workers: $(BIN)/.installed
	for v in gateway gateway-workers; do \
	  echo "## bench/$$v.ini, PIN=none"; \
	  PATH="$(CURDIR)/$(BIN):$$PATH" TWISTD=$(CURDIR)/$(BIN)/twistd PYTHON=$(CURDIR)/$(BIN)/python PIN=none \
	    GATEWAY_CMD="$(CURDIR)/$(BIN)/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/$$v.ini" \
	    GATEWAY_URL=ws://127.0.0.1:9500/ws REPS=$${REPS:-3} SCENARIOS="$${SCENARIOS:-b e}" \
	    bash bench/run.sh $${TARGETS:-twisted-relay gateway} || exit 1; \
	done

# Broadcast fan-out: 1 publisher, 1 000 subscribers on one gateway process, then on two sharing Redis.
# COMPRESS=1: one process, 1 KiB JSON at 20 msg/s, subscribers without then with permessage-deflate
# (REPS, default 3, interleaved).
bench-fanout: $(BIN)/.installed-test sysdeps
	$(BIN)/python bench/fanout.py --subscribers $${SUBSCRIBERS:-1000} --seconds $${DURATION:-5} \
	  $(if $(filter 1,$(COMPRESS)),--compress --reps $${REPS:-3} --rate $${RATE:-20},--rate $${RATE:-50})

# Channel history (bench/history.py): fan-out with history on vs off, one process then two sharing
# Redis (REPS interleaved), and 1 000 clients recovering 100 messages at once (RSS against its bound).
bench-history: $(BIN)/.installed-test sysdeps
	$(BIN)/python bench/history.py --subscribers $${SUBSCRIBERS:-1000} --seconds $${DURATION:-5} \
	  --rate $${RATE:-20} --reps $${REPS:-3}

# Redis sharding (bench/shards.py): 2 gateway processes, 1 Redis vs 2 shards, channels spread (REPS interleaved).
bench-shards: $(BIN)/.installed-test sysdeps
	$(BIN)/python bench/shards.py --subscribers $${SUBSCRIBERS:-1000} --channels $${CHANNELS:-20} \
	  --seconds $${DURATION:-15} --rate $${RATE:-20} --reps $${REPS:-5}

# Reliability scenarios (bench/soak/run.py, at most 15 minutes): figures appended to bench/RELIABILITY.md.
# SCENARIOS="sigterm flapping" runs some; QUICK=1 shortens every phase (a try-out, nothing appended).
soak: $(BIN)/.installed-test sysdeps
	PYTHON=$(CURDIR)/$(BIN)/python bash bench/run.sh --setup
	ulimit -n 20000 && $(BIN)/python bench/soak/run.py $(SCENARIOS) $(if $(filter 1,$(QUICK)),--quick)

# The three permessage-deflate figures (bench/README.md, "Compression"): scenarios j, dj and dz of
# bench/run.sh on twisted-relay, nginx1 and the gateway (bench/gateway-compress.ini), then the
# compressed fan-out; fails (after printing every table) when compression was not negotiated.
bench-compress: $(BIN)/.installed-test
	rc=0; \
	PATH="$(CURDIR)/$(BIN):$$PATH" TWISTD=$(CURDIR)/$(BIN)/twistd PYTHON=$(CURDIR)/$(BIN)/python \
	  GATEWAY_CMD="$(CURDIR)/$(BIN)/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/gateway-compress.ini" \
	  GATEWAY_URL=ws://127.0.0.1:9500/ws REPS=$${REPS:-3} SCENARIOS="$${SCENARIOS:-j dj dz}" \
	  bash bench/run.sh $${TARGETS:-twisted-relay nginx1 gateway} || rc=$$?; \
	echo; echo "### Fan-out with compression (bench/fanout.py --compress)"; echo; \
	$(BIN)/python bench/fanout.py --compress --reps $${REPS:-3} --subscribers $${SUBSCRIBERS:-1000} \
	  --rate $${RATE:-20} --seconds $${DURATION:-5} || rc=$$?; \
	exit $$rc

# Handshakes (scenario e) with HS256 JWT authentication on, against the same peers.
bench-auth: $(BIN)/.installed
	TOKEN=$$($(BIN)/python -c "import jwt, time; print(jwt.encode({'sub': 'bench', 'exp': int(time.time()) + 86400}, \
	  'wsgateway-bench-only-secret-0123456789', algorithm='HS256'))") && \
	PATH="$(CURDIR)/$(BIN):$$PATH" TWISTD=$(CURDIR)/$(BIN)/twistd PYTHON=$(CURDIR)/$(BIN)/python \
	  GATEWAY_CMD="$(CURDIR)/$(BIN)/twistd -n --pidfile= wsgateway --config $(CURDIR)/bench/gateway-auth.ini" \
	  GATEWAY_URL="ws://127.0.0.1:9500/ws?access_token=$$TOKEN" REPS=$${REPS:-3} SCENARIOS=e \
	  bash bench/run.sh $${TARGETS:-nginx1 twisted-relay gateway}

clean:
	rm -rf $(VENV) $(VENV)-latest $(VENV)-lock build dist *.egg-info var
