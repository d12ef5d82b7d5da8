"""Shared fixtures for runtime tests."""

from __future__ import annotations

import os

import pytest

from moe_runtime.testing import save_tiny_hf_mixtral

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A saved tiny transformers Mixtral (E=4, top-2) and the in-memory transformers model."""
    model = save_tiny_hf_mixtral(tmp_path / "ckpt")
    return tmp_path / "ckpt", model
