"""Contrastive task files (JSON lines, the Sparse Feature Circuits format) and their loader.

A line: ``{"clean_prefix": "The uncle", "patch_prefix": "The uncles", "clean_answer": " has",
"patch_answer": " have", "case": "singular"}``. A line without ``patch_prefix``/``patch_answer`` is a
``nopair`` example. The loader keeps a pair only if every answer is one token and the clean and patch prefixes
have the same number of tokens, and reports how many it dropped and why.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sfcd.errors import InputError

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


@dataclass
class Task:
    """The usable pairs of one task file, and what the loader dropped."""

    name: str
    pairs: list[TaskPair]
    dropped: Counter = field(default_factory=Counter)

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
    task = Task(name, [])
    for row in rows:
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
        task.pairs.append(TaskPair(clean_ids, clean_answer, patch_ids, patch_answer, row.get("case", ""), row))
    return task


def load_task(path: str | Path, tokenizer, name: str | None = None) -> Task:
    """Read and filter one task file (ours or the paper's) and log what was dropped."""
    path = Path(path)
    task = tokenize_rows(name or path.stem, read_rows(path), tokenizer)
    log.info(task.summary())
    return task
