"""Shared fixtures: one tiny trained run (experiment=test), built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def test_run(tmp_path_factory):
    """A run directory with the test profile's corpus and a trained micro model (~10 s)."""
    from sfcd.config import compose
    from sfcd.models.train import train_model

    cfg = compose(["experiment=test", f"run_dir={tmp_path_factory.mktemp('runs') / 'test'}"])
    train_model(cfg)
    return cfg


@pytest.fixture(scope="session")
def tokenizer(test_run):
    from sfcd.data.corpus import corpus_tokenizer
    from sfcd.paths import RunDir

    return corpus_tokenizer(RunDir(test_run.run_dir))
