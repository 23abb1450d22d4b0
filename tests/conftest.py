"""Shared fixtures: one tiny trained run (experiment=test), built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one torch thread each
    import torch

    torch.set_num_threads(1)


_SHARED: dict[Path, dict] = {}  # the session's shared run directory, once built: its files as built


@pytest.fixture(scope="session")
def _shared_run(tmp_path_factory):
    """The one run every test may read: the test profile's corpus and micro model, TopK SAEs on resid.0 and mlp.1 of
    its last checkpoint (cached activations) and their features. Built whole, so that what a test finds there never
    depends on which tests ran before it; read-only (see ``_shared_run_is_read_only``)."""
    from sfcd.config import compose
    from sfcd.features.stage import build_features
    from sfcd.models.train import train_model
    from sfcd.sae.stage import train_saes

    run_dir = tmp_path_factory.mktemp("runs") / "test"
    base = ["experiment=test", f"run_dir={run_dir}"]
    cfg = compose(base)
    train_model(cfg)
    saes = train_saes(compose([*base, "sae.sites=[resid.0,mlp.1]", "sae.cache=true"]))
    features = build_features(
        compose([*base, "features.n_tokens=4096", "features.top_k=5", "features.quantile_contexts=3"])
    )
    _SHARED[run_dir] = _listing(run_dir)
    return cfg, saes, features


@pytest.fixture(scope="session")
def test_run(_shared_run):
    """The shared run's config (experiment=test): read it, never write into it (use ``own_run`` to write)."""
    return _shared_run[0]


@pytest.fixture(scope="session")
def test_saes(_shared_run):
    """TopK SAEs on resid.0 and mlp.1 of the shared run's last checkpoint (what ``train_saes`` returned)."""
    return _shared_run[1]


@pytest.fixture(scope="session")
def test_features(_shared_run):
    """``sfcd features`` on the shared run's SAEs (what ``build_features`` returned)."""
    return _shared_run[2]


@pytest.fixture(scope="session")
def tokenizer(test_run):
    from sfcd.data.corpus import corpus_tokenizer
    from sfcd.paths import RunDir

    return corpus_tokenizer(RunDir(test_run.run_dir))


@pytest.fixture
def own_run(test_run, tmp_path):
    """A private copy of the shared run (model, SAEs, features) for a test that writes: its config, experiment=test."""
    import shutil

    from sfcd.config import compose

    run_dir = tmp_path / "run"
    shutil.copytree(test_run.run_dir, run_dir)
    return compose(["experiment=test", f"run_dir={run_dir}"])


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(autouse=True)
def _seeded_torch(request):
    """torch's global generator seeded from the test's id (pytest-randomly seeds random and numpy, not torch), so a
    test draws the same numbers whatever ran before it."""
    import zlib

    import torch

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _shared_run_is_read_only(request):
    """Fails a test after which the shared run is not as it was built: a file added, changed or removed, by the test
    or by a module fixture it used (it would make other tests order-dependent)."""
    yield
    for root, built in _SHARED.items():
        now = _listing(root)
        changed = sorted(k for k in built.keys() | now.keys() if built.get(k) != now.get(k))
        if changed:
            _SHARED[root] = now  # one failure per write, not one for every later test
            pytest.fail(
                f"the shared test run changed during {request.node.nodeid} or a fixture it set up ({len(changed)} "
                f"paths, e.g. {changed[:5]}): use the `own_run` fixture (a private copy) or tmp_path for writing",
                pytrace=False,
            )


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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The order's seed, even under -q: `pytest --randomly-seed=N` repeats this run's order."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and config.pluginmanager.has_plugin("randomly"):
        terminalreporter.write_line(f"tests ran in random order: repeat it with --randomly-seed={seed}")
