import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sfcd.config import compose
from sfcd.data.grammar import TASKS
from sfcd.io import read_csv
from sfcd.models.loading import load_model
from sfcd.models.schedule import checkpoint_steps
from sfcd.models.train import train_model
from sfcd.paths import RunDir


def test_checkpoints_follow_the_schedule_and_log(test_run):
    run = RunDir(test_run.run_dir)
    expected = checkpoint_steps(24, log_until=8, every=8)
    assert run.model_steps() == expected == [0, 1, 2, 4, 8, 16, 24]
    rows = read_csv(run.train_log)
    assert [int(r["step"]) for r in rows] == expected
    assert int(rows[-1]["tokens"]) == 24 * test_run.train.batch_size * test_run.model.seq_len
    for task in TASKS:  # every built-in task, the harder ones included, in the log
        assert 0.0 <= float(rows[-1][f"{task}_accuracy"]) <= 1.0
    # the model learns: held-out loss falls from the uniform-ish start
    assert float(rows[-1]["heldout_loss"]) < float(rows[0]["heldout_loss"]) - 0.5


def test_checkpoint_loads_with_from_pretrained_and_gives_the_same_logits(test_run, tokenizer):
    run = RunDir(test_run.run_dir)
    x = torch.tensor([tokenizer("The uncle near the cars")["input_ids"]])
    hf = AutoModelForCausalLM.from_pretrained(str(run.model_step(24))).eval()
    ours = load_model(run.root, step=24)
    # the weights Lightning held at step 24 (its resumable state), loaded without unpickling code
    state = torch.load(run.train_state, map_location="cpu", weights_only=True)["state_dict"]
    live = AutoModelForCausalLM.from_config(hf.config).eval()
    live.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    with torch.no_grad():
        a, b, c = hf(x).logits, ours(x).logits, live(x).logits
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and a different step is a different model
    with torch.no_grad():
        assert not torch.allclose(load_model(run.root, step=8)(x).logits, a)


class Crash(Exception):
    pass


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


def test_resume_after_interruption_continues_from_the_last_checkpoint(test_run, tmp_path):
    cfg = compose(["experiment=test", f"run_dir={tmp_path / 'resumed'}"])
    run = RunDir(cfg.run_dir)
    with pytest.raises(Crash):
        train_model(cfg, callbacks=[CrashAt(12)])
    assert run.model_steps() == [0, 1, 2, 4, 8] and not run.train_done.exists()
    train_model(cfg)  # resumes from step 8
    assert run.train_done.exists()
    # identical to the uninterrupted run of the same config: weights and log
    ref = RunDir(test_run.run_dir)
    a = load_file(run.model_step(24) / "model.safetensors")
    b = load_file(ref.model_step(24) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    rows, ref_rows = read_csv(run.train_log), read_csv(ref.train_log)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for r, q in zip(rows, ref_rows, strict=True):
        assert float(r["heldout_loss"]) == pytest.approx(float(q["heldout_loss"]), abs=1e-5)
        assert float(r["train_loss"]) == pytest.approx(float(q["train_loss"]), abs=1e-5)


def test_complete_model_is_skipped_and_other_settings_refused(test_run):
    run = RunDir(test_run.run_dir)
    before = (run.model_step(24) / "model.safetensors").stat().st_mtime_ns
    train_model(test_run)
    assert (run.model_step(24) / "model.safetensors").stat().st_mtime_ns == before
    from sfcd.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        train_model(compose(["experiment=test", f"run_dir={run.root}", "train.lr=0.01"]))
