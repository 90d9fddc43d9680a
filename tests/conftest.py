"""Shared fixtures: a private model cache, W&B off, and the smoke-test overrides of the micro model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Smoke-test settings: the micro model, one batch per stage, a few evaluation examples.
SMOKE_OVERRIDES = [
    "model=micro",
    "trainer.fast_dev_run=true",
    "trainer.progress_bar=false",
    "eval.max_examples=4",
    "eval.max_new_tokens=8",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    """Never touch the user's cache or W&B account from a test."""
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("SELFDESTRUCT_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["SELFDESTRUCT_CACHE"])
