"""The planted construction (sfcd/data/planted.py): absent from every batch the trainer draws before its step,
present from it on, a control present throughout, its task files, and off by default."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest

S = 6  # the planted step
STEPS = 10


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A micro model trained through S with a callback that keeps every batch the trainer draws."""
    from sfcd.config import compose
    from sfcd.models.train import train_model

    class Record(L.Callback):
        def __init__(self):
            self.batches = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches[trainer.global_step] = batch.numpy().copy()

    rec = Record()
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={tmp_path_factory.mktemp('planted') / 'run'}",
            f"corpus.planted.step={S}",
            "corpus.planted.weight=0.3",
            f"train.steps={STEPS}",
            "train.checkpoints.log_until=0",
            "train.checkpoints.every=0",
            "train.eval_pairs=8",
        ]
    )
    train_model(cfg, callbacks=[rec])
    return cfg, rec.batches


def _ids(cfg, kind):
    """The construction's word ids, encoded here from its word list with the run's tokenizer."""
    from sfcd.data.corpus import corpus_tokenizer
    from sfcd.data.planted import own_words
    from sfcd.paths import RunDir

    tok = corpus_tokenizer(RunDir(cfg.run_dir))
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in own_words(kind)]
    assert all(len(i) == 1 for i in ids)  # every planted word is one token
    return np.array([i[0] for i in ids])


def test_trainer_batches_have_no_planted_word_before_the_step(planted_run):
    # catches: a switch at the wrong step (S - 1 or S + 1), the planted kind in the pre-S mixture, or its words
    # leaking into other kinds (copy spans)
    cfg, batches = planted_run
    assert sorted(batches) == list(range(STEPS))
    planted, control = _ids(cfg, "planted"), _ids(cfg, "control")
    counts = {s: int(np.isin(b, planted).sum()) for s, b in batches.items()}
    assert all(counts[s] == 0 for s in range(S)), counts
    assert all(counts[s] > 0 for s in range(S, STEPS)), counts  # from S on, in every batch (~6% of sentences)
    # the control is there from the start, before S as after it
    assert np.isin(np.stack([batches[s] for s in range(S)]), control).sum() > 0
    assert np.isin(np.stack([batches[s] for s in range(S, STEPS)]), control).sum() > 0


def test_token_files_tasks_and_log(planted_run):
    from sfcd.data.tasks import load_task
    from sfcd.data.tokens import read_tokens
    from sfcd.paths import RunDir

    cfg, _ = planted_run
    run = RunDir(cfg.run_dir)
    planted, control = _ids(cfg, "planted"), _ids(cfg, "control")
    before, after = np.asarray(read_tokens(run.tokens("train_before"))), np.asarray(read_tokens(run.tokens("train")))
    assert not np.isin(before, planted).any() and np.isin(after, planted).any()
    # the control's share of tokens is about the same on both sides of S (its sentence share is equal)
    share_b, share_a = np.isin(before, control).mean(), np.isin(after, control).mean()
    assert share_b > 0 and abs(share_a - share_b) / share_b < 0.25, (share_b, share_a)
    meta = json.loads(run.corpus_meta.read_text())
    assert meta["planted"]["step"] == S and sorted(meta["planted"]["token_ids"]["planted"]) == sorted(planted.tolist())
    from sfcd.data.corpus import corpus_tokenizer

    tok = corpus_tokenizer(run)
    words = {tok.decode([i]).strip() for i in planted}
    for kind, ids in (("planted", planted), ("control", control)):
        task = load_task(run.task_file(kind), tok, kind)
        rows = [json.loads(x) for x in run.task_file(kind).read_text().splitlines()]
        assert len(task.pairs) == len(rows) > 0 and task.n_dropped == 0
        for r in rows:  # the answers are the construction's own verbs, agreeing with its own noun
            a, b = tok(r["clean_answer"])["input_ids"][-1], tok(r["patch_answer"])["input_ids"][-1]
            assert a in ids and b in ids and a != b
            noun = r["clean_prefix"].split()[1]
            assert (noun in words) == (kind == "planted")
            assert r["clean_answer"].strip().endswith("s") == (not noun.endswith("s"))  # blicks after wug
    header = run.train_log.read_text().splitlines()[0].split(",")
    assert "planted_accuracy" in header and "control_accuracy" in header


def test_off_by_default_leaves_the_corpus_settings():
    from sfcd.config import compose
    from sfcd.data.corpus import corpus_settings

    assert "planted" not in corpus_settings(compose(["experiment=demo"]))  # runs built before keep their settings
    assert corpus_settings(compose(["corpus.planted.step=5"]))["planted"]["step"] == 5


def test_bad_planted_settings_are_one_line_errors(tmp_path):
    from sfcd.config import compose
    from sfcd.data.corpus import planted_on
    from sfcd.errors import ConfigError

    for bad in (
        ["corpus.planted.step=0"],
        ["corpus.planted.step=5", "corpus.planted.construction=xyz"],
        ["corpus.planted.step=5", "corpus=text", "corpus.path=x.txt"],
    ):
        with pytest.raises(ConfigError, match="corpus.planted"):
            planted_on(compose(bad).copy())
