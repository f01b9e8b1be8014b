# Two commands do all set-up on a fresh machine:
#   make serve   - install into .venv and serve the embedded default model on 127.0.0.1:8080
#   make test    - install into .venv (with test tools) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=

.PHONY: serve test install install-test lint clean chromium docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3

# llama-cpp-python is built from source (about 5-10 minutes on 2 cores, cached by pip after).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
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
	$(BIN)/python -m pensieve.cli.config_docs docs/configuration.md

lint: install-test
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
