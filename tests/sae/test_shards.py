"""Site-parallel SAE training (``sae.shards``/``sae.shard``): shard jobs, each training every n-th site from its
own stream, write exactly the SAEs that one job training every site writes, keep their own resumable states
(so concurrent jobs on one checkpoint never reset each other's), and leave units a later run finds complete."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfcd.config import compose
from sfcd.errors import ConfigError

SITES = ["embed", "resid.0", "mlp.1"]
# ReLU SAEs resampling their dead latents (silent on the last batch) every 2 of 4 steps: resampling draws from
# the trainer's generators, so an SAE whose draws depend on the SAEs trained beside it differs between the jobs
BASE = [
    "experiment=test",
    f"sae.sites=[{','.join(SITES)}]",
    "sae.architecture=relu",
    "sae.resample_every=2",
    "sae.dead_tokens=0",
    "sae.n_tokens=4096",
    "sae.checkpoint_every=1",
    "sae.eval_tokens=1024",
]


def _run_dir(test_run, root: Path) -> Path:
    """A run directory sharing the test run's corpus and model (read only), with SAEs of its own."""
    root.mkdir(parents=True)
    for name in ("corpus", "model"):
        (root / name).symlink_to(Path(test_run.run_dir) / name)
    return root


def _same_saes(a: Path, b: Path, tol: float = 0.0) -> None:
    """Every site's SAE tensors and metrics in ``a`` and ``b``: equal, or within ``tol`` (relative for metrics)."""
    for site in SITES:
        wa, wb = (load_file(str(x / site / "sae_weights.safetensors")) for x in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]) if tol == 0 else torch.allclose(wa[k], wb[k], rtol=0, atol=tol), (site, k)
        ma, mb = (json.loads((x / site / "metrics.json").read_text()) for x in (a, b))
        if tol == 0:
            assert ma == mb, site
            continue
        assert ma.keys() == mb.keys(), site
        for k, v in ma.items():
            same = v == pytest.approx(mb[k], rel=tol * 100, abs=tol) if isinstance(v, float) else v == mb[k]
            assert same, (site, k, v, mb[k])


def test_shards_write_the_one_job_saes_without_touching_each_others_state(test_run, tmp_path, caplog):
    """Catches: shard jobs sharing one ``.train`` (the second resets the first's state: no resume), a shard
    that trains another's sites or none, resampling draws shared across the SAEs of a job (a site's SAE then
    depends on which sites train beside it), a completed shard run retrained by the unsharded job after it."""
    from sfcd.sae.stage import train_saes
    from sfcd.sae.train import state_dir_name
    from tests.crash import Crash, CrashAt

    one_dir, shard_dir = _run_dir(test_run, tmp_path / "one"), _run_dir(test_run, tmp_path / "shards")
    with caplog.at_level("INFO", logger="sfcd.sae.train"):
        one = train_saes(compose([*BASE, f"run_dir={one_dir}"]))
    assert [f.name for f in one] == SITES
    assert re.search(r"resampling [1-9]\d* dead", caplog.text)  # it resamples

    def shard(i: int) -> list:
        return compose([*BASE, f"run_dir={shard_dir}", "sae.shards=2", f"sae.shard={i}"])

    out = shard_dir / "saes" / "step24"
    ckpt = out / state_dir_name(shard(0).sae) / "last.ckpt"
    with pytest.raises(Crash):  # shard 0 (embed, mlp.1) stops after step 2, its state saved
        train_saes(shard(0), [CrashAt(2)])
    state = ckpt.read_bytes()
    assert [f.name for f in train_saes(shard(1))] == ["resid.0"]  # shard 1 runs whole meanwhile
    assert ckpt.exists() and ckpt.read_bytes() == state  # shard 0's state left alone
    assert not (out / "embed").exists()
    caplog.clear()
    with caplog.at_level("INFO", logger="sfcd.sae.train"):
        assert [f.name for f in train_saes(shard(0))] == ["embed", "mlp.1"]
    assert "resuming SAE training" in caplog.text  # from its own state, not from scratch
    assert sorted(p.name for p in out.iterdir()) == sorted(SITES)  # no training state left behind

    _same_saes(one_dir / "saes" / "step24", out)  # bit for bit: each SAE is the one job's

    before = {s: (out / s / "sae_weights.safetensors").stat().st_mtime_ns for s in SITES}
    assert [f.name for f in train_saes(compose([*BASE, f"run_dir={shard_dir}"]))] == SITES  # complete: skipped
    assert {s: (out / s / "sae_weights.safetensors").stat().st_mtime_ns for s in SITES} == before


def test_shard_settings_split_by_site_and_pin_the_gpu(monkeypatch):
    """Catches: a shard split that separates a site's sweep (two streams for one site) or loses or repeats a
    site, a bad shard accepted, the pin to ``trainer.devices=[${sae.shard}]`` not resolving or not mapping to
    that GPU."""
    import sfcd.training as training
    from sfcd.sae.train import make_specs, shard_specs, state_dir_name

    cfg = compose(["experiment=test", "+sae.sweep.k=[2,3]"])
    dims = {"embed": 8, "attn.0": 8, "mlp.0": 8, "resid.0": 8, "attn.1": 8}
    specs = make_specs(cfg.sae, dims)
    got = {}
    for i in range(3):
        c = compose(["experiment=test", "+sae.sweep.k=[2,3]", "sae.shards=3", f"sae.shard={i}"]).sae
        got[i] = [s.name for s in shard_specs(specs, c)]
    assert got == {
        0: ["embed@k=2", "embed@k=3", "resid.0@k=2", "resid.0@k=3"],
        1: ["attn.0@k=2", "attn.0@k=3", "attn.1@k=2", "attn.1@k=3"],
        2: ["mlp.0@k=2", "mlp.0@k=3"],
    }
    assert state_dir_name(cfg.sae) == ".train"
    for bad in (["sae.shards=2", "sae.shard=2"], ["sae.shards=0"], ["sae.shard=-1"]):
        with pytest.raises(ConfigError, match=r"sae.shard=.* of sae.shards="):
            shard_specs(specs, compose(["experiment=test", *bad]).sae)

    c = compose(["sae.shards=4", "sae.shard=2", "trainer=gpu", "trainer.devices=[${sae.shard}]"])
    assert list(c.trainer.devices) == [2]
    picked = []
    monkeypatch.setattr(training, "work_device", lambda cfg: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert training.trainer_device(c.trainer) == torch.device("cuda", 2) and picked == [torch.device("cuda", 2)]
    with pytest.raises(ConfigError, match=r"names GPU 5 but 4 are visible"):
        training.trainer_device(compose(["trainer=gpu", "trainer.devices=[5]"]).trainer)
    assert training.trainer_device(compose(["trainer=gpu"]).trainer) == torch.device("cuda", 0)  # an int: as is


@pytest.mark.slow
def test_shard_jobs_through_the_joblib_launcher(test_run, tmp_path):
    """The documented command (less the GPU pin): a Hydra multirun, one joblib job per shard, at the same time
    on one checkpoint; catches shard jobs that collide (a lost SAE, a state left behind) or differ from one job."""
    from sfcd.sae.stage import train_saes

    one_dir, shard_dir = _run_dir(test_run, tmp_path / "one"), _run_dir(test_run, tmp_path / "shards")
    train_saes(compose([*BASE, f"run_dir={one_dir}"]))
    cmd = [sys.executable, "-m", "sfcd.cli", "sae", "-m", *BASE, f"run_dir={shard_dir}", "sae.shards=2"]
    cmd += ["sae.shard=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-3000:]
    out = shard_dir / "saes" / "step24"
    assert sorted(p.name for p in out.iterdir()) == sorted(SITES)  # every SAE, no training state left behind
    # loky workers run fewer CPU threads than this process: matmuls sum in another order, rounding ~1e-7 measured
    # (weights <= 2.4e-7, metrics relative <= 7.5e-5); a wrong SAE (another site's, other batches) is off by > 1e-2
    _same_saes(one_dir / "saes" / "step24", out, tol=1e-5)
