"""Faithfulness and completeness: the metric with every node outside a circuit ablated, in one forward pass in
which downstream dictionaries re-encode the modified stream."""

from __future__ import annotations

import torch
from torch import nn

from sfcd.circuits.data import PairBatch
from sfcd.circuits.effects import site_values
from sfcd.circuits.splice import Splice, last_logits
from sfcd.errors import ConfigError
from sfcd.models.sites import Site

ABLATIONS = ("mean", "zero", "resample")


@torch.no_grad()
def mean_values(model, dicts: dict[Site, nn.Module], batches: list[PairBatch]) -> tuple[dict, dict]:
    """One mean (f, err) per site and position over every example of ``batches``: their patch prefixes, or the
    clean ones for tasks without patches. Positions are aligned from the start of the prefix (position t is
    averaged over the examples at least t + 1 tokens long), so the mean does not depend on how the examples are
    batched. Returns ({site: (f [T_max, F], err [T_max, d])}, a description of what was averaged)."""
    sums: dict[Site, list[torch.Tensor]] = {}
    count = torch.zeros(0)
    for b in batches:
        vals = site_values(model, dicts, b.clean if b.nopair else b.patch)
        T = b.clean.shape[1]
        for s, (f, e) in vals.items():
            acc = sums.setdefault(s, [f.new_zeros(0, f.shape[-1]), e.new_zeros(0, e.shape[-1])])
            for i, v in enumerate((f.sum(0), e.sum(0))):
                acc[i] = _grow(acc[i], T)
                acc[i][:T] += v
        count = _grow(count.to(b.clean.device), T)
        count[:T] += len(b)
    means = {s: (f / count[:, None], e / count[:, None]) for s, (f, e) in sums.items()}
    nopair = bool(batches) and batches[0].nopair
    info = {
        "kind": "mean",
        "over": "clean prefixes (the task has no patch prefixes)" if nopair else "patch prefixes",
        "n_examples": sum(len(b) for b in batches),
        "positions": "aligned from the start; position t averaged over the examples that reach it",
        "examples_per_position": [int(x) for x in count.tolist()],
    }
    return means, info


def _grow(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``n`` rows."""
    return t if len(t) >= n else torch.cat([t, t.new_zeros(n - len(t), *t.shape[1:])])


def ablation_values(
    model, dicts: dict[Site, nn.Module], batch: PairBatch, how: str, seed: int = 0, means: dict | None = None
) -> dict:
    """What an ablated node is set to, per site: (f, err) broadcastable to [B, T, ...]. ``mean`` uses
    ``means`` (from :func:`mean_values` over the whole evaluation set), cut to this batch's length."""
    if how not in ABLATIONS:
        raise ConfigError(f"unknown ablation {how!r}; expected one of {list(ABLATIONS)}")
    T = batch.clean.shape[1]
    if how == "mean":
        if means is None:
            means, _ = mean_values(model, dicts, [batch])
        return {s: (f[None, :T], e[None, :T]) for s, (f, e) in means.items()}
    source = batch.clean if batch.nopair else batch.patch
    vals = site_values(model, dicts, source)
    if how == "zero":
        return {s: (torch.zeros_like(f[:1]), torch.zeros_like(e[:1])) for s, (f, e) in vals.items()}
    # resample: another example's values (its patch prefix; the clean prefix when the task has none)
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed)).to(source.device)
    return {s: (f[perm], e[perm]) for s, (f, e) in vals.items()}


@torch.no_grad()
def circuit_metric(
    model, dicts: dict[Site, nn.Module], batch: PairBatch, keep: dict[Site, tuple[torch.Tensor, bool]], ablation: dict
) -> torch.Tensor:
    """Per example, logit[clean answer] - logit[patch answer] (nopair: logit[answer]) on the clean input with
    each site's features outside ``keep[site][0]`` (bool [F], or [T, F] per position) and its error node
    outside ``keep[site][1]`` (a bool, or bool [T] per position) set to their ablation values."""

    def setter(s: Site):
        mask, keep_err = keep[s]
        af, ae = ablation[s]
        ke = torch.as_tensor(keep_err, device=mask.device)
        ke = ke[:, None] if ke.ndim == 1 else ke  # per position: [T, 1] against err [B, T, d]

        def fn(f, err):
            return torch.where(mask, f, af.expand_as(f)), torch.where(ke, err, ae.expand_as(err))

        return fn

    sp = Splice(dicts, values={s: setter(s) for s in dicts})
    logits = last_logits(model, batch.clean, sp)
    rows = torch.arange(len(batch), device=logits.device)
    out = logits[rows, batch.clean_answer]
    if not batch.nopair:
        out = out - logits[rows, batch.patch_answer]
    return out


class Faithfulness:
    """F(C), F(M), F(empty), F(M \\ C) over evaluation batches; faithfulness and completeness.

    The ablation values and F(M), F(empty) are computed once; each circuit then costs two forward passes
    per batch."""

    def __init__(self, model, dicts, batches: list[PairBatch], ablation: str, seed: int = 0):
        self.model, self.dicts, self.batches = model, dicts, batches
        means, self.ablation_info = mean_values(model, dicts, batches) if ablation == "mean" else (None, {})
        if ablation != "mean":
            src = "clean" if batches and batches[0].nopair else "patch"
            self.ablation_info = {
                "kind": ablation,
                "over": "zeros" if ablation == "zero" else f"another example's {src} prefix, within its batch",
                "n_examples": sum(len(b) for b in batches),
            }
        self.ablations = [ablation_values(model, dicts, b, ablation, seed, means) for b in batches]
        dev = batches[0].clean.device if batches else "cpu"
        everything = {s: (torch.ones(d.d_sae, dtype=torch.bool, device=dev), True) for s, d in dicts.items()}
        nothing = {s: (torch.zeros(d.d_sae, dtype=torch.bool, device=dev), False) for s, d in dicts.items()}
        self.n = sum(len(b) for b in batches)
        self.F_M = self._mean(everything)
        self.F_empty = self._mean(nothing)

    def _mean(self, keep: dict) -> float:
        total = sum(
            circuit_metric(self.model, self.dicts, b, keep, a).sum().item()
            for b, a in zip(self.batches, self.ablations, strict=True)
        )
        return total / self.n

    def __call__(self, keep: dict) -> dict[str, float]:
        complement = {s: (~m, ~torch.as_tensor(e, device=m.device)) for s, (m, e) in keep.items()}
        r = {"F_C": self._mean(keep), "F_M": self.F_M, "F_empty": self.F_empty, "F_M_minus_C": self._mean(complement)}
        denom = self.F_M - self.F_empty
        ok = abs(denom) > 1e-9
        r["faithfulness"] = (r["F_C"] - self.F_empty) / denom if ok else float("nan")
        r["completeness"] = (r["F_M_minus_C"] - self.F_empty) / denom if ok else float("nan")
        return r


def faithfulness(model, dicts, batches: list[PairBatch], keep: dict, ablation: str, seed: int = 0) -> dict[str, float]:
    """Faithfulness and completeness of one circuit (see :class:`Faithfulness`)."""
    return Faithfulness(model, dicts, batches, ablation, seed)(keep)
