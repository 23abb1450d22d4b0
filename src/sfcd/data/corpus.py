"""The ``corpus`` stage: documents -> tokenizer -> token files, plus the task files of the built-in grammar.

Writes ``corpus/{train,val}.tokens`` (+ ``.json``), ``corpus/tokenizer/``, ``corpus/tasks/*.jsonl`` and, last,
``corpus/meta.json``, whose presence marks the corpus complete.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from sfcd.data import grammar, planted
from sfcd.data.sources import hf_documents, text_file_documents
from sfcd.data.tokenizer import load_tokenizer_dir, train_bpe
from sfcd.data.tokens import write_tokens
from sfcd.errors import ConfigError
from sfcd.io import read_json, write_json, write_jsonl
from sfcd.paths import RunDir

log = logging.getLogger(__name__)

KINDS = ("agreement", "text", "hf")
TOKENIZER_SAMPLE_DOCS = 20_000
#: the training tokens before the planted step (sfcd/data/planted.py): ``corpus/train_before.tokens``
BEFORE_SPLIT = "train_before"


def planted_on(cfg: DictConfig) -> bool:
    """Whether ``cfg`` plants a construction (corpus.planted.step set); checks the settings when it does."""
    p = cfg.corpus.get("planted")
    if p is None or p.step is None:
        return False
    if cfg.corpus.kind != "agreement":
        raise ConfigError(
            f"corpus.planted needs the built-in corpus (corpus=agreement), not corpus.kind={cfg.corpus.kind}; "
            "unset corpus.planted.step"
        )
    if p.construction not in planted.CONSTRUCTIONS:
        raise ConfigError(
            f"corpus.planted.construction={p.construction!r} is unknown; expected one of {list(planted.CONSTRUCTIONS)}"
        )
    if p.step < 1 or p.weight <= 0 or p.control_weight <= 0:
        raise ConfigError(
            f"corpus.planted needs step >= 1 and positive weights (got step={p.step}, weight={p.weight}, "
            f"control_weight={p.control_weight}); set them, or unset corpus.planted.step"
        )
    return True


def _documents(cfg: DictConfig, split: str) -> Iterator[str]:
    """``split``: train, val, or train_before (the training documents before the planted step)."""
    c = cfg.corpus
    if c.kind == "agreement":
        seed = c.seed + 1_000_003 if split == "val" else c.seed
        mixture = dict(c.mixture)
        if planted_on(cfg):
            before, after = planted.mixtures(mixture, c.planted.weight, c.planted.control_weight)
            mixture = before if split == BEFORE_SPLIT else after
        return grammar.documents(seed, mixture, tuple(c.sentences_per_doc), tuple(c.copy_len))
    if c.kind == "text":
        if not c.path:
            raise ConfigError("corpus=text needs corpus.path=<a .txt or .jsonl file>")
        return text_file_documents(c.path, c.text_field)
    if c.kind == "hf":
        if not c.dataset:
            raise ConfigError("corpus=hf needs corpus.dataset=<a Hugging Face datasets name>")
        return hf_documents(c.dataset, c.dataset_config, c.split, c.text_field)
    raise ConfigError(f"unknown corpus.kind {c.kind!r}; expected one of {list(KINDS)}")


def _tokenizer(cfg: DictConfig, run: RunDir, named=None):
    c = cfg.corpus
    if c.tokenizer or cfg.model.source:  # a model's tokenizer: loaded a floor up (sfcd.models.loading)
        if named is None:
            raise ConfigError(
                f"corpus.tokenizer / model.source name a tokenizer to load ({c.tokenizer or cfg.model.source}); "
                "build this corpus with `sfcd corpus`, or pass build_corpus(cfg, "
                "tokenizer=sfcd.models.loading.named_tokenizer(cfg))"
            )
        return named
    sample = list(itertools.islice(_documents(cfg, "train"), TOKENIZER_SAMPLE_DOCS))
    if not sample:
        raise ConfigError("the corpus is empty: its source gave no documents to train a tokenizer on")
    return train_bpe(sample, c.vocab_size)


def _token_chunks(docs: Iterator[str], tokenizer, batch: int = 512) -> Iterator[list[int]]:
    """Each document as ``[eos] + ids`` (documents are packed, separated by the end-of-text token)."""
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    while chunk := list(itertools.islice(docs, batch)):
        for enc in backend.encode_batch(chunk, add_special_tokens=False):
            yield [eos, *enc.ids]


def write_tasks(cfg: DictConfig, run: RunDir) -> dict[str, dict[str, int]]:
    """The agreement tasks (train/test JSON lines) and the induction task; returns the pair counts."""
    c, counts = cfg.corpus, {}
    for task in grammar.TASKS:
        pairs = grammar.task_pairs(task, c.task_pairs, c.seed)
        train, test = grammar.split_pairs(pairs, c.test_fraction, c.seed)
        write_jsonl(run.task_file(task, "train"), train)
        write_jsonl(run.task_file(task, "test"), test)
        counts[task] = {"train": len(train), "test": len(test)}
    if planted_on(cfg):
        for task in planted.TASKS:
            pairs = planted.task_pairs(task, c.task_pairs, c.seed)
            train, test = grammar.split_pairs(pairs, c.test_fraction, c.seed)
            write_jsonl(run.task_file(task, "train"), train)
            write_jsonl(run.task_file(task, "test"), test)
            counts[task] = {"train": len(train), "test": len(test)}
    spans = grammar.induction_spans(2 * c.induction_pairs, c.induction_len, c.seed)
    write_jsonl(run.task_file("induction", "train"), spans[: c.induction_pairs])
    write_jsonl(run.task_file("induction", "test"), spans[c.induction_pairs :])
    counts["induction"] = {"train": c.induction_pairs, "test": c.induction_pairs}
    return counts


def corpus_settings(cfg: DictConfig) -> dict:
    """The settings that determine the corpus; a rerun with other settings must use another run directory.
    ``planted`` is left out when off, so corpora built before it existed keep their settings."""
    settings = OmegaConf.to_container(cfg.corpus, resolve=True) | {"model_source": cfg.model.source}
    if not planted_on(cfg):
        settings.pop("planted", None)
    return settings


def build_corpus(cfg: DictConfig, tokenizer=None) -> RunDir:
    """Build the corpus of ``cfg.run_dir`` unless it is already complete with the same settings. ``tokenizer``:
    the tokenizer ``corpus.tokenizer`` or ``model.source`` names, loaded by the caller
    (:func:`sfcd.models.loading.named_tokenizer`); the built-in corpus trains its own."""
    run = RunDir(cfg.run_dir)
    settings = corpus_settings(cfg)
    if run.corpus_meta.exists():
        old = read_json(run.corpus_meta)["settings"]
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise ConfigError(
                f"{run.corpus} was built with other corpus settings (changed: {changed}); "
                f"use another run_dir, or delete {run.corpus} to rebuild it"
            )
        log.info("corpus in %s is complete; skipping", run.corpus)
        return run
    c = cfg.corpus
    log.info("building the %s corpus in %s", c.kind, run.corpus)
    tokenizer = _tokenizer(cfg, run, tokenizer)
    tokenizer.save_pretrained(str(run.tokenizer))
    vocab = len(tokenizer)
    n_val = write_tokens(run.tokens("val"), _token_chunks(_documents(cfg, "val"), tokenizer), vocab, c.val_tokens)
    if c.kind == "agreement":
        train_docs = _documents(cfg, "train")
    else:  # one stream: skip what went to the validation split
        train_docs = _skip_tokens(_documents(cfg, "train"), tokenizer, n_val)
    n_train = write_tokens(run.tokens("train"), _token_chunks(train_docs, tokenizer), vocab, c.n_tokens)
    n_tokens = {"train": n_train, "val": n_val}
    planted_meta = None
    if planted_on(cfg):
        docs = _documents(cfg, BEFORE_SPLIT)
        n_tokens[BEFORE_SPLIT] = write_tokens(
            run.tokens(BEFORE_SPLIT), _token_chunks(docs, tokenizer), vocab, c.n_tokens
        )
        planted_meta = {
            "step": c.planted.step,
            "construction": c.planted.construction,
            "before_file": run.tokens(BEFORE_SPLIT).name,
            "words": {k: planted.own_words(k) for k in planted.KINDS},
            "token_ids": {k: planted.own_token_ids(tokenizer, k) for k in planted.KINDS},
        }
    # the built-in tasks are text (tokenized with the run's tokenizer when loaded), so any corpus gets them:
    # with corpus=hf and Pythia's tokenizer they are the paper's agreement tasks for Pythia
    tasks = write_tasks(cfg, run)
    meta = {
        "settings": settings,
        "vocab_size": vocab,
        "n_tokens": n_tokens,
        "tasks": tasks,
    }
    if planted_meta:
        meta["planted"] = planted_meta
    write_json(run.corpus_meta, meta)
    log.info("corpus: %d train and %d held-out tokens, vocabulary %d", n_train, n_val, vocab)
    return run


def _skip_tokens(docs: Iterator[str], tokenizer, n: int) -> Iterator[str]:
    """Drop the documents whose tokens (with their separators) went into the first ``n`` tokens."""
    seen = 0
    for doc in docs:
        if seen >= n:
            yield doc
        else:
            seen += 1 + len(tokenizer.backend_tokenizer.encode(doc, add_special_tokens=False).ids)


def corpus_tokenizer(run: RunDir):
    """The tokenizer the corpus stage saved."""
    return load_tokenizer_dir(run.tokenizer)
