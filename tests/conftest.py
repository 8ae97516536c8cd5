"""Shared fixtures for the whole test suite."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed torch and random before every test, so each test sees the same draws alone or in a run."""
    random.seed(0)
    torch.manual_seed(0)
