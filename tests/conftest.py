"""Shared fixtures for the whole test suite."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before any kernel is
# defined, i.e. before cpift.kernels is imported by a test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed torch and random before every test, so each test sees the same draws alone or in a run."""
    random.seed(0)
    torch.manual_seed(0)
