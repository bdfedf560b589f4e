"""Test environment: never reach a model hub; wandb offline; no datasets progress bars."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import IMAGE_SIZE  # noqa: E402

datasets.disable_progress_bars()


@pytest.fixture
def pixels():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
