"""Synthetic activations with known features: sparse non-negative combinations of unit directions."""

from __future__ import annotations

import numpy as np
import torch


def make_data(n: int = 40_000, d: int = 32, n_dirs: int = 64, p: float = 0.04, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_dirs, generator=g) < p
    mags = 0.5 + torch.rand(n, n_dirs, generator=g)
    coefs = active * mags
    return (coefs @ dirs).numpy().astype(np.float32), dirs


def mmcs(dirs: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over the true directions of the best cosine with a decoder row."""
    w = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (dirs @ w.t()).max(dim=1).values.mean().item()
