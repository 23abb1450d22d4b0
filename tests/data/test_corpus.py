import json

import numpy as np
import pytest

from sfcd.config import compose
from sfcd.data.corpus import build_corpus, corpus_tokenizer
from sfcd.data.tokens import read_tokens
from sfcd.errors import ConfigError, InputError, OfflineError
from sfcd.models.loading import named_tokenizer
from sfcd.paths import RunDir


def test_agreement_corpus_tokens_decode_to_grammar_text(test_run, tokenizer):
    run = RunDir(test_run.run_dir)
    train, val = read_tokens(run.tokens("train")), read_tokens(run.tokens("val"))
    assert len(train) == test_run.corpus.n_tokens and len(val) == test_run.corpus.val_tokens
    assert train.dtype == np.uint16
    text = tokenizer.decode(np.asarray(train[:400]))
    assert text.startswith("<|endoftext|>")
    first_doc = text.split("<|endoftext|>")[1]
    for line in first_doc.split("\n"):  # a grammar sentence, or a copy line (a span repeated)
        words = line.split()
        half = len(words) // 2
        assert (line.startswith("The ") and line.endswith(".")) or words[:half] == words[half:], line
    assert not np.array_equal(np.asarray(train[:200]), np.asarray(val[:200]))  # different seeds


def test_text_corpus_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("alpha beta gamma.\nbeta gamma.\n\n\ndelta alpha.\n" * 1000)
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"body": f"doc {i} alpha beta"}) + "\n" for i in range(1000)))
    for path, extra in ((txt, []), (jl, ["corpus.text_field=body"])):
        cfg = compose(
            [
                "corpus=text",
                f"corpus.path={path}",
                f"run_dir={tmp_path / path.suffix[1:]}",
                "corpus.n_tokens=2000",
                "corpus.val_tokens=300",
                "corpus.vocab_size=300",
                *extra,
            ]
        )
        run = build_corpus(cfg)
        tok = corpus_tokenizer(run)
        train = read_tokens(run.tokens("train"))
        assert len(train) == 2000 and len(read_tokens(run.tokens("val"))) == 300
        assert "alpha" in tok.decode(np.asarray(train[:50]))
        # the built-in tasks come with every corpus (text, tokenized with the run's tokenizer when loaded)
        assert run.task_file("nounpp", "train").exists() and run.task_file("induction", "test").exists()


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    cfg = compose(["corpus=text", f"corpus.path={empty}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="corpus is empty"):
        build_corpus(cfg)
    assert not RunDir(tmp_path / "r").corpus_meta.exists()


def test_bad_jsonl_row_names_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    cfg = compose(["corpus=text", f"corpus.path={bad}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(InputError, match="line 2"):
        build_corpus(cfg)


def test_rebuilding_with_other_settings_is_refused(test_run):
    cfg = compose(["experiment=test", f"run_dir={test_run.run_dir}", "corpus.seed=5"])
    with pytest.raises(ConfigError, match=r"changed: \['seed'\]"):
        build_corpus(cfg)


def test_hf_dataset_offline_is_a_clear_error(test_run, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = RunDir(test_run.run_dir).tokenizer
    cfg = compose(
        ["corpus=hf", "corpus.dataset=some-org/some-dataset", f"corpus.tokenizer={tok}", f"run_dir={tmp_path / 'r'}"]
    )
    with pytest.raises(OfflineError, match="needs the network"):
        build_corpus(cfg, named_tokenizer(cfg))


def test_the_pythia_preset_streams_the_pile_and_says_so_offline(tmp_path, tokenizer):
    # catches: the preset training Pythia's SAEs on the agreement grammar; an offline run that fails with a
    # traceback or leaves a half-written corpus
    from sfcd.config import compose
    from sfcd.data.corpus import build_corpus
    from sfcd.errors import OfflineError
    from sfcd.models.presets import random_checkpoint

    src = random_checkpoint(tmp_path / "model", compose(["model=micro"]).model, tokenizer)
    cfg = compose(["experiment=pythia", f"run_dir={tmp_path / 'run'}", f"model.source={src}", "trainer=cpu"])
    assert cfg.corpus.kind == "hf" and cfg.corpus.dataset == "monology/pile-uncopyrighted"
    assert cfg.sae.d_sae == 32768 and cfg.sae.lr == pytest.approx(2e-4 / (32768 / 2**14) ** 0.5, rel=1e-3)
    with pytest.raises(OfflineError, match="monology/pile-uncopyrighted.*needs the network"):
        build_corpus(cfg, named_tokenizer(cfg))
    assert not (tmp_path / "run" / "corpus" / "meta.json").exists()


def test_a_named_tokenizer_is_loaded_a_floor_up_and_its_absence_said(tmp_path, test_run):
    # catches: the corpus (sfcd.data) loading a model's tokenizer itself (an import of sfcd.models, a floor up),
    # or silently training its own BPE when corpus.tokenizer names one
    from sfcd.config import compose
    from sfcd.errors import ConfigError

    tok = RunDir(test_run.run_dir).tokenizer
    cfg = compose(["experiment=test", f"corpus.tokenizer={tok}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="name a tokenizer to load"):
        build_corpus(cfg)
    run = build_corpus(cfg, named_tokenizer(cfg))
    assert (run.tokenizer / "tokenizer.json").read_text() == (tok / "tokenizer.json").read_text()
