# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: install run status up down browser test test-unit test-slow lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(BIN)/.installed          ## create .venv and install the pinned dependencies

run: install                        ## the whole pipeline on the embedded defaults
	$(BIN)/ottimo run

status: install                     ## champion / previous-champion / challenger
	$(BIN)/ottimo status

up: install                         ## Prefect :4200, MLflow :5000, the deployments served, the endpoint :8000 (127.0.0.1)
	$(BIN)/python -m ottimo.ops.servers up

down:                               ## stop exactly what `make up` started (.run/*.pid); data is kept
	$(BIN)/python -m ottimo.ops.servers down

browser:                            ## Debian's chromium + chromedriver for the browser test (CI runs as root)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -q && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: install browser               ## lint, then the whole test suite (tests/system/test_ui.py drives headless Chromium)
	$(BIN)/ruff check ottimo tasks flows tests bench
	$(BIN)/python -m pytest

test-unit: install                  ## the fast loop: unit tests of the core (tests/unit), no Prefect, no servers
	$(BIN)/python -m pytest tests/unit

test-slow: install browser          ## the slow suites: crash matrix, servers killed mid-run (CI runs them after `make test`)
	$(BIN)/python -m pytest -m slow

bench: install                      ## benchmarks (print ratios measured side by side)
	$(BIN)/python bench/overhead.py

clean:                              ## remove local runs, prepared data and the DVC remote (keeps .venv)
	rm -rf mlruns data/prepared .dvc-remote
