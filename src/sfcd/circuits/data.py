"""Task pairs as tensors: batches of equal-length clean/patch prefixes with their answer ids."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from sfcd.data.tasks import Task, TaskPair
from sfcd.errors import InputError


@dataclass
class PairBatch:
    clean: torch.Tensor  # [B, T]
    patch: torch.Tensor | None  # [B, T], None for nopair tasks
    clean_answer: torch.Tensor  # [B]
    patch_answer: torch.Tensor | None  # [B]

    @property
    def nopair(self) -> bool:
        return self.patch is None

    def __len__(self) -> int:
        return self.clean.shape[0]


def batches(
    task: Task,
    n: int,
    batch_size: int,
    same_length: bool = False,
    device: torch.device | str = "cpu",
    pairs: list[TaskPair] | None = None,
) -> list[PairBatch]:
    """Up to ``n`` pairs of ``task`` (or ``pairs``, chosen from it: :func:`sfcd.data.tasks.select_pairs`) in
    batches of one prefix length each, shortest first and in the pairs' order within a length, so that the
    examples' order does not depend on ``batch_size``; on ``device``. ``same_length`` (per-position aggregation)
    refuses pairs of several lengths, naming them."""
    pairs = task.pairs if pairs is None else pairs
    if not pairs:
        raise InputError(f"{task.summary()}: no usable pairs")
    nopair = {p.patch_ids is None for p in pairs}
    if len(nopair) > 1:
        raise InputError(f"task {task.name} mixes pairs with and without patch prefixes; split it into two files")
    groups: dict[int, list] = defaultdict(list)
    for p in pairs[:n]:
        groups[len(p.clean_ids)].append(p)
    if same_length and len(groups) > 1:
        found = ", ".join(f"{k} tokens ({len(v)} pairs)" for k, v in sorted(groups.items()))
        raise InputError(
            f"task {task.name}: per-position circuits (circuit.aggregation=none) need prefixes of one length, so "
            f"that position t is the same place in every example; found {found}. Use circuit.aggregation=sum, "
            "or a task file of one template"
        )
    out = []
    for _, pairs in sorted(groups.items()):
        for b in range(0, len(pairs), batch_size):
            chunk = pairs[b : b + batch_size]
            has_patch = chunk[0].patch_ids is not None
            out.append(
                PairBatch(
                    torch.tensor([p.clean_ids for p in chunk], device=device),
                    torch.tensor([p.patch_ids for p in chunk], device=device) if has_patch else None,
                    torch.tensor([p.clean_answer for p in chunk], device=device),
                    torch.tensor([p.patch_answer for p in chunk], device=device) if has_patch else None,
                )
            )
    return out


def metric(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """m per example: logit[patch answer] - logit[clean answer] (nopair: -logit[answer])."""
    rows = torch.arange(len(batch), device=logits.device)
    m = -logits[rows, batch.clean_answer]
    if not batch.nopair:
        m = m + logits[rows, batch.patch_answer]
    return m
