# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv if it is missing and install mechscope into it. torch is pinned first to
# the CPU build this machine's registry carries, so nothing pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The browser tests drive Debian's Chromium through Playwright; install it where it is missing
# (a fresh CI machine starts without it). Playwright never downloads a browser of its own.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/mechscope demo

# The suite, then again with every jaxtyping shape annotation in mechscope checked at run
# time (beartype), so the annotations cannot drift from what the code does.
test: setup browser
	$(BIN)/python -m pytest -n 2 -q
	$(BIN)/python -m pytest -n 2 -q -m "not bad_input and not replay" -p no:cacheprovider \
		--jaxtyping-packages=mechscope,beartype.beartype tests/model tests/loading tests/toys tests/analysis tests/interventions \
		tests/sae tests/viz tests/app

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/core.py
	$(BIN)/python benchmarks/loading.py
	$(BIN)/python benchmarks/patching.py
	$(BIN)/python benchmarks/sae.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
