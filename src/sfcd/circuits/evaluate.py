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


def ablation_values(model, dicts: dict[Site, nn.Module], batch: PairBatch, how: str, seed: int = 0) -> dict:
    """What an ablated node is set to, per site: (f, err) broadcastable to [B, T, ...]."""
    if how not in ABLATIONS:
        raise ConfigError(f"unknown ablation {how!r}; expected one of {list(ABLATIONS)}")
    source = batch.clean if batch.nopair else batch.patch
    vals = site_values(model, dicts, source)
    if how == "zero" or batch.nopair:
        return {s: (torch.zeros_like(f[:1]), torch.zeros_like(e[:1])) for s, (f, e) in vals.items()}
    if how == "mean":  # over the patch batch, per position
        return {s: (f.mean(0, keepdim=True), e.mean(0, keepdim=True)) for s, (f, e) in vals.items()}
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed)).to(source.device)
    return {s: (f[perm], e[perm]) for s, (f, e) in vals.items()}


@torch.no_grad()
def circuit_metric(
    model, dicts: dict[Site, nn.Module], batch: PairBatch, keep: dict[Site, tuple[torch.Tensor, bool]], ablation: dict
) -> torch.Tensor:
    """Per example, logit[clean answer] - logit[patch answer] (nopair: logit[answer]) on the clean input with
    each site's features outside ``keep[site][0]`` (bool [F]) and its error node (unless ``keep[site][1]``)
    set to their ablation values."""

    def setter(s: Site):
        mask, keep_err = keep[s]
        af, ae = ablation[s]

        def fn(f, err):
            f2 = torch.where(mask, f, af.expand_as(f))
            return f2, (err if keep_err else ae.expand_as(err))

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
        self.ablations = [ablation_values(model, dicts, b, ablation, seed) for b in batches]
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
        complement = {s: (~m, not e) for s, (m, e) in keep.items()}
        r = {"F_C": self._mean(keep), "F_M": self.F_M, "F_empty": self.F_empty, "F_M_minus_C": self._mean(complement)}
        denom = self.F_M - self.F_empty
        ok = abs(denom) > 1e-9
        r["faithfulness"] = (r["F_C"] - self.F_empty) / denom if ok else float("nan")
        r["completeness"] = (r["F_M_minus_C"] - self.F_empty) / denom if ok else float("nan")
        return r


def faithfulness(model, dicts, batches: list[PairBatch], keep: dict, ablation: str, seed: int = 0) -> dict[str, float]:
    """Faithfulness and completeness of one circuit (see :class:`Faithfulness`)."""
    return Faithfulness(model, dicts, batches, ablation, seed)(keep)
