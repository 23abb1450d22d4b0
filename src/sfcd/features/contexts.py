"""Context windows (tokens + the feature's activation on each) for selected firing positions, and the tokens
each feature's decoder direction promotes and suppresses through the unembedding (direct logit effect)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from sfcd.features.collect import feature_acts
from sfcd.models.sites import Site, architecture, site_module
from sfcd.sae.base import SAE


@torch.no_grad()
def windows_for(
    model,
    site: Site,
    sae: SAE,
    windows: np.ndarray,
    wanted: dict[int, list[tuple[int, int]]],
    left: int,
    right: int,
    batch: int = 16,
) -> dict[tuple[int, int], dict]:
    """For each feature f and flat position p in ``wanted[f]`` (as (p, tag)), the window of tokens around p in
    its sequence and f's activation on each. Only the sequences that hold a wanted position are rerun."""
    T = windows.shape[1]
    by_seq: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for f, items in wanted.items():
        for p, tag in items:
            if p >= 0:
                by_seq[p // T].append((f, p % T, tag))
    seqs = sorted(by_seq)
    out: dict[tuple[int, int], dict] = {}
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        x = torch.from_numpy(windows[chunk]).to(sae.W_enc.device)
        acts = feature_acts(model, site, sae, x).cpu()  # [b, T, F]
        for i, s in enumerate(chunk):
            for f, t, tag in by_seq[s]:
                lo, hi = max(0, t - left), min(T, t + right + 1)
                out[(f, tag)] = {"ids": windows[s, lo:hi].tolist(), "acts": acts[i, lo:hi, f].tolist(), "at": t - lo}
    return out


def unembedding(model) -> torch.Tensor:
    """[vocab, d_model] output embedding."""
    return model.get_output_embeddings().weight.detach()


def logit_effects(
    model, site: Site, sae: SAE, k: int = 10, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k promoted and suppressed token ids (and values) of each feature's decoder direction, read through
    the unembedding (after the MLP's output projection for ``mlp_act`` sites; the final layer norm is left out,
    as in the usual direct-logit-effect view). Returns (pos_ids, pos_vals, neg_ids, neg_vals), each [F, k].

    ``block`` features at a time: [block, vocab], never [F, vocab] (32,768 x 50,304 floats would be 6.6 GB)."""
    W = sae.W_dec.detach() / sae.scale  # [F, d_site] in raw units
    if site.kind == "mlp_act":
        mlp = site_module(model, Site(f"mlp.{site.layer}", "mlp", site.layer))
        proj = mlp.dense_4h_to_h if architecture(model) == "gpt_neox" else mlp.c_proj
        W = W @ (proj.weight.detach().t() if architecture(model) == "gpt_neox" else proj.weight.detach())
    U = unembedding(model).t()
    parts = []
    for b in range(0, W.shape[0], block):
        effects = W[b : b + block] @ U  # [block, vocab]
        pos, neg = effects.topk(k, dim=1), effects.topk(k, dim=1, largest=False)
        parts.append((pos.indices.cpu(), pos.values.cpu(), neg.indices.cpu(), neg.values.cpu()))
    return tuple(torch.cat(x) for x in zip(*parts, strict=True))
