"""Test-session settings and shared fixtures; the tiny-model builders live in tiny_models.py."""

from __future__ import annotations

import os

import pytest
import torch

from tiny_models import VOCAB

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(123))
