"""Shared fixtures: one tiny random Janus per test session, loaded from disk through the
same ``from_pretrained`` path a real checkpoint takes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from ospo.tiny import build_tiny_janus

    return str(build_tiny_janus(tmp_path_factory.mktemp("tiny-janus")))


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    from ospo.engine import Engine

    return Engine.load(path=tiny_model_dir)
