# Two entry points, both self-installing on a fresh machine:
#   make train   -> tiny-world training run of the llava baseline (CPU, minutes)
#   make test    -> the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH ?= llava
export HF_HUB_OFFLINE ?= 1

.PHONY: setup train test

setup: $(VENV)/.installed

# torch/torchvision are pinned in pyproject.toml; pip takes them from the local wheel store when present.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python scripts/train.py --arch $(ARCH)

test: setup
	$(BIN)/python -m pytest -q
