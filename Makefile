# Two commands on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv/ and install what they need. torch is installed first at its
# pinned version so that pip takes the CPU build where one is available (never a bare `torch`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
ARGS ?=

.PHONY: demo test test-fast lint bench install browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pallava quickstart $(ARGS)

test: $(STAMP) browser lint
	$(PY) -m pytest -q $(ARGS)

# The edit-test loop: everything but the end-to-end tests marked `slow` (under 2 minutes).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-logo

bench: $(STAMP)
	$(PY) benchmarks/run.py $(ARGS)

# The web-page test drives Debian's chromium; install it when missing and apt is available.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped"; }

clean:
	rm -rf $(VENV) build dist src/*.egg-info
