"""DDP on the CPU (two processes, gloo): the training-state saves every few steps do not deadlock, and two ranks
each taking half of every batch train the SAE one process trains (DDP averages the two halves' gradients)."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from sae.synthetic import make_data
    from sfcd.config import compose
    from sfcd.sae.train import SAEModule, make_specs, train_module

    def fit(trainer, out):
        acts, _ = make_data(n=4096, d=16, n_dirs=24, seed=0)
        cfg = compose(["sae.architecture=topk", "sae.batch_size=256", "sae.d_sae=32", "sae.k=4",
                       "sae.n_tokens=4096", "sae.checkpoint_every=2", "sae.buffer_tokens=1024", *trainer])
        module = SAEModule(make_specs(cfg.sae, {{"x": 16}}), cfg.sae, 16)
        train_module(module, cfg.trainer, Path(out), {{"x": acts}})
        return module

    if __name__ == "__main__":
        torch.multiprocessing.set_sharing_strategy("file_system")  # this sandbox's /dev/shm refuses fd sharing
        ddp = fit(["trainer.devices=2", "trainer.strategy=ddp_spawn"], sys.argv[1] + "/ddp")
        one = fit([], sys.argv[1] + "/one")
        assert (Path(sys.argv[1]) / "ddp" / "last.ckpt").exists()
        diff = max((a - b).abs().max().item() for a, b in zip(ddp.saes[0].parameters(), one.saes[0].parameters()))
        print("MAXDIFF", diff)
    """
)


@pytest.mark.slow
def test_ddp_saves_without_deadlock_and_trains_what_one_process_trains(tmp_path):
    from pathlib import Path

    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1])))
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    diff = float(p.stdout.split("MAXDIFF")[1].split()[0])
    assert diff < 1e-4, diff
