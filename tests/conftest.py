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


@pytest.fixture(scope="session")
def test_saes(test_run):
    """TopK SAEs on resid.0 and mlp.1 of the test run's last checkpoint (cached activations)."""
    from sfcd.config import compose
    from sfcd.sae.stage import train_saes

    cfg = compose(["experiment=test", f"run_dir={test_run.run_dir}", "sae.sites=[resid.0,mlp.1]", "sae.cache=true"])
    return train_saes(cfg)


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium: installed when absent (root, apt), else the test is skipped with the reason."""
    import shutil
    import subprocess

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300, env=env)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True, timeout=600, env=env
            )
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"headless Chromium is not installed and `apt-get install chromium` failed: {e}")
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("headless Chromium is not installed (Debian package `chromium`) and cannot be installed here")
    return path


def run_chromium(chromium: str, url: str, *extra: str, timeout: int = 120) -> str:
    """Load ``url`` in headless Chromium and return its DOM after the page's scripts ran."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=3000",
                "--dump-dom",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return p.stdout


@pytest.fixture(scope="session")
def test_features(test_run, test_saes):
    """``sfcd features`` on the test run's SAEs."""
    from sfcd.config import compose
    from sfcd.features.stage import build_features

    cfg = compose(
        [
            "experiment=test",
            f"run_dir={test_run.run_dir}",
            "features.n_tokens=4096",
            "features.top_k=5",
            "features.quantile_contexts=3",
        ]
    )
    return build_features(cfg)
