# `make demo`: set up and run the main job on a small built-in dataset. `make test`: set up and
# pass the tests. Both create .venv on first use (torch 2.13.0 CPU wheel, then the project).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/depthcli make-dataset --out data/demo.zip --num-bg 8 --num-fg 8 --placements 4 --overwrite
	$(BIN)/depthcli shard --src data/demo.zip --out shards --shard-size 100 --overwrite
	$(BIN)/depthcli verify shards --decode

test: setup
	$(BIN)/python -m pytest -q

.PHONY: setup demo test
