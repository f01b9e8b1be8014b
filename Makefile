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

.PHONY: serve test install install-test lint clean chromium docs

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

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/pensieve serve $(ARGS)

# The browser test drives Debian's chromium (Playwright cannot download its own browser offline).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will fail (apt-get install chromium)"

test: install-test chromium
	$(BIN)/python -m pytest $(ARGS)

# The configuration reference is generated from the settings model (a unit test checks it).
docs: install
	$(BIN)/python -m pensieve.config_docs docs/configuration.md

# ruff on everything; mypy (configured in pyproject.toml) on src/pensieve.
lint: install-test
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
