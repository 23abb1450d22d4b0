"""Matching the features of two SAEs: by decoder cosine or by activation correlation.

One-to-one matching is a minimum-cost assignment on ``1 - similarity`` (scipy's sparse bipartite matching).
To stay fast at 32k x 32k features, each feature keeps its ``candidates`` most similar partners (found
block by block, in both directions) and a private "unmatched" option of similarity 0: pairs outside the
candidate lists count as similarity 0, which only matters for pairs far below the 0.7 sharing threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from sfcd.errors import InputError

SHARED = 0.7  # the cosine at which a matched pair counts as the same feature (Paulo & Belrose)


@dataclass
class Matching:
    """``match[i]``: the feature of B matched to feature i of A (-1: none); ``sim[i]`` its similarity."""

    match: np.ndarray
    sim: np.ndarray
    best: np.ndarray  # [Fa] max similarity of each A feature to any B feature (for MMCS)
    candidates: tuple[np.ndarray, np.ndarray, np.ndarray]  # (rows, cols, sims) of the candidate pairs

    @property
    def mmcs(self) -> float:
        return float(self.best.mean())

    def shared_fraction(self, threshold: float = SHARED) -> float:
        return float((self.sim >= threshold).mean())

    def above(self, threshold: float = SHARED) -> tuple[np.ndarray, np.ndarray]:
        """All candidate pairs (not just the one-to-one ones) with similarity >= threshold."""
        r, c, s = self.candidates
        keep = s >= threshold
        return r[keep], c[keep]


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _candidates(a: torch.Tensor, b: torch.Tensor, k: int, block: int = 4096):
    """Top-k similar pairs per row of a (against b) and per row of b (against a), from a @ b.T in blocks."""
    rows, cols, sims = [], [], []
    best = torch.empty(a.shape[0], device=a.device)
    for i in range(0, a.shape[0], block):
        s = a[i : i + block] @ b.t()
        best[i : i + block] = s.max(1).values
        v, j = s.topk(min(k, b.shape[0]), dim=1)
        rows.append((torch.arange(i, i + len(s), device=a.device)[:, None].expand_as(j)).flatten())
        cols.append(j.flatten())
        sims.append(v.flatten())
    for i in range(0, b.shape[0], block):
        s = b[i : i + block] @ a.t()
        v, j = s.topk(min(k, a.shape[0]), dim=1)
        rows.append(j.flatten())
        cols.append((torch.arange(i, i + len(s), device=a.device)[:, None].expand_as(j)).flatten())
        sims.append(v.flatten())
    best = best.cpu()
    r, c, s = (torch.cat(x).cpu().numpy() for x in (rows, cols, sims))
    key = r.astype(np.int64) * b.shape[0] + c  # de-duplicate pairs found from both sides
    _, first = np.unique(key, return_index=True)
    return best.numpy(), (r[first], c[first], s[first])


def assign(
    sim_rows: np.ndarray, sim_cols: np.ndarray, sims: np.ndarray, n_a: int, n_b: int, dense_limit: int = 4_000_000
) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of A's features on the candidate pairs (cost 1 - sim), each A
    feature also free to stay unmatched at cost 1. Up to ``dense_limit`` pairs: the Hungarian on the full
    matrix (non-candidates at similarity 0); above: the same problem as a sparse bipartite matching."""
    if n_a * n_b <= dense_limit:
        full = np.zeros((n_a, n_b))
        full[sim_rows, sim_cols] = sims
        r, c = linear_sum_assignment(1.0 - np.clip(full, 0, None))
        match = np.full(n_a, -1)
        match[r] = c
        sim = np.zeros(n_a)
        sim[r] = full[r, c]
        return match, sim
    cost = 1.0 - np.clip(sims, 0, None) + 1e-9  # explicit zeros would read as missing edges
    rows = np.concatenate([sim_rows, np.arange(n_a)])
    cols = np.concatenate([sim_cols, n_b + np.arange(n_a)])  # each A feature's own "unmatched" column
    data = np.concatenate([cost, np.full(n_a, 1.0 + 1e-9)])
    graph = csr_matrix((data, (rows, cols)), shape=(n_a, n_b + n_a))
    r, c = min_weight_full_bipartite_matching(graph)
    match = np.full(n_a, -1)
    sim = np.zeros(n_a)
    real = c < n_b
    match[r[real]] = c[real]
    lookup = {(int(i), int(j)): float(s) for i, j, s in zip(sim_rows, sim_cols, sims, strict=True)}
    sim[r[real]] = [lookup[(int(i), int(j))] for i, j in zip(r[real], c[real], strict=True)]
    return match, sim


def match_decoders(W_a: torch.Tensor, W_b: torch.Tensor, candidates: int = 8, device=None) -> Matching:
    """Match two SAEs' features by the cosine of their decoder rows ([F, d] each); the similarity blocks are
    computed on ``device`` (default: where ``W_a`` is), the assignment on the CPU."""
    if W_a.shape[1] != W_b.shape[1]:
        raise InputError(
            f"cannot match SAEs of input widths {W_a.shape[1]} and {W_b.shape[1]}: they read different sites"
        )
    device = W_a.device if device is None else device
    a, b = unit_rows(W_a.float().to(device)), unit_rows(W_b.float().to(device))
    best, cand = _candidates(a, b, candidates)
    match, sim = assign(*cand, len(a), len(b))
    return Matching(match, sim, best, cand)


def match_activations(acts_a: torch.Tensor, acts_b: torch.Tensor, candidates: int = 8) -> Matching:
    """Match by the correlation of the two SAEs' activations [N, F] on the same N tokens."""
    if acts_a.shape[0] != acts_b.shape[0]:
        raise InputError(f"activation samples of {acts_a.shape[0]} and {acts_b.shape[0]} tokens; use the same tokens")

    def standardise(x):
        x = x.float() - x.float().mean(0)
        return x / x.norm(dim=0).clamp_min(1e-8)

    a, b = standardise(acts_a).t().contiguous(), standardise(acts_b).t().contiguous()  # [F, N], unit rows
    best, cand = _candidates(a, b, candidates)
    match, sim = assign(*cand, len(a), len(b))
    return Matching(match, sim, best, cand)


@dataclass
class Presence:
    """Block-wise cosine statistics between two sets of decoder rows, in both directions: for each row, its
    largest cosine to any row of the other set and how many rows of the other set reach ``threshold``."""

    best_a: np.ndarray  # [Fa]
    count_a: np.ndarray  # [Fa]
    best_b: np.ndarray  # [Fb]
    count_b: np.ndarray  # [Fb]


@torch.no_grad()
def presence(W_a: torch.Tensor, W_b: torch.Tensor, threshold: float = SHARED, device=None, tile: int = 2**26):
    """:class:`Presence` of A's rows in B and B's rows in A, exactly (every pair, not only candidates), computed
    in [block x Fb] tiles of at most ``tile`` similarities (256 MB in float32) on ``device`` (default: where
    ``W_a`` is): memory is one tile, whatever the widths."""
    if W_a.shape[1] != W_b.shape[1]:
        raise InputError(
            f"cannot compare SAEs of input widths {W_a.shape[1]} and {W_b.shape[1]}: they read different sites"
        )
    device = W_a.device if device is None else device
    a, b = unit_rows(W_a.float().to(device)), unit_rows(W_b.float().to(device))
    best_a = torch.full((len(a),), -1.0, device=device)
    count_a = torch.zeros(len(a), dtype=torch.long, device=device)
    best_b = torch.full((len(b),), -1.0, device=device)
    count_b = torch.zeros(len(b), dtype=torch.long, device=device)
    if len(a) and len(b):
        block = max(1, tile // len(b))
        for i in range(0, len(a), block):
            s = a[i : i + block] @ b.t()
            best_a[i : i + block] = s.max(1).values
            hit = s >= threshold
            count_a[i : i + block] = hit.sum(1)
            best_b = torch.maximum(best_b, s.max(0).values)
            count_b += hit.sum(0)
    return Presence(*(x.cpu().numpy() for x in (best_a, count_a, best_b, count_b)))
