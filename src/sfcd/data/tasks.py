"""Contrastive task files (JSON lines, the Sparse Feature Circuits format) and their loader.

A line: ``{"clean_prefix": "The uncle", "patch_prefix": "The uncles", "clean_answer": " has",
"patch_answer": " have", "case": "singular"}``. A line without ``patch_prefix``/``patch_answer`` is a
``nopair`` example. The loader keeps a pair only if every answer is one token and the clean and patch prefixes
have the same number of tokens, and reports how many it dropped and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sfcd.errors import ConfigError, InputError

log = logging.getLogger(__name__)

REQUIRED = ("clean_prefix", "clean_answer")


@dataclass(frozen=True)
class TaskPair:
    """One tokenized contrastive pair; ``patch_*`` are ``None`` for a nopair example."""

    clean_ids: tuple[int, ...]
    clean_answer: int
    patch_ids: tuple[int, ...] | None
    patch_answer: int | None
    case: str
    row: dict
    index: int = -1  # the row's place among the file's non-blank lines (0-based)


@dataclass
class Task:
    """The usable pairs of one task file, and what the loader dropped."""

    name: str
    pairs: list[TaskPair]
    dropped: Counter = field(default_factory=Counter)
    n_rows: int = 0  # lines read, before the filters
    file: str = ""  # the file read, and the sha256 of its bytes (what names the pairs)
    sha256: str = ""

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return f"task {self.name}: kept {len(self.pairs)} pairs, dropped {self.n_dropped} ({why})"


def read_rows(path: str | Path) -> list[dict]:
    """Read a JSON-lines task file; a malformed line raises :class:`InputError` with its line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"task file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}); expected one JSON object a line"
                ) from None
            if not isinstance(row, dict):
                raise InputError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in REQUIRED if not isinstance(row.get(k), str)]
            if missing:
                raise InputError(
                    f"{path}, line {lineno}: missing or non-string keys {missing}; "
                    f"a line needs {list(REQUIRED)} and optionally patch_prefix, patch_answer, case"
                )
            if ("patch_prefix" in row) != ("patch_answer" in row):
                raise InputError(f"{path}, line {lineno}: give both patch_prefix and patch_answer, or neither")
            rows.append(row)
    return rows


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def tokenize_rows(name: str, rows: list[dict], tokenizer) -> Task:
    """Apply the reference's filters to ``rows`` with ``tokenizer`` (special tokens added as the model expects)."""
    task = Task(name, [], n_rows=len(rows))
    for i, row in enumerate(rows):
        clean_answer = _single_token(tokenizer, row["clean_answer"])
        has_patch = "patch_prefix" in row
        patch_answer = _single_token(tokenizer, row["patch_answer"]) if has_patch else None
        if clean_answer is None or (has_patch and patch_answer is None):
            task.dropped["multi-token answer"] += 1
            continue
        clean_ids = tuple(tokenizer(row["clean_prefix"])["input_ids"])
        patch_ids = tuple(tokenizer(row["patch_prefix"])["input_ids"]) if has_patch else None
        if patch_ids is not None and len(patch_ids) != len(clean_ids):
            task.dropped["unequal prefix lengths"] += 1
            continue
        task.pairs.append(TaskPair(clean_ids, clean_answer, patch_ids, patch_answer, row.get("case", ""), row, i))
    return task


def load_task(path: str | Path, tokenizer, name: str | None = None) -> Task:
    """Read and filter one task file (ours or the paper's) and log what was dropped."""
    path = Path(path)
    task = tokenize_rows(name or path.stem, read_rows(path), tokenizer)
    task.file, task.sha256 = str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    log.info(task.summary())
    return task


#: the seed of the reference's ``load_examples`` (saprmarks/feature-circuits, data_loading_utils.py)
REFERENCE_SEED = 12
LENGTH_RULES = ("shortest", "all")


def select_pairs(
    task: Task, n: int, lengths: str = "shortest", seed: int = REFERENCE_SEED, rows: set[int] | None = None
) -> tuple[list[TaskPair], dict]:
    """Up to ``n`` usable pairs of ``task`` (only those whose row index is in ``rows``, when given), and what was
    kept and left.

    ``shortest`` is the reference's rule, saprmarks/feature-circuits ``data_loading_utils.py: load_examples``
    with ``use_min_length_only=True`` as ``circuit.py`` calls it: the file's lines shuffled by
    ``random.Random(seed).shuffle`` (seed 12 there), then read in that order; a pair shorter than every pair kept
    so far restarts the collection, a longer one is skipped, and reading stops at ``n`` pairs. So the kept length is
    the shortest among the lines read before ``n`` pairs of one length were found (usually the file's shortest;
    the same pairs the reference picks on the same file and tokenizer). ``all`` keeps every length: the first
    ``n`` usable pairs in the same shuffled order (the circuit stage then mean-ablates each length with its own
    mean)."""
    if lengths not in LENGTH_RULES:
        raise ConfigError(f"unknown circuit.lengths {lengths!r}; expected one of {list(LENGTH_RULES)}")
    order = list(range(task.n_rows))
    random.Random(seed).shuffle(order)  # the reference shuffles the file's lines before filtering them
    by_index = {p.index: p for p in task.pairs}
    candidates = [by_index[i] for i in order if i in by_index and (rows is None or i in rows)]
    kept: list[TaskPair] = []
    if lengths == "all":
        kept = candidates[:n]
    else:
        shortest = math.inf
        for p in candidates:
            if len(p.clean_ids) < shortest:  # a new shortest example: restart the collection
                kept, shortest = [], len(p.clean_ids)
            elif len(p.clean_ids) > shortest:
                continue
            kept.append(p)
            if len(kept) >= n:
                break
    have = Counter(len(p.clean_ids) for p in candidates)
    got = Counter(len(p.clean_ids) for p in kept)
    info = {
        "rule": lengths,
        "seed": seed,
        "candidates": len(candidates),
        "lengths_available": {str(k): v for k, v in sorted(have.items())},
        "lengths_kept": {str(k): v for k, v in sorted(got.items())},
        "kept": len(kept),
        "dropped_other_lengths": sum(v for k, v in have.items() if k not in got),
        "left_beyond_n": sum(v for k, v in have.items() if k in got) - len(kept),
    }
    return kept, info


def split_rows(task: Task, fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """A seeded split of ``task``'s usable pairs by row index: (discovery rows, evaluation rows), the evaluation
    part ``fraction`` of them (rounded, at least one of each when there are two or more pairs)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"circuit.eval_fraction={fraction} is out of range; expected a number between 0 and 1")
    idx = sorted(p.index for p in task.pairs)
    random.Random(f"sfcd-split-{seed}").shuffle(idx)
    k = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if len(idx) > 1 else 0
    return set(idx[k:]), set(idx[:k])
