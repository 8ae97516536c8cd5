"""Session fixtures: tiny models and a training file (helpers in training_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import arithmetic_rows, make_model, write_jsonl


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny_chat") / "model", chat=True)


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_rows(32))
