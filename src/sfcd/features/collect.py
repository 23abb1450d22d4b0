"""One streaming pass over held-out tokens collects, for every feature of an SAE: density, mean and max
activation, an activation histogram, its top-k activating positions and a random sample of its firings
(for contexts from lower quantiles). Memory is O(d_sae * (k + sample)), whatever the number of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sfcd.models.sites import Site, run_with_cache
from sfcd.sae.base import SAE

HIST_LO, HIST_HI, HIST_BINS = -3.0, 2.0, 50  # log10 activation bins


@dataclass
class FeatureStats:
    n_tokens: int
    counts: torch.Tensor  # [F] tokens on which the feature fires
    sums: torch.Tensor  # [F] summed activation
    maxs: torch.Tensor  # [F]
    hist: torch.Tensor  # [F, HIST_BINS] counts of log10 activation
    top_vals: torch.Tensor  # [F, k] (-inf where unfilled)
    top_pos: torch.Tensor  # [F, k] flat token positions
    sample_vals: torch.Tensor  # [F, R] a uniform random sample of firings
    sample_pos: torch.Tensor  # [F, R]

    @property
    def density(self) -> torch.Tensor:
        return self.counts.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> torch.Tensor:
        """Mean activation over the tokens where the feature fires."""
        return self.sums / self.counts.clamp_min(1)


def _merge_top(vals, pos, new_vals, new_pos, k):
    v = torch.cat([vals, new_vals], 1)
    p = torch.cat([pos, new_pos], 1)
    top = v.topk(k, dim=1)
    return top.values, p.gather(1, top.indices)


@torch.no_grad()
def feature_acts(model, site: Site, sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """[batch, seq, d_sae] feature activations of ``sae`` at ``site`` on token ids ``x``."""
    a = run_with_cache(model, x, [site])[site.name].float()
    return sae.encode(a)


@torch.no_grad()
def collect(
    model,
    site: Site,
    sae: SAE,
    windows: np.ndarray,
    top_k: int = 10,
    sample: int = 40,
    batch: int = 16,
    exclude_ids: set[int] = frozenset(),
    seed: int = 0,
    progress=None,
) -> FeatureStats:
    F = sae.d_sae
    dev = sae.W_enc.device  # the work's device (the model and the SAE are there); results come back on the CPU
    g = torch.Generator(dev).manual_seed(seed)
    counts = torch.zeros(F, dtype=torch.long, device=dev)
    sums, maxs = torch.zeros(F, dtype=torch.float64, device=dev), torch.zeros(F, device=dev)
    hist = torch.zeros(F * HIST_BINS, dtype=torch.long, device=dev)
    top_vals = torch.full((F, top_k), -float("inf"), device=dev)
    top_pos = torch.full((F, top_k), -1, dtype=torch.long, device=dev)
    s_keys = torch.full((F, sample), -float("inf"), device=dev)
    s_vals, s_pos = torch.zeros(F, sample, device=dev), torch.full((F, sample), -1, dtype=torch.long, device=dev)
    excl = torch.tensor(sorted(exclude_ids), dtype=torch.long, device=dev)
    T = windows.shape[1]
    n_tokens = 0
    for b in range(0, len(windows), batch):
        x = torch.from_numpy(windows[b : b + batch]).to(dev)
        acts = feature_acts(model, site, sae, x).flatten(0, 1)  # [N, F]
        if len(excl):
            acts[torch.isin(x.flatten(), excl)] = 0.0
            n_tokens += int((~torch.isin(x, excl)).sum())
        else:
            n_tokens += x.numel()
        pos = torch.arange(b * T, b * T + acts.shape[0], device=dev)
        firing = acts > 0
        counts += firing.sum(0)
        sums += acts.sum(0, dtype=torch.float64)
        maxs = torch.maximum(maxs, acts.max(0).values)
        rows, cols = firing.nonzero(as_tuple=True)
        if len(rows):
            v = acts[rows, cols]
            bins = ((v.log10() - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS).long().clamp(0, HIST_BINS - 1)
            hist += torch.bincount(cols * HIST_BINS + bins, minlength=F * HIST_BINS)
        kk = min(top_k, acts.shape[0])
        t = acts.topk(kk, dim=0)
        top_vals, top_pos = _merge_top(top_vals, top_pos, t.values.t(), pos[t.indices].t(), top_k)
        # reservoir sample: a random key per firing; the largest keys seen are a uniform sample of firings
        keys = torch.where(firing, torch.rand(acts.shape, generator=g, device=dev), -float("inf"))
        ks = keys.topk(min(sample, acts.shape[0]), dim=0)
        merged_keys = torch.cat([s_keys, ks.values.t()], 1)
        merged_vals = torch.cat([s_vals, acts.gather(0, ks.indices).t()], 1)
        merged_pos = torch.cat([s_pos, pos[ks.indices].t()], 1)
        best = merged_keys.topk(sample, dim=1).indices
        s_keys, s_vals, s_pos = merged_keys.gather(1, best), merged_vals.gather(1, best), merged_pos.gather(1, best)
        if progress is not None:
            progress.update(x.shape[0])
    s_vals = torch.where(torch.isfinite(s_keys), s_vals, torch.zeros_like(s_vals))
    s_pos = torch.where(torch.isfinite(s_keys), s_pos, torch.full_like(s_pos, -1))
    top_pos = torch.where(top_vals > 0, top_pos, torch.full_like(top_pos, -1))
    out = (counts, sums.float(), maxs, hist.view(F, HIST_BINS), top_vals.clamp_min(0), top_pos, s_vals, s_pos)
    return FeatureStats(n_tokens, *(t.cpu() for t in out))
