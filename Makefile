# toolmesh — every target sets up what it needs; nothing is installed by hand.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
BUF := node_modules/.bin/buf

.DEFAULT_GOAL := help
.PHONY: help install gen run test test-unit test-e2e check lint typecheck buf-lint buf-breaking bench clean

help:
	@echo "make run    - install, generate code, start the whole mesh on loopback (SQLite)"
	@echo "make test   - install, generate code, run the whole test suite"
	@echo "make check  - ruff, mypy, buf lint, buf breaking against the v1 baseline"
	@echo "make bench  - measure Run against a raw gRPC echo, write BENCHMARKS.md"

$(VENV)/.stamp-install: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.stamp-install

# Generated code goes to ./toolmesh (git-ignored), importable from the repository root.
toolmesh/.stamp-gen: $(VENV)/.stamp-install $(PROTOS)
	rm -rf toolmesh
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

gen: toolmesh/.stamp-gen

run: gen
	$(BIN)/toolmesh up

test: gen
	$(BIN)/pytest -q

.PHONY: FORCE
