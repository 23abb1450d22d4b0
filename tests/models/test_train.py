import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfcd.config import compose
from sfcd.data.grammar import TASKS
from sfcd.io import read_csv
from sfcd.models.loading import load_model
from sfcd.models.train import train_model
from sfcd.paths import RunDir


def direct_agreement(model, tokenizer, path, n_pairs: int) -> tuple[float, float]:
    """Accuracy and mean logit difference on the first ``n_pairs`` usable pairs of a task file, computed with plain
    transformers: the right verb's logit against the wrong one's at the last position, on the clean prefix and on
    the patch prefix (a pair is usable when both answers are one token and the prefixes have equal lengths)."""
    trials = []  # (prefix, right, wrong)
    for line in Path(path).read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "patch_prefix" not in row:
            continue
        answers = [tokenizer(row[k], add_special_tokens=False)["input_ids"] for k in ("clean_answer", "patch_answer")]
        clean, patch = (tuple(tokenizer(row[k])["input_ids"]) for k in ("clean_prefix", "patch_prefix"))
        if any(len(a) != 1 for a in answers) or len(clean) != len(patch):
            continue
        (a,), (b,) = answers
        trials += [(clean, a, b), (patch, b, a)]
        if len(trials) == 2 * n_pairs:
            break
    assert len(trials) == 2 * n_pairs, f"{path}: only {len(trials) // 2} usable pairs"
    last = {}  # the last position's logits of each distinct prefix, prefixes of one length in one batch
    for n in {len(p) for p, _, _ in trials}:
        prefixes = sorted({p for p, _, _ in trials if len(p) == n})
        with torch.no_grad():
            last |= dict(zip(prefixes, model(torch.tensor(prefixes)).logits[:, -1], strict=True))
    diffs = [float(last[p][right] - last[p][wrong]) for p, right, wrong in trials]
    return sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs)


def test_checkpoints_follow_the_schedule_and_log(test_run):
    """The checkpoints are the schedule written by hand (every step to 8 in powers of two, then every 8), the log
    has one row per checkpoint, and its accuracies at the last checkpoint are what plain transformers gives on the
    first train.eval_pairs usable pairs of each task file. Catches: a wrong schedule, the clean or patch trial
    scored the wrong way round, pairs other than the first usable ones, a column of another task."""
    run = RunDir(test_run.run_dir)
    assert run.model_steps() == [0, 1, 2, 4, 8, 16, 24]
    rows = read_csv(run.train_log)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 4, 8, 16, 24]
    assert [int(r["tokens"]) for r in rows] == [s * 16 * test_run.model.seq_len for s in (0, 1, 2, 4, 8, 16, 24)]
    assert {k.removesuffix("_accuracy") for k in rows[0] if k.endswith("_accuracy")} == set(TASKS)
    model = AutoModelForCausalLM.from_pretrained(str(run.model_step(24))).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run.model_step(24)))
    accuracies = []
    for task in TASKS:  # every built-in task, the harder ones included
        acc, diff = direct_agreement(model, tokenizer, run.task_file(task), test_run.train.eval_pairs)
        assert float(rows[-1][f"{task}_accuracy"]) == pytest.approx(acc, abs=1e-6), task
        assert float(rows[-1][f"{task}_logit_diff"]) == pytest.approx(diff, abs=1e-4), task
        accuracies.append(acc)
    assert len(set(accuracies)) > 2  # the tasks tell each other apart: a column copied across would not
    # the model learns: held-out loss falls from the uniform-ish start
    assert float(rows[-1]["heldout_loss"]) < float(rows[0]["heldout_loss"]) - 0.5


def test_checkpoint_loads_with_from_pretrained_and_gives_the_same_logits(test_run):
    run = RunDir(test_run.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(run.model_step(24)))
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
