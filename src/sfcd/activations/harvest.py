"""Harvest a model's activations at several sites over a token file, one forward pass per batch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sfcd.models.sites import Site, run_with_cache


def token_windows(tokens: np.ndarray, seq_len: int, n_seqs: int, offset: int = 0) -> np.ndarray:
    """``n_seqs`` consecutive non-overlapping windows of ``seq_len`` tokens starting at ``offset``."""
    n_avail = (len(tokens) - offset) // seq_len
    n = min(n_seqs, n_avail)
    return np.asarray(tokens[offset : offset + n * seq_len], dtype=np.int64).reshape(n, seq_len)


def harvest(
    model,
    windows: np.ndarray,
    sites: list[Site],
    batch_size: int = 32,
    exclude_ids: set[int] | frozenset[int] = frozenset(),
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per batch of windows, ``{site: [n_tokens, d]}`` float32 activations (token rows in order).

    Positions whose token is in ``exclude_ids`` (e.g. BOS/EOS) are left out at every site alike.
    """
    excl = torch.tensor(sorted(exclude_ids), dtype=torch.long)
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            x = torch.from_numpy(windows[b : b + batch_size])
            acts = run_with_cache(model, x, sites)
            keep = ~torch.isin(x, excl).flatten() if len(excl) else None
            out = {}
            for s in sites:
                a = acts[s.name].flatten(0, 1).float()
                out[s.name] = a[keep] if keep is not None else a
            yield out
