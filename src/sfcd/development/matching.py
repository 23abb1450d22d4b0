"""Matching the features of two SAEs: by decoder cosine or by activation correlation.

Every function here takes features as either unit rows (a tensor [F, d]: decoder rows, similarity = cosine) or
:class:`~sfcd.development.signatures.Signatures` (activations on one token sample, similarity = Pearson
correlation); :func:`similarity_block` is the one place that tells them apart.

One-to-one matching is a minimum-cost assignment on ``1 - similarity``. Up to ``DENSE_PAIRS`` pairs it is
scipy's Hungarian on the full matrix (exact). Above, to stay fast at 32k x 32k features, each feature keeps its
``candidates`` most similar partners (found block by block, in both directions) and a private "unmatched"
option of similarity 0 (scipy's sparse bipartite matching): pairs outside the candidate lists count as
similarity 0. That changes the optimum's total a little, so a pair near the threshold can change partner (on
128 x 128 activation signatures, 8 candidates moved one of 18 matches >= 0.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from sfcd.development.signatures import Signatures, correlation
from sfcd.errors import InputError

DENSE_PAIRS = 4_000_000  # up to this many pairs, matching uses the full similarity matrix
SHARED = 0.7  # the similarity at which a matched pair is one feature (Paulo & Belrose's decoder cosine)


@dataclass
class Matching:
    """``match[i]``: the feature of B matched to feature i of A (-1: none); ``sim[i]`` its similarity."""

    match: np.ndarray
    sim: np.ndarray
    best: np.ndarray  # [Fa] max similarity of each A feature to any B feature (MMCS: their mean)
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


Features = Union[torch.Tensor, Signatures]  # noqa: UP007 (a runtime alias)


def similarity_block(a: Features, b: Features, lo: int, hi: int) -> torch.Tensor:
    """Similarities [hi - lo, len(b)] of A's features ``lo:hi`` with all of B's: the cosine of unit rows, or the
    correlation of signatures."""
    if isinstance(a, Signatures):
        return correlation(a, b, lo, hi)
    return a[lo:hi] @ b.t()


def block_size(a: Features, b: Features, tile: int = 2**26) -> int:
    """Rows of A per block: the similarity block [rows, len(b)] (and a signatures' dense rows) within ``tile``."""
    rows = tile // max(len(b), 1)
    if isinstance(a, Signatures):
        rows = min(rows, a.block_rows(tile))
    return max(1, rows)


def _device(x: Features):
    return x.device


def _candidates(a: Features, b: Features, k: int):
    """Top-k similar pairs per row of a (against b) and per row of b (against a), block by block."""
    if not len(a) or not len(b):  # nothing to pair
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(len(a)), (empty, empty, np.zeros(0, dtype=np.float32))
    rows, cols, sims = [], [], []
    best = torch.empty(len(a), device=_device(a))
    block = block_size(a, b)
    for i in range(0, len(a), block):
        s = similarity_block(a, b, i, i + block)
        best[i : i + block] = s.max(1).values if len(b) else 0.0
        v, j = s.topk(min(k, len(b)), dim=1)
        rows.append((torch.arange(i, i + len(s), device=_device(a))[:, None].expand_as(j)).flatten())
        cols.append(j.flatten())
        sims.append(v.flatten())
    block = block_size(b, a)
    for i in range(0, len(b), block):
        s = similarity_block(b, a, i, i + block)
        v, j = s.topk(min(k, len(a)), dim=1)
        rows.append(j.flatten())
        cols.append((torch.arange(i, i + len(s), device=_device(a))[:, None].expand_as(j)).flatten())
        sims.append(v.flatten())
    best = best.cpu()
    r, c, s = (torch.cat(x).cpu().numpy() for x in (rows, cols, sims))
    key = r.astype(np.int64) * len(b) + c  # de-duplicate pairs found from both sides
    _, first = np.unique(key, return_index=True)
    return best.numpy(), (r[first], c[first], s[first])


def assign(
    sim_rows: np.ndarray, sim_cols: np.ndarray, sims: np.ndarray, n_a: int, n_b: int, dense_limit: int = DENSE_PAIRS
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
    return match_features(*_on_device(W_a, W_b, device), candidates)


def match_activations(acts_a: torch.Tensor, acts_b: torch.Tensor, candidates: int = 8) -> Matching:
    """Match by the correlation of the two SAEs' activations [N, F] on the same N tokens."""
    if acts_a.shape[0] != acts_b.shape[0]:
        raise InputError(f"activation samples of {acts_a.shape[0]} and {acts_b.shape[0]} tokens; use the same tokens")
    return match_features(Signatures.from_dense(acts_a), Signatures.from_dense(acts_b), candidates)


def match_features(a: Features, b: Features, candidates: int = 8, dense_pairs: int = DENSE_PAIRS) -> Matching:
    """One-to-one matching of A's features to B's: decoder rows by cosine, signatures by correlation (on A's
    device); exact up to ``dense_pairs`` pairs, on ``candidates`` partners per feature above."""
    a, b = _on_device(a, b, None)
    if len(a) * len(b) <= dense_pairs:  # every pair is a candidate: the exact assignment
        candidates = max(candidates, len(a), len(b))
    best, cand = _candidates(a, b, candidates)
    match, sim = assign(*cand, len(a), len(b), dense_pairs)
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
def presence(W_a: Features, W_b: Features, threshold: float = SHARED, device=None, tile: int = 2**26):
    """:class:`Presence` of A's features in B and B's in A, exactly (every pair, not only candidates), computed
    in [block x Fb] tiles of at most ``tile`` similarities (256 MB in float32) on ``device`` (default: where
    ``W_a`` is): memory is one tile, whatever the widths. Decoder rows [F, d] (cosine) or signatures
    (correlation)."""
    a, b = _on_device(W_a, W_b, device)
    device = _device(a)
    best_a = torch.full((len(a),), -1.0, device=device)
    count_a = torch.zeros(len(a), dtype=torch.long, device=device)
    best_b = torch.full((len(b),), -1.0, device=device)
    count_b = torch.zeros(len(b), dtype=torch.long, device=device)
    if len(a) and len(b):
        block = block_size(a, b, tile)
        for i in range(0, len(a), block):
            s = similarity_block(a, b, i, i + block)
            best_a[i : i + block] = s.max(1).values
            hit = s >= threshold
            count_a[i : i + block] = hit.sum(1)
            best_b = torch.maximum(best_b, s.max(0).values)
            count_b += hit.sum(0)
    return Presence(*(x.cpu().numpy() for x in (best_a, count_a, best_b, count_b)))


def _on_device(W_a: Features, W_b: Features, device) -> tuple[Features, Features]:
    """Both sets on ``device`` (default: A's), decoder rows checked for one width and made unit."""
    device = _device(W_a) if device is None else device
    if isinstance(W_a, Signatures) or isinstance(W_b, Signatures):
        if not (isinstance(W_a, Signatures) and isinstance(W_b, Signatures)):
            raise InputError("cannot compare decoder rows with activation signatures; give both of one kind")
        return W_a.to(device), W_b.to(device)
    if W_a.shape[1] != W_b.shape[1]:
        raise InputError(
            f"cannot compare SAEs of input widths {W_a.shape[1]} and {W_b.shape[1]}: they read different sites"
        )
    return unit_rows(W_a.float().to(device)), unit_rows(W_b.float().to(device))
