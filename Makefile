# Two commands do all set-up on a fresh machine:
#   make serve   - install into .venv and serve the embedded default model on 127.0.0.1:8080
#   make test    - install into .venv (with test tools) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=
# llama.cpp's native build turns on AMX wherever the CPU advertises it, and some virtual
# machines (Firecracker, for one) advertise AMX but fault on its instructions: the worker then
# dies with SIGILL in its first matrix multiply. The x86-64 build leaves AMX out; on bare-metal
# Sapphire Rapids or newer, `make install LLAMA_CFLAGS=` keeps it.
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

.PHONY: serve test test-cluster install install-test install-cluster lint clean chromium docs

# GPU=cuda|metal|vulkan|rocm rebuilds llama-cpp-python for that backend (CMAKE_ARGS as in
# llama-cpp-python's README) before serving or testing; without it everything runs on the CPU.
GPU ?=
GPU_CMAKE_ARGS_cuda   = -DGGML_CUDA=on
GPU_CMAKE_ARGS_metal  = -DGGML_METAL=on
GPU_CMAKE_ARGS_vulkan = -DGGML_VULKAN=on
GPU_CMAKE_ARGS_rocm   = -DGGML_HIP=on
GPU_STAMP = $(if $(GPU),$(VENV)/.gpu-$(GPU))
LLAMA_CPP_PYTHON = $(shell sed -n 's/.*"\(llama-cpp-python==[^"]*\)".*/\1/p' pyproject.toml)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3

# llama-cpp-python is built from source (about 5-10 minutes on 2 cores, cached by pip after).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.gpu-%: $(VENV)/.installed
	@test -n "$(GPU_CMAKE_ARGS_$*)" || { echo "GPU=$*: use cuda, metal, vulkan or rocm"; exit 2; }
	CMAKE_ARGS="$(GPU_CMAKE_ARGS_$*)" $(BIN)/python -m pip install --quiet --force-reinstall \
		--no-deps --no-cache-dir "$(LLAMA_CPP_PYTHON)"
	rm -f $(VENV)/.gpu-*
	touch $@

$(VENV)/.installed-cluster: pyproject.toml $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e ".[test,cluster]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-cluster: $(VENV)/.installed-cluster

serve: install $(GPU_STAMP)
	$(BIN)/pensieve serve $(ARGS)

# The browser test drives Debian's chromium (Playwright cannot download its own browser offline).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will fail (apt-get install chromium)"

# The default suite first, before the cluster extra is installed (on a fresh clone it then runs
# without ray and redis, as a default install does), then the cluster tests.
test: install-test $(GPU_STAMP) chromium
	$(BIN)/python -m pytest $(ARGS)
	$(MAKE) test-cluster ARGS="$(ARGS)"

# Cluster mode (Ray Serve replicas, the shared memory tier on Redis): its own extra and a
# redis-server (Debian's), started by the tests on loopback ports. The default suite does not
# collect tests/cluster (tests/conftest.py); this target does (a few minutes).
test-cluster: install-cluster $(GPU_STAMP)
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
		|| echo "redis-server could not be installed: the cluster tests will fail (apt-get install redis-server)"
	$(BIN)/python -m pytest tests/cluster $(ARGS)

# The configuration reference is generated from the settings model (a unit test checks it).
docs: install
	$(BIN)/python -m pensieve.cli.config_docs docs/configuration.md

# ruff on everything; mypy (configured in pyproject.toml) on src/pensieve.
# mypy checks cluster mode too, so lint installs its extra.
lint: install-cluster
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
