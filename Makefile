# sipedge: the two commands are `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= sipedge.toml
STAMP  := $(VENV)/.installed

.PHONY: run test build system-deps bench clean distclean

# Debian packages the test suite drives as real peers: SIPp (sip-tester), Prometheus
# (the dashboard and alert-rule test), Chromium and its WebDriver (the console's browser
# test). Installed only if missing.
DEBS_NEEDED = $(shell command -v sipp >/dev/null 2>&1 || echo sip-tester) \
              $(shell command -v promtool >/dev/null 2>&1 || echo prometheus) \
              $(shell command -v chromium >/dev/null 2>&1 || echo chromium) \
              $(shell command -v chromedriver >/dev/null 2>&1 || echo chromium-driver)
system-deps:
	@if [ -n "$(strip $(DEBS_NEEDED))" ]; then \
	  echo "installing Debian packages: $(DEBS_NEEDED)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS_NEEDED) >/dev/null; \
	fi

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel "Cython>=3,<4"
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

# Rebuild the Cython extensions in place whenever a .pyx/.pxd/.pxi changed.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

run: system-deps build
	$(VENV)/bin/sipedge serve --config $(CONFIG) --demo

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: system-deps build
	$(PY) -m pytest tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: build
	$(PIP) install -q -e '.[test,bench]' --no-build-isolation
	$(PY) -m bench.run_all

clean:
	rm -rf build edge/*.c edge/*.so edge/*.html
distclean: clean
	rm -rf $(VENV) var
