# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: install run status test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(BIN)/.installed          ## create .venv and install the pinned dependencies

run: install                        ## the whole pipeline on the embedded defaults
	$(BIN)/ottimo run

status: install                     ## champion / previous-champion / challenger
	$(BIN)/ottimo status

test: install                       ## lint, then the whole test suite
	$(BIN)/ruff check ottimo tasks flows tests bench
	$(BIN)/python -m pytest

bench: install                      ## benchmarks (print ratios measured side by side)
	$(BIN)/python bench/overhead.py

clean:                              ## remove local runs, prepared data and the DVC remote (keeps .venv)
	rm -rf mlruns data/prepared .dvc-remote
