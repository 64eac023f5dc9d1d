"""Shared fixtures: tiny random checkpoints (see checkpoints.py)."""
from __future__ import annotations

import os

import pytest
import torch

from checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The default tiny checkpoint (every layer type, latent MoE, grouped routing, MTP, tokenizer)."""
    path, hf = make_checkpoint(tmp_path_factory.mktemp("tiny"))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint_with_oracle(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_oracle"))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # CI has two cores; more threads than cores only adds contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
