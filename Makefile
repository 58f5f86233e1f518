# sipedge: the two commands are `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= sipedge.toml
STAMP  := $(VENV)/.installed

.PHONY: run test build build-run toolchain system-deps install bench clean distclean

# What building needs (python3-venv, python3-dev, gcc, libsrtp2-dev and libssl-dev for the relay's SRTP;
# tools/build-libsrtp.sh builds libsrtp2 on OpenSSL into build/libsrtp, else Debian's is linked):
# installed when root on Debian, else named.
toolchain:
	@sh tools/check-toolchain.sh $(PYTHON)

# Debian packages the test suite drives as real peers: SIPp (sip-tester) and Prometheus
# (the dashboard and alert-rule test); iproute2 and nftables for the network-namespace
# tests (tests/net: veth links, a 1:1 NAT); systemd-analyze (systemd) for the unit file
# test; Chromium and its WebDriver for the console's browser test; nats-server (JetStream) for
# the cluster tests' three-member engine. Installed only if missing.
DEBS_NEEDED = $(shell command -v sipp >/dev/null 2>&1 || echo sip-tester) \
              $(shell command -v promtool >/dev/null 2>&1 || echo prometheus) \
              $(shell command -v ip >/dev/null 2>&1 || echo iproute2) \
              $(shell command -v nft >/dev/null 2>&1 || echo nftables) \
              $(shell command -v systemd-analyze >/dev/null 2>&1 || echo systemd) \
              $(shell command -v chromium >/dev/null 2>&1 || echo chromium) \
              $(shell command -v chromedriver >/dev/null 2>&1 || echo chromium-driver) \
              $(shell command -v nats-server >/dev/null 2>&1 || echo nats-server)
system-deps:
	@if [ -n "$(strip $(DEBS_NEEDED))" ]; then \
	  echo "installing Debian packages: $(DEBS_NEEDED)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS_NEEDED) >/dev/null; \
	fi

# `make run` installs what running needs; the test extras (pytest, pjsua2, ...) come with `make test`.
RUN_STAMP := $(VENV)/.installed-run
$(RUN_STAMP): pyproject.toml setup.py
	@sh tools/check-toolchain.sh $(PYTHON)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel "Cython>=3,<4"
	$(PIP) install -q --no-build-isolation -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

# Rebuild the Cython extensions in place whenever a .pyx/.pxd/.pxi changed. The toolchain check
# runs each time (it is quick): an older venv also gets libsrtp2-dev, which the relay links.
build-run: toolchain $(RUN_STAMP)
	@sh tools/build-libsrtp.sh $(PY)
	$(PY) setup.py -q build_ext --inplace
build: toolchain $(STAMP)
	@sh tools/build-libsrtp.sh $(PY)
	$(PY) setup.py -q build_ext --inplace

run: build-run
	$(VENV)/bin/sipedge serve --config $(CONFIG) --demo

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: system-deps build
	$(PY) -m pytest tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The service layout (docs/deployment.md): the program in its own venv under /opt/sipedge, the
# /usr/bin/sipedge wrapper, the unit and its user, /etc/sipedge/sipedge.toml (kept if present) and
# /var/lib/sipedge. DESTDIR stages it elsewhere (packaging, tests): SIPEDGE_ROOT=$(DESTDIR) runs it there.
DESTDIR ?=
OPT     := /opt/sipedge
install: build-run
	rm -rf build/wheel
	$(PIP) wheel -q --no-deps --no-build-isolation -w build/wheel .
	$(PYTHON) -m venv --clear $(DESTDIR)$(OPT)
	$(DESTDIR)$(OPT)/bin/python -m pip install -q build/wheel/sipedge-*.whl
	install -Dm755 deploy/sipedge.sh $(DESTDIR)/usr/bin/sipedge
	install -Dm644 deploy/systemd/sipedge.service $(DESTDIR)/lib/systemd/system/sipedge.service
	install -Dm644 deploy/systemd/sipedge.sysusers $(DESTDIR)/usr/lib/sysusers.d/sipedge.conf
	install -Dm644 docs/deployment.md $(DESTDIR)/usr/share/doc/sipedge/deployment.md
	test -e $(DESTDIR)/etc/sipedge/sipedge.toml || install -Dm640 deploy/sipedge.toml $(DESTDIR)/etc/sipedge/sipedge.toml
	install -d -m750 $(DESTDIR)/var/lib/sipedge
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then \
	  systemd-sysusers /usr/lib/sysusers.d/sipedge.conf 2>/dev/null || id sipedge >/dev/null 2>&1 || \
	    useradd --system --home-dir /var/lib/sipedge --shell /usr/sbin/nologin sipedge; \
	  chown sipedge:sipedge /var/lib/sipedge; chgrp sipedge /etc/sipedge/sipedge.toml; \
	  systemctl daemon-reload 2>/dev/null || true; \
	  echo "installed: systemctl enable --now sipedge"; fi

bench: build
	$(PIP) install -q -e '.[test,bench]' --no-build-isolation
	$(PY) -m bench.run_all

clean:
	rm -rf build edge/*.c edge/*.so edge/*.html
distclean: clean
	rm -rf $(VENV) var
