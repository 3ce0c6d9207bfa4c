# Two entry points: `make quickstart` (the main job) and `make test`. Both create .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
# The CPU build of torch (pip finds it locally where it is cached); pinned before the rest so that
# nothing pulls a multi-GB CUDA build. On a GPU machine install the torch build you need instead.
TORCH ?= torch==2.13.0
# The browser tests (tests/test_ui.py) drive this Chromium; Playwright cannot download one offline.
# Debian's package is installed when it is missing; elsewhere point CHROMIUM at a Chromium or Chrome.
CHROMIUM ?= /usr/bin/chromium
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install quickstart quickstart-rag generate test bench

$(BIN)/t0s1: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/t0s1

quickstart: install
	$(BIN)/t0s1 quickstart

# Retrieval-augmented: knowledge base -> index -> traces -> LoRA SFT -> sources x thinking budgets.
quickstart-rag: install
	$(BIN)/t0s1 quickstart --rag

generate: install
	$(BIN)/t0s1 generate "How many r are in the word raspberry?" --max-thinking-tokens 256 --num-ignore 1

# Package lists may be missing (a clean machine) or stale: update them only when the install fails.
$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium < /dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium < /dev/null; }

# Benchmarks read ../shared/data unless T0S1_DATA_DIR says otherwise.
test: install $(CHROMIUM)
	T0S1_DATA_DIR=$${T0S1_DATA_DIR:-$(abspath ..)/shared/data} T0S1_CHROMIUM=$(CHROMIUM) \
	  $(BIN)/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python bench/forcing.py
