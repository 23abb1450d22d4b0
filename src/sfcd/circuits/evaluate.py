"""Faithfulness and completeness: the metric with every node outside a circuit ablated, in one forward pass in
which downstream dictionaries re-encode the modified stream."""

from __future__ import annotations

import math
import random

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
    """One mean (f, err) per prefix length, site and position over every example of ``batches`` of that length:
    their patch prefixes, or the clean ones for tasks without patches. An example is ablated to the mean of the
    examples of its own length (with one length, as the reference's shortest-length rule leaves, this is the
    paper's one mean over the evaluation set), so the mean does not depend on how the examples are batched.
    Returns ({length: {site: (f [T, F], err [T, d])}}, a description of what was averaged)."""
    sums: dict[int, dict[Site, list[torch.Tensor]]] = {}
    count: dict[int, int] = {}
    for b in batches:
        vals = site_values(model, dicts, b.clean if b.nopair else b.patch)
        T = b.clean.shape[1]
        here = sums.setdefault(T, {})
        for s, (f, e) in vals.items():
            acc = here.get(s)
            here[s] = [f.sum(0), e.sum(0)] if acc is None else [acc[0] + f.sum(0), acc[1] + e.sum(0)]
        count[T] = count.get(T, 0) + len(b)
    means = {T: {s: (f / count[T], e / count[T]) for s, (f, e) in here.items()} for T, here in sums.items()}
    nopair = bool(batches) and batches[0].nopair
    info = {
        "kind": "mean",
        "over": "clean prefixes (the task has no patch prefixes)" if nopair else "patch prefixes",
        "n_examples": sum(len(b) for b in batches),
        "positions": "per prefix length: an example of T tokens is ablated to the mean over the evaluation "
        "examples of T tokens, position by position",
        "examples_per_length": {str(T): n for T, n in sorted(count.items())},
    }
    return means, info


def resample_sources(lengths: list[int], seed: int) -> list[int]:
    """For each example i (of prefix length ``lengths[i]``), the example whose values it takes under resample
    ablation: drawn over the whole evaluation set among the examples of the same length (positions must align),
    seeded, and never i itself when its length has another example. A random cyclic order of each length's
    examples, each taking the next one's values: a derangement, and a function of the examples alone, not of how
    they are batched."""
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for i, T in enumerate(lengths):
        groups.setdefault(T, []).append(i)
    src = list(range(len(lengths)))
    for T in sorted(groups):
        g = groups[T]
        rng.shuffle(g)
        for k, i in enumerate(g):
            src[i] = g[(k + 1) % len(g)]
    return src


def ablation_values(
    model,
    dicts: dict[Site, nn.Module],
    batch: PairBatch,
    how: str,
    seed: int = 0,
    means: dict | None = None,
    source: torch.Tensor | None = None,
) -> dict:
    """What an ablated node is set to, per site: (f, err) broadcastable to [B, T, ...]. ``mean`` uses ``means``
    (from :func:`mean_values` over the whole evaluation set) for this batch's length; ``resample`` the values of
    ``source`` ([B, T] token ids: each example's source prefix, :func:`resample_sources`; when absent, a seeded
    derangement within this batch)."""
    if how not in ABLATIONS:
        raise ConfigError(f"unknown ablation {how!r}; expected one of {list(ABLATIONS)}")
    T = batch.clean.shape[1]
    if how == "mean":
        if means is None:
            means, _ = mean_values(model, dicts, [batch])
        return {s: (f[None], e[None]) for s, (f, e) in means[T].items()}
    own = batch.clean if batch.nopair else batch.patch
    if how == "zero":
        vals = site_values(model, dicts, own[:1])
        return {s: (torch.zeros_like(f[:1]), torch.zeros_like(e[:1])) for s, (f, e) in vals.items()}
    if source is None:
        source = own[resample_sources([T] * len(batch), seed)]
    return site_values(model, dicts, source)


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
    """F(C), F(M), F(empty), F(M \\ C) over evaluation batches; faithfulness and completeness where F(M) - F(empty)
    is resolvable.

    The ablation values and F(M), F(empty) are computed once; each circuit then costs two forward passes per
    batch. Faithfulness divides by F(M) - F(empty); where the model barely does the task that difference is
    noise, and the ratio means nothing. So it is reported only when the mean of the per-example differences
    d_i = M_i - empty_i is resolvable: mean d > ``z`` x its standard error (std(d) / sqrt(n), paired: the same
    examples under both) and mean d > ``floor`` (logits); one-sided, as a model that does the task worse than with
    everything ablated has no behaviour for a circuit to reproduce. Otherwise faithfulness and completeness are
    ``None`` and ``resolvable`` is false; the standard error is reported either way."""

    def __init__(
        self, model, dicts, batches: list[PairBatch], ablation: str, seed: int = 0, z: float = 3.0, floor: float = 0.05
    ):
        self.model, self.dicts, self.batches = model, dicts, batches
        if ablation not in ABLATIONS:
            raise ConfigError(f"unknown ablation {ablation!r}; expected one of {list(ABLATIONS)}")
        self.z, self.floor = z, floor
        means, self.ablation_info = mean_values(model, dicts, batches) if ablation == "mean" else (None, {})
        sources: list = [None] * len(batches)
        if ablation != "mean":
            src = "clean" if batches and batches[0].nopair else "patch"
            self.ablation_info = {
                "kind": ablation,
                "over": "features and error nodes at 0 (the site's output becomes the decoder bias)"
                if ablation == "zero"
                else f"another example's {src} prefix, of the same length, drawn over the whole evaluation set "
                "(a seeded derangement: never the example itself)",
                "n_examples": sum(len(b) for b in batches),
            }
        if ablation == "resample":
            own = [b.clean if b.nopair else b.patch for b in batches]
            rows = [r for o in own for r in o]  # every example's prefix, in the evaluation order
            src_of = resample_sources([len(r) for r in rows], seed)
            self.ablation_info |= {"seed": seed, "sources": src_of}
            at = 0
            for i, b in enumerate(batches):
                sources[i] = torch.stack([rows[j] for j in src_of[at : at + len(b)]])
                at += len(b)
        self.ablations = [
            ablation_values(model, dicts, b, ablation, seed, means, src)
            for b, src in zip(batches, sources, strict=True)
        ]
        dev = batches[0].clean.device if batches else "cpu"
        everything = {s: (torch.ones(d.d_sae, dtype=torch.bool, device=dev), True) for s, d in dicts.items()}
        nothing = {s: (torch.zeros(d.d_sae, dtype=torch.bool, device=dev), False) for s, d in dicts.items()}
        self.n = sum(len(b) for b in batches)
        self.M_i, self.empty_i = self.values(everything), self.values(nothing)
        self.F_M, self.F_empty = self.M_i.mean().item(), self.empty_i.mean().item()
        d = (self.M_i - self.empty_i).double()
        self.se = (d.std() / math.sqrt(self.n)).item() if self.n > 1 else math.nan
        # one-sided: the model must do the task better than with everything ablated; a model below its own
        # ablation (at or under chance) has no behaviour for a circuit to be faithful to
        diff = self.F_M - self.F_empty
        self.resolvable = bool(self.n > 1 and diff > self.z * self.se and diff > self.floor)

    def values(self, keep: dict) -> torch.Tensor:
        """The metric of each evaluation example with the nodes outside ``keep`` ablated: [n], in batch order."""
        return torch.cat(
            [
                circuit_metric(self.model, self.dicts, b, keep, a)
                for b, a in zip(self.batches, self.ablations, strict=True)
            ]
        )

    def _mean(self, keep: dict) -> float:
        return self.values(keep).mean().item()

    def resolution(self) -> dict:
        """What decides whether faithfulness is reported (see the class)."""
        return {
            "resolvable": self.resolvable,
            "F_M_minus_F_empty": self.F_M - self.F_empty,
            "F_M_minus_F_empty_se": self.se,
            "rule": f"F(M) - F(empty) > {self.z} x its paired standard error over the {self.n} examples and > "
            f"{self.floor}",
        }

    def __call__(self, keep: dict) -> dict:
        complement = {s: (~m, ~torch.as_tensor(e, device=m.device)) for s, (m, e) in keep.items()}
        r = {"F_C": self._mean(keep), "F_M": self.F_M, "F_empty": self.F_empty, "F_M_minus_C": self._mean(complement)}
        denom = self.F_M - self.F_empty
        r["faithfulness"] = (r["F_C"] - self.F_empty) / denom if self.resolvable else None
        r["completeness"] = (r["F_M_minus_C"] - self.F_empty) / denom if self.resolvable else None
        r["resolvable"] = self.resolvable
        r["F_M_minus_F_empty_se"] = self.se
        return r


def faithfulness(
    model,
    dicts,
    batches: list[PairBatch],
    keep: dict,
    ablation: str,
    seed: int = 0,
    z: float = 3.0,
    floor: float = 0.05,
) -> dict:
    """Faithfulness and completeness of one circuit (see :class:`Faithfulness`)."""
    return Faithfulness(model, dicts, batches, ablation, seed, z, floor)(keep)
