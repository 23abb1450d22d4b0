"""Activation signatures: what each SAE feature fires on, over one fixed sample of held-out tokens, each checkpoint's
SAE reading its own model's activations there. Two features of two checkpoints are the same feature when their
signatures correlate (Pearson over the sample's positions), whatever the directions of their decoder rows.

Why not decoder cosine across checkpoints: the model's residual basis moves while it trains, so a feature that
keeps what it fires on can turn its decoder row, and two independently trained SAEs of a small dictionary place
their rows differently even on one checkpoint (measured on the planted benchmark: decoder matching carried 0-1 of
4-9 control features across two studied steps where the control was learned long before). What a feature fires
on is the thing a researcher names it by, and it is read on the same tokens at both checkpoints.

Signatures are sparse, as the activations of a sparse dictionary are (nonzeros = tokens x L0): at 32k features,
L0 32 and a sample of 2^18 tokens, ~130 MB per SAE (int64 positions, float64 values). Correlations are computed
block by block (a block of A's features densified and centred [block, N], B sparse), so no [F, N] dense matrix
and no [Fa, Fb] matrix is held: memory is the nonzeros and one tile, on the device of the work.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch

from sfcd.activations.harvest import harvest
from sfcd.models.sites import parse_site

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


class Signatures:
    """Activations of ``n_features`` features on the same ``n_tokens`` positions, one sparse CSR row per feature,
    with each row's mean, centred norm and number of firings over the positions (zeros included)."""

    def __init__(self, csr: torch.Tensor, n_tokens: int):
        self.csr = csr
        self.n_tokens = int(n_tokens)
        vals = csr.values()
        rows = torch.repeat_interleave(
            torch.arange(csr.shape[0], device=vals.device), csr.crow_indices().diff(), output_size=len(vals)
        )
        sums = torch.zeros(csr.shape[0], dtype=torch.float64, device=vals.device)
        sums.index_add_(0, rows, vals.double())
        sq = torch.zeros_like(sums).index_add_(0, rows, vals.double() ** 2)
        n = max(self.n_tokens, 1)
        self.mean = sums / n  # float64, as the values: correlation() centres the rows by it
        self.norm = (sq - n * self.mean**2).clamp_min(0).sqrt()  # || a - mean ||
        self.fires = torch.zeros(csr.shape[0], dtype=torch.long, device=vals.device).index_add_(
            0, rows, (vals != 0).long()
        )

    def __len__(self) -> int:
        return int(self.csr.shape[0])

    @property
    def device(self) -> torch.device:
        return self.csr.device

    def to(self, device) -> Signatures:
        return Signatures(self.csr.to(device), self.n_tokens)

    @classmethod
    def from_pieces(
        cls, feats: torch.Tensor, toks: torch.Tensor, vals: torch.Tensor, n_features: int, n_tokens: int
    ) -> Signatures:
        """From (feature, position, value) triplets, each (feature, position) once."""
        order = torch.argsort(feats * n_tokens + toks)
        feats, toks, vals = feats[order], toks[order], vals[order].double()  # float64: see correlation()
        crow = torch.zeros(n_features + 1, dtype=torch.long, device=feats.device)
        crow[1:] = (
            torch.zeros(n_features, dtype=torch.long, device=feats.device)
            .index_add_(0, feats, torch.ones_like(feats))
            .cumsum(0)
        )
        csr = _csr(crow, toks, vals, (n_features, n_tokens))
        return cls(csr, n_tokens)

    @classmethod
    def from_dense(cls, acts: torch.Tensor) -> Signatures:
        """From activations [N, F] (tests, small samples)."""
        t, f = torch.nonzero(acts, as_tuple=True)
        return cls.from_pieces(f, t, acts[t, f], acts.shape[1], acts.shape[0])

    def select(self, idx: np.ndarray | torch.Tensor) -> Signatures:
        """The signatures of features ``idx`` (in that order)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)  # numpy or a tensor on any device
        crow = self.csr.crow_indices()
        start, count = crow[idx], crow[idx + 1] - crow[idx]
        new_crow = torch.zeros(len(idx) + 1, dtype=torch.long, device=self.device)
        new_crow[1:] = count.cumsum(0)
        total = int(new_crow[-1])
        # each kept nonzero's position in the old arrays: its row's start plus its offset within the row
        owner = torch.repeat_interleave(torch.arange(len(idx), device=self.device), count, output_size=total)
        pos = start[owner] + torch.arange(total, device=self.device) - new_crow[:-1][owner]
        csr = _csr(new_crow, self.csr.col_indices()[pos], self.csr.values()[pos], (len(idx), self.n_tokens))
        return Signatures(csr, self.n_tokens)

    def dense_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` (``hi`` clipped to the rows there are) as a dense [rows, N] block (float64)."""
        hi = min(hi, len(self))
        crow = self.csr.crow_indices()
        a, b = int(crow[lo]), int(crow[hi])
        part = _csr(
            crow[lo : hi + 1] - a, self.csr.col_indices()[a:b], self.csr.values()[a:b], (hi - lo, self.n_tokens)
        )
        return part.to_dense()

    def block_rows(self, tile: int = 2**26) -> int:
        """How many rows of a dense float64 block fit the memory of ``tile`` float32s."""
        return max(1, tile // (2 * max(self.n_tokens, 1)))


def correlation(a: Signatures, b: Signatures, lo: int, hi: int) -> torch.Tensor:
    """Pearson correlation [hi - lo, len(b)] of A's features ``lo:hi`` with every feature of B over the shared
    positions; a feature that is constant on the sample (never fired) correlates 0 with everything."""
    if a.n_tokens != b.n_tokens:
        from sfcd.errors import InputError

        raise InputError(f"signatures on {a.n_tokens} and {b.n_tokens} tokens; read both on the same sample")
    hi = min(hi, len(a))
    # the covariance exactly as sum_t b_t (a_t - mean_a), in float64: the product of B with A's centred rows. The
    # usual dot(a, b) - n mean_a mean_b cancels catastrophically for a feature that fires nearly everywhere at a
    # nearly constant value (in float32 over 2^18 tokens such a feature's self-correlation came out at -3.8)
    dense = a.dense_rows(lo, hi) - a.mean[lo:hi, None]  # [h, N]
    cov = (b.csr @ dense.t()).t()  # [h, Fb]
    den = a.norm[lo:hi, None] * b.norm[None, :]
    corr = torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(cov))
    return corr.clamp(-1.0, 1.0).float()


def read_signatures(
    model,
    site: str,
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    windows: np.ndarray,
    exclude: Iterable[int] = (),
    batch: int = 32,
    rows: int = 4096,
) -> dict[str, Signatures]:
    """Each encoder's signatures on ``windows`` (the same positions for every call), read at ``site`` of
    ``model`` one batch of windows at a time and encoded ``rows`` positions at a time (the dense encoding is
    ``rows x d_sae``: 512 MB at 32k features, whatever the windows' length); the triplets are kept on the model's
    device."""
    s = parse_site(site, model)
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {k: [] for k in encoders}
    widths: dict[str, int] = {}
    n = 0
    with torch.no_grad():
        for out in harvest(model, windows, [s], batch, set(exclude)):
            acts = out[s.name]
            for lo in range(0, len(acts), rows):
                a = acts[lo : lo + rows]
                for name, enc in encoders.items():
                    f = enc(a).float()
                    widths[name] = f.shape[1]
                    t, j = torch.nonzero(f, as_tuple=True)
                    pieces[name].append((j, t + n, f[t, j]))
                n += len(a)
    return {
        name: Signatures.from_pieces(*(torch.cat(x) for x in zip(*p, strict=True)), widths[name], n)
        for name, p in pieces.items()
        if p
    }
