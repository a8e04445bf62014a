# The two README commands: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency list changes.
VENV_STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: help venv sglang-env tools images gpu-image cluster cluster-down lint test demo demo-down bench

help:
	@echo "make demo          build the images, install the chart on the local cluster's real node,"
	@echo "                   serve the tiny model, ask it"
	@echo "                   (DEMO_BACKEND=sglang: SGLang's engine in the language pod, on CPU,"
	@echo "                   from the sglang backend's CPU test image)"
	@echo "make demo-down     stop it all"
	@echo "make test          lint, type-check and run every test (starts what it needs)"
	@echo "make cluster       start the local cluster: control plane, kwok nodes, one real node"
	@echo "make cluster-down  stop it"
	@echo "make bench         run the benchmarks (JSON lines)"
	@echo "make gpu-image     build the GPU runtime image and check it inside (no GPU needed)"

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml hack/system-deps.sh
	hack/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir -e '.[operator,runtime,cpu,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# SGLang 0.5.23 on CPU (without its GPU dependencies) for the sglang backend's tests and
# benchmarks (SGLang's own single server, language servers run as processes).
sglang-env: venv
	hack/sglang-env.sh

# Build (once, cached by version) the control plane and the pinned kubectl and helm.
tools:
	hack/build-control-plane.sh >/dev/null

# The operator, runtime and sglang test images, for the real node (cached by content);
# the GPU runtime image is built and checked when what it is built from changed
# (hack/gpu-image.checked records the last check).
images: venv
	hack/images.sh build >/dev/null
	hack/images.sh gpu-check --if-changed

# Build the GPU runtime image and check it (no GPU needed), whatever the record says.
gpu-image: venv
	hack/images.sh gpu-check

cluster: tools
	hack/system-deps.sh
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile devkit/sglang-cpu-test.Containerfile

# tools first: its Go caches are deleted before the virtualenvs need the disk.
test: tools venv sglang-env lint images
	$(BIN)/pytest

DEMO_BACKEND ?= reference
demo: tools venv cluster
	DEMO_BACKEND=$(DEMO_BACKEND) $(BIN)/python hack/demo.py up

demo-down:
	if [[ -x $(BIN)/python ]]; then $(BIN)/python hack/demo.py down; fi
	hack/cluster.sh down

bench: tools venv cluster sglang-env
	$(BIN)/python benchmarks/transfer.py --json
	$(BIN)/python benchmarks/operator_scale.py --count 100 --json
	$(BIN)/python benchmarks/serving.py --json
	$(BIN)/python benchmarks/serving.py --backend sglang --json
	$(BIN)/python benchmarks/serving.py --video --json
	$(BIN)/python benchmarks/reuse.py --json
	$(BIN)/python benchmarks/reuse.py --backend sglang --json
	$(BIN)/python benchmarks/load.py --json
