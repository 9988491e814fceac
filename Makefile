# drp-campaign: `make demo` runs the plan on the embedded default, `make test` runs every check.
# Both create .venv with the pinned dependency set (constraints.txt) on first use.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SPEC ?= deployments/campaigns/dc2-test-med-1.yaml
DEMO_SPEC ?= deployments/campaigns/dc2-test-med-1-demo.yaml
DEMO_DIR ?= demo

# A Python >= 3.12: python3.12 / python3.13 if they run, else pyenv's 3.12 (on these machines 3.12
# is installed through pyenv but is not the default, and a bare `python3.12` shim fails).
PYTHON_312 := $(shell \
	for c in python3.12 python3.13; do \
	  if $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then echo $$c; exit 0; fi; \
	done; \
	if command -v pyenv >/dev/null 2>&1; then \
	  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -V | head -1); do \
	    echo "env PYENV_VERSION=$$v python$${v%.*}"; exit 0; \
	  done; \
	fi)

.PHONY: all venv demo demo-rucio plan serve serve-stop test lint typecheck unit clean bench-quick \
	rucio-venv rucio-up rucio-down

all: test

$(VENV)/.installed: pyproject.toml constraints.txt
	@if [ -z "$(PYTHON_312)" ]; then \
	  echo "error: drp-campaign needs Python >= 3.12 (lsst-pipe-base and lsst-ctrl-bps-panda require it)."; \
	  echo "       Install it (e.g. 'pyenv install 3.12' or your OS package python3.12) and rerun make."; \
	  exit 1; fi
	@echo "using $(PYTHON_312)"
	$(PYTHON_312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

# The whole campaign on the embedded default, on a local Prefect server (stopped at the end;
# KEEP_SERVER=1 keeps it for the UI), verified against a single-site run; prints the report.
demo: venv
	scripts/demo.sh $(VENV)/bin $(DEMO_SPEC) $(DEMO_DIR)

# The same with the real local Rucio as the data catalog.
demo-rucio: venv
	scripts/demo.sh $(VENV)/bin $(DEMO_SPEC) $(DEMO_DIR)-rucio --rucio

# Only the plan of the full-size dc2-test-med-1 (LSSTCam-imSim, 300 visits).
plan: venv
	$(VENV)/bin/drp-campaign plan $(SPEC) --out $(DEMO_DIR)/plan-full

# A Prefect server with API auth on 127.0.0.1, a process worker, the deployments and the
# Blocks of the demo campaign: then `source $(DEMO_DIR)/prefect/env.sh` and use the UI or
# `prefect deployment run 'drp-step/default' -p step=step3 -p sites='["FrDF"]'`.
serve: venv
	scripts/serve.sh $(VENV)/bin $(DEMO_SPEC) $(DEMO_DIR) start

serve-stop: venv
	scripts/serve.sh $(VENV)/bin $(DEMO_SPEC) $(DEMO_DIR) stop

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# The suite runs beside a throw-away PostgreSQL server on 127.0.0.1 (Butler registry tests).
unit: venv
	scripts/with-postgres.sh $(PY) -m pytest -q

test: lint typecheck unit

bench-quick: venv
	$(PY) benchmarks/plan_scale.py --quick

# Stops what the demos may have left running (a kept Prefect server, the local Rucio) first.
clean:
	-[ -x $(PY) ] && $(PY) scripts/prefect_server.py stop --home $(DEMO_DIR)/prefect 2>/dev/null
	-[ -d $(DEMO_DIR)-rucio/rucio ] && $(RUCIO_LOCAL) stop $(DEMO_DIR)-rucio/rucio
	rm -rf $(VENV) $(DEMO_DIR) $(DEMO_DIR)-rucio plan .mypy_cache .ruff_cache .pytest_cache .hypothesis

# A real local Rucio 41.5.1 (PostgreSQL, server, daemons; scripts/rucio_local). Its own
# environment .venv-rucio (Python 3.11) is built on first use; settings in $(DEMO_DIR)/rucio.
RUCIO_LOCAL := scripts/rucio_local/rucio-local.sh

rucio-venv:
	$(RUCIO_LOCAL) venv

rucio-up:
	$(RUCIO_LOCAL) start $(DEMO_DIR)/rucio
	@$(RUCIO_LOCAL) env $(DEMO_DIR)/rucio

rucio-down:
	$(RUCIO_LOCAL) stop $(DEMO_DIR)/rucio
