"""What ``train_log.csv`` records at each checkpoint: held-out loss, agreement and induction."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sfcd.data.tasks import Task


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, seq_len: int, n_batches: int, batch_size: int) -> float:
    """Mean next-token loss over fixed, evenly spaced windows of ``tokens``."""
    n = n_batches * batch_size
    span = len(tokens) - seq_len - 1
    starts = np.linspace(0, max(span, 0), n).astype(np.int64)
    losses = []
    for b in range(0, n, batch_size):
        idx = starts[b : b + batch_size, None] + np.arange(seq_len + 1)
        x = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64)).to(_device(model))
        logits = model(x[:, :-1]).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item())
    return float(np.mean(losses))


@torch.no_grad()
def last_logits(model, prefixes: list[tuple[int, ...]], batch_size: int = 256) -> torch.Tensor:
    """Logits at the last position of each prefix, batched by length (no padding needed)."""
    out = torch.empty(len(prefixes), model.config.vocab_size)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prefixes):
        groups[len(p)].append(i)
    for idx in groups.values():
        for b in range(0, len(idx), batch_size):
            chunk = idx[b : b + batch_size]
            x = torch.tensor([prefixes[i] for i in chunk], device=_device(model))
            out[chunk] = model(x).logits[:, -1].float().cpu()
    return out


@dataclass
class AgreementScore:
    accuracy: float  # share of prefixes (clean and patch) where the right answer outscores the wrong one
    logit_diff: float  # mean of logit[right] - logit[wrong] over the same prefixes


def agreement(model, task: Task, max_pairs: int | None = None) -> AgreementScore:
    """Score both prefixes of each pair: the clean answer should win on the clean prefix, the patch answer on
    the patch prefix. Accuracy and logit difference are averaged over those 2N trials."""
    pairs = [p for p in task.pairs if p.patch_ids is not None][:max_pairs]
    if not pairs:
        return AgreementScore(float("nan"), float("nan"))
    clean = last_logits(model, [p.clean_ids for p in pairs])
    patch = last_logits(model, [p.patch_ids for p in pairs])
    a = torch.tensor([p.clean_answer for p in pairs])
    b = torch.tensor([p.patch_answer for p in pairs])
    rows = torch.arange(len(pairs))
    diff = torch.cat([clean[rows, a] - clean[rows, b], patch[rows, b] - patch[rows, a]])
    return AgreementScore((diff > 0).float().mean().item(), diff.mean().item())


@torch.no_grad()
def induction_score(model, tokenizer, rows: list[dict], max_rows: int | None = None) -> float:
    """Mean loss on a span's second copy minus its first; negative means the model copies in context.

    Each row's ``span`` is read as ``BOS span span`` (the second copy after a space, as in the corpus's
    copy lines); each copy's first token is left out, since only later tokens can be copied.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    deltas = []
    for row in rows[:max_rows]:
        first = tokenizer(row["span"], add_special_tokens=False)["input_ids"]
        second = tokenizer(" " + row["span"].lstrip(), add_special_tokens=False)["input_ids"]
        if min(len(first), len(second)) < 3:
            continue
        x = torch.tensor([bos + first + second], device=_device(model))
        logp = F.log_softmax(model(x).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, x[0, 1:, None])[:, 0]  # nll[i] is the loss of token i + 1
        o, n = len(bos), len(first)
        deltas.append((nll[o + n : o + n + len(second) - 1].mean() - nll[o : o + n - 1].mean()).item())
    return float(np.mean(deltas)) if deltas else float("nan")
