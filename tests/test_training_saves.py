"""When the training state is saved (``sfcd.training.SaveEvery``): every N steps, or every N minutes of training
by an interval in steps measured once from the step time, the same on every rank."""

from types import SimpleNamespace

import pytest

import sfcd.training as training
from sfcd.training import SaveEvery


def run(callback: SaveEvery, step_seconds, steps: int, monkeypatch, broadcast=None) -> list[int]:
    """``steps`` training steps on a fake clock, step i taking ``step_seconds(i)``; the steps saved at."""
    clock, saved = [1000.0], []
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(broadcast=broadcast or (lambda v, src=0: v)))
    monkeypatch.setattr(training, "save_state", lambda tr, path: saved.append(tr.global_step))
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    for i in range(steps):
        clock[0] += step_seconds(i)
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, None, None, None, 0)
    return saved


def test_every_n_steps(monkeypatch, tmp_path):
    assert run(SaveEvery(tmp_path / "s", every=4), lambda i: 1.0, 13, monkeypatch) == [4, 8, 12]


@pytest.mark.parametrize("seconds_per_step", [1.5, 0.02])
def test_every_n_minutes_by_the_measured_step_time(monkeypatch, tmp_path, seconds_per_step):
    """0.5 minutes at 1.5 s a step is every 20 steps; at 0.02 s, every 1,500; the first step (warm-up) takes 100
    times longer and is left out. Bugs caught: minutes read as seconds, the warm-up step in the measurement, saves
    before the interval is known, or none after it."""
    cb = SaveEvery(tmp_path / "s", every=7, minutes=0.5, probe=5)
    n = round(30 / seconds_per_step)
    saved = run(cb, lambda i: seconds_per_step * (100 if i == 0 else 1), 4 * n + 3, monkeypatch)
    assert cb.interval == n
    assert saved == [n, 2 * n, 3 * n, 4 * n]


def test_the_interval_is_rank_zeros(monkeypatch, tmp_path):
    """Every rank takes the broadcast interval (a save is collective: ranks deciding by their own clocks would
    disagree and wait in its barrier forever)."""
    cb = SaveEvery(tmp_path / "s", every=7, minutes=0.5, probe=5)
    saved = run(cb, lambda i: 3.0, 40, monkeypatch, broadcast=lambda v, src=0: 9)
    assert cb.interval == 9 and saved == [9, 18, 27, 36]


def test_states_are_written_behind_the_training_whole_and_as_they_were(monkeypatch, tmp_path):
    """A real SAE training whose state writes take 0.3 s each. Bugs caught: a save that stalls the step until the
    file is written (no background write), a state written from the live tensors after later steps moved them
    (no snapshot), a run that returns before its last save is on disk, a temp file left behind."""
    import time

    import lightning as L
    import numpy as np
    import torch

    from sfcd.config import compose
    from sfcd.sae.train import SAEModule, make_specs, train_module

    written, inner = [], training.AtomicCheckpointIO.save_checkpoint

    def slow(self, checkpoint, path, storage_options=None):
        time.sleep(0.3)
        inner(self, checkpoint, path, storage_options)
        written.append(checkpoint["global_step"])

    monkeypatch.setattr(training.AtomicCheckpointIO, "save_checkpoint", slow)
    returned_before_written, at_save = [], {}

    class Probe(L.Callback):  # after SaveEvery: sees each save's step as the save returned
        def on_train_batch_end(self, trainer, module, *args):
            step = trainer.global_step
            if step % 5 == 0:
                returned_before_written.append(step not in written)
                at_save[step] = module.saes[0].W_dec.detach().clone()

    cfg = compose(["sae.batch_size=64", "sae.d_sae=32", "sae.k=4", "sae.checkpoint_every=5"])
    acts = np.random.default_rng(0).standard_normal((1024, 16), dtype=np.float32)
    module = SAEModule(make_specs(cfg.sae, {"x": 16}), cfg.sae, 24)
    train_module(module, cfg.trainer, tmp_path, {"x": acts}, [Probe()])
    assert written == [5, 10, 15, 20] and all(returned_before_written)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["global_step"] == 20
    torch.testing.assert_close(state["state_dict"]["saes.0.W_dec"], at_save[20], rtol=0, atol=0)
    assert not torch.equal(at_save[20], module.saes[0].W_dec.detach())  # four more steps moved it
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_save_waits_for_the_previous_write(monkeypatch, tmp_path):
    """Bug caught: snapshots queueing behind a slow disk (each a copy of the whole state on its device) when saves
    come faster than writes finish."""
    import time

    import torch

    written, inner = [], training.AtomicCheckpointIO.save_checkpoint

    def slow(self, checkpoint, path, storage_options=None):
        time.sleep(0.3)
        inner(self, checkpoint, path, storage_options)
        written.append(int(checkpoint["step"]))

    monkeypatch.setattr(training.AtomicCheckpointIO, "save_checkpoint", slow)
    io = training.OneSaveAtATime(training.AtomicCheckpointIO())
    io.save_checkpoint({"step": torch.tensor(1)}, tmp_path / "a.ckpt")
    assert written == []  # behind the caller
    io.save_checkpoint({"step": torch.tensor(2)}, tmp_path / "a.ckpt")
    assert written == [1]  # the first write finished before the second snapshot was taken
    io.teardown()
    assert written == [1, 2] and int(torch.load(tmp_path / "a.ckpt", weights_only=True)["step"]) == 2
