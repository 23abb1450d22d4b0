"""Reading a crosscoder's latents over checkpoints: relative decoder norms, each latent's lifecycle, decoder
cosines, Latent Scaling, and per-checkpoint reconstruction.

- **RelDec** (Bayazit et al.): ``r_i^m = ||W_dec,i^m|| / sum_m' ||W_dec,i^m'||`` (normalised units), binned as they
  do: ``< 0.3`` absent (0), ``0.3-0.7`` shared (1), ``> 0.7`` dominant (2) (``reldec_bin`` [m, K]). Their bins
  are for a pair of checkpoints; with K > 2 a latent shared evenly by all has ``r = 1/K`` (absent by the bins
  from K = 4 on), so the same bins are also applied to each adjacent pair, ``r = ||W^{m+1}|| / (||W^m|| +
  ||W^{m+1}||)`` (``pair_bin`` [m, K-1]: 0 m-dominant, 1 shared, 2 (m+1)-dominant).
- **Presence** (the relative-norm rule): latent i is present at checkpoint m when
  ``||W_dec,i^m|| >= presence * max_m' ||W_dec,i^m'||`` (relative to its own largest norm, so the rule does not
  depend on K).
- **Lifecycle**, from presence: ``onset`` (first present index), ``offset`` (last present index + 1; -1 when
  present at the last checkpoint; the same as ``died``), ``transient`` (absent at the first and at the last
  checkpoint, present between), ``gaps`` (absent checkpoints between two present ones), ``emerged`` (the first
  index from which it stays present to the last one; -1 when absent at the last) and ``died`` (kept names).
  Every latent has an onset, so transients count in the onset histogram.
- **Latent Scaling** (Minder et al. 2025; their ``closed_form_scalars.py``): per latent i and checkpoint m, with
  ``d_i`` the latent's decoder row at its strongest checkpoint, two least-squares scalars over tokens,
  ``beta^eps_i,m = argmin_b sum_x ||e^m(x) + f_i(x) W_dec,i^m - b f_i(x) d_i||^2`` (the reconstruction error with
  the latent's own term added back: complete shrinkage) and ``beta^r_i,m = argmin_b sum_x ||a_hat^m(x) -
  f_i(x) W_dec,i^m - b f_i(x) d_i||^2`` (the reconstruction without it: latent decoupling); the ratios
  ``nu^eps`` and ``nu^r`` divide by the strongest checkpoint's (NaN where that one is below 1e-6: no ratio). A
  latent absent at m by norm whose ``nu^eps`` there is large only *looks* exclusive: flagged. Sums are kept per
  block of batches (``blocks`` of them, batches assigned round-robin), so memory is fixed whatever the number of
  tokens, and the blocks are resampled for bootstrap intervals; ``support`` is the number of tokens on which each
  latent fired.
"""

from __future__ import annotations

import numpy as np
import torch

from sfcd.crosscoders.model import Crosscoder

#: emergence status codes
PERSISTS, DIES = "persists", "dies"


@torch.no_grad()
def decoder_stats(cc: Crosscoder, presence: float = 0.3) -> dict[str, torch.Tensor]:
    """Per latent: ``norms`` [m, K], ``rel`` (RelDec) [m, K], ``reldec_bin`` [m, K] and ``pair_bin`` [m, K-1]
    (Bayazit et al.'s bins: 0 absent, 1 shared, 2 dominant), ``present`` [m, K] bool, the lifecycle ``onset``,
    ``offset``, ``transient`` (bool), ``gaps`` (count), ``emerged`` (block index, -1 when not present at the last
    checkpoint), ``died`` (block index, -1 when it persists), ``cos_to_last`` and ``cos_to_prev`` [m, K] (decoder
    cosine of each checkpoint's direction to the last / previous one)."""
    norms = cc.decoder_norms().float().cpu()
    n, K = norms.shape
    rel = norms / norms.sum(1, keepdim=True).clamp_min(1e-12)
    pair = norms[:, 1:] / (norms[:, 1:] + norms[:, :-1]).clamp_min(1e-12)
    present = norms >= presence * norms.max(1, keepdim=True).values
    # emerged: the first index from which every later one is present
    suffix = present.flip(1).int().cumprod(1).flip(1).bool()  # suffix[i, k]: present at k..K-1
    emerged = torch.where(suffix[:, -1], suffix.int().argmax(1), torch.full((n,), -1))
    idx = torch.arange(K)
    last_present = torch.where(present, idx, -1).max(1).values
    first_present = torch.where(present, idx, K).min(1).values
    died = torch.where(present[:, -1], -1, last_present + 1)
    within = (idx >= first_present[:, None]) & (idx <= last_present[:, None])
    W = cc.W_dec.float().cpu().view(cc.d_sae, K, cc.d)
    unit = W / W.norm(dim=2, keepdim=True).clamp_min(1e-12)
    cos_last = (unit * unit[:, -1:]).sum(2)
    cos_prev = torch.ones_like(cos_last)
    cos_prev[:, 1:] = (unit[:, 1:] * unit[:, :-1]).sum(2)
    return {
        "norms": norms,
        "rel": rel,
        "reldec_bin": reldec_bins(rel),
        "pair_bin": reldec_bins(pair),
        "present": present,
        "onset": first_present,
        "offset": died.clone(),
        "transient": ~present[:, 0] & ~present[:, -1],
        "gaps": (within & ~present).sum(1),
        "emerged": emerged,
        "died": died,
        "cos_to_last": cos_last,
        "cos_to_prev": cos_prev,
    }


def reldec_bins(r: torch.Tensor) -> torch.Tensor:
    """Bayazit et al.'s bins of a relative decoder norm: 0 (< 0.3, absent), 1 (0.3-0.7, shared), 2 (> 0.7)."""
    return (r >= 0.3).long() + (r > 0.7).long()


class Accumulator:
    """Streaming per-checkpoint reconstruction metrics and Latent Scaling sums over batches of ``x`` [B, K*d]
    (raw activations), fed chunk by chunk: nothing grows with the number of tokens. Memory: ``blocks x d_sae x K``
    sums and one batch's ``[B, d_sae]`` latents (feed batches of a few thousand rows).

    Per checkpoint: the crosscoder's FVE, and the FVE of checkpoint m alone (:func:`sfcd.crosscoders.io.
    checkpoint_sae`: the other checkpoints at their mean activation; NaN when the crosscoder has no block means).
    Latent Scaling needs each latent's direction ``d_i`` (its decoder row at its strongest checkpoint), fixed once
    trained, so ``sum_x f_i(x) <e^m(x), d_i>`` and ``sum_x f_i(x) <a_hat^m(x), d_i>`` are summed directly
    ([d_sae, K] per block), not ``sum_x f_i(x) e^m(x)`` ([K, d_sae, d])."""

    def __init__(self, cc: Crosscoder, blocks: int = 20):
        self.cc, K, d, m = cc, cc.n_blocks, cc.d, cc.d_sae
        dev = cc.W_enc.device
        self.n, self.batches, self.blocks = 0, 0, max(1, int(blocks))
        self.sq_err = torch.zeros(K, dtype=torch.float64, device=dev)
        self.sq_err_alone = torch.zeros(K, dtype=torch.float64, device=dev)
        self.sum_x = torch.zeros(K, d, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros(K, dtype=torch.float64, device=dev)
        self.fired = torch.zeros(m, dtype=torch.long, device=dev)
        self.l0 = 0.0
        with torch.no_grad():
            W = cc.W_dec.detach().float().view(m, K, d)
            self.strongest = W.norm(dim=2).argmax(1)
            self.direction = W[torch.arange(m, device=dev), self.strongest]  # [m, d]
            self.w_dot_dir = (W * self.direction[:, None]).sum(2).double()  # <W_dec,i^k, d_i> [m, K]
            self.alone = (
                torch.stack([cc.alone_bias(k).detach().float() for k in range(K)]) if cc.has_block_means() else None
            )
        nb = self.blocks
        self.f_err = torch.zeros(nb, m, K, dtype=torch.float64, device=dev)  # sum_x f_i(x) <e^k(x), d_i>
        self.f_rec = torch.zeros(nb, m, K, dtype=torch.float64, device=dev)  # sum_x f_i(x) <a_hat^k(x), d_i>
        self.f_sq = torch.zeros(nb, m, dtype=torch.float64, device=dev)  # sum_x f_i(x)^2

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        cc, K, d = self.cc, self.cc.n_blocks, self.cc.d
        xs = x.to(cc.W_enc.device, torch.float32) * cc.scale
        f = cc.activation(torch.addmm(cc.b_enc, xs, cc.W_enc))
        rec = (f @ cc.W_dec + cc.b_dec).view(len(x), K, d)
        xb = xs.view(len(x), K, d)
        err = xb - rec
        b = self.batches % self.blocks
        self.batches += 1
        self.n += len(x)
        self.sq_err += err.double().pow(2).sum((0, 2))
        self.sum_x += xb.double().sum(0)
        self.sum_sq += xb.double().pow(2).sum((0, 2))
        active = f > 0
        self.fired += active.sum(0)
        self.l0 += float(active.sum())
        self.f_sq[b] += f.double().pow(2).sum(0)
        for k in range(K):
            blk = slice(k * d, (k + 1) * d)
            self.f_err[b, :, k] += (f * (err[:, k] @ self.direction.t())).sum(0, dtype=torch.float64)
            self.f_rec[b, :, k] += (f * (rec[:, k] @ self.direction.t())).sum(0, dtype=torch.float64)
            if self.alone is None:
                continue
            f_alone = cc.activation(torch.addmm(self.alone[k], xb[:, k], cc.W_enc[blk]))
            err_alone = xb[:, k] - (f_alone @ cc.W_dec[:, blk] + cc.b_dec[blk])
            self.sq_err_alone[k] += err_alone.double().pow(2).sum()

    def _total(self) -> torch.Tensor:
        return (self.sum_sq - self.sum_x.pow(2).sum(1) / max(1, self.n)).clamp_min(1e-12)

    def fve(self) -> list[float]:
        return (1 - self.sq_err / self._total()).tolist()

    def fve_alone(self) -> list[float | None]:
        """Each checkpoint's FVE alone (in the crosscoder's units; FVE does not depend on them); None without
        block means."""
        if self.alone is None:
            return [None] * self.cc.n_blocks
        return (1 - self.sq_err_alone / self._total()).tolist()

    def means(self) -> torch.Tensor:
        """[K, d]: each checkpoint's mean activation over the tokens seen, in raw units (the block means)."""
        return (self.sum_x / max(1, self.n) / self.cc.scale.double().view(self.cc.n_blocks, self.cc.d)).float()

    def _betas(self, f_err: torch.Tensor, f_rec: torch.Tensor, f_sq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """beta^eps, beta^r [..., m, K] from (summed) block sums; NaN where the latent never fired."""
        dd = self.direction.double().pow(2).sum(1)
        own = f_sq[..., None] * self.w_dot_dir  # sum_x f_i^2 <W_dec,i^k, d_i>
        den = (f_sq * dd)[..., None]
        den = torch.where(den > 0, den, torch.full_like(den, float("nan")))
        return (f_err + own) / den, (f_rec - own) / den

    def _ratio(self, beta: torch.Tensor) -> torch.Tensor:
        ref = beta.gather(-1, self.strongest.view(*([1] * (beta.ndim - 2)), -1, 1).expand(*beta.shape[:-1], 1))
        # a reference beta within float noise of zero (|beta| < 1e-6 of the latent's own scale) makes no ratio: NaN
        return beta / torch.where(ref.abs() >= 1e-6, ref, torch.full_like(ref, float("nan")))

    @torch.no_grad()
    def latent_scaling(self, resamples: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
        """Per latent and checkpoint: ``beta`` (= ``beta_eps``) and ``beta_r`` [d_sae, K], the ratios ``nu_eps`` and
        ``nu_r`` to the strongest checkpoint's, their bootstrap intervals ``*_lo``/``*_hi`` (2.5 and 97.5
        percentiles over ``resamples`` resamplings of the blocks with replacement; NaN where undefined), and
        ``support`` [d_sae] (tokens on which the latent fired). NaN for latents that never fired."""
        beta_eps, beta_r = self._betas(self.f_err.sum(0), self.f_rec.sum(0), self.f_sq.sum(0))
        out = {
            "beta": beta_eps,
            "beta_r": beta_r,
            "nu_eps": self._ratio(beta_eps),
            "nu_r": self._ratio(beta_r),
            "support": self.fired.clone(),
        }
        nb, m, K = self.blocks, self.cc.d_sae, self.cc.n_blocks
        g = torch.Generator().manual_seed(seed)
        draws = torch.randint(nb, (resamples, nb), generator=g)
        counts = torch.zeros(resamples, nb, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(resamples, nb, dtype=torch.float64)
        )
        counts = counts.to(self.f_sq.device)
        for key in ("nu_eps", "nu_r"):
            for end in ("lo", "hi"):
                out[f"{key}_{end}"] = torch.full((m, K), float("nan"), dtype=torch.float64)
        # latents per bootstrap chunk: [resamples, chunk, K] under 4M elements (memory, and torch.quantile's limit)
        chunk = max(1, (1 << 22) // max(1, resamples * K))
        for a in range(0, m, chunk):
            sl = slice(a, min(m, a + chunk))
            fe = torch.einsum("rb,bik->rik", counts, self.f_err[:, sl])
            fr = torch.einsum("rb,bik->rik", counts, self.f_rec[:, sl])
            fs = counts @ self.f_sq[:, sl]
            strongest, direction, wdd = self.strongest, self.direction, self.w_dot_dir
            self.strongest, self.direction, self.w_dot_dir = strongest[sl], direction[sl], wdd[sl]
            try:
                be, br = self._betas(fe, fr, fs)
                for key, b in (("nu_eps", self._ratio(be)), ("nu_r", self._ratio(br))):
                    q = torch.nanquantile(b, torch.tensor([0.025, 0.975], dtype=b.dtype, device=b.device), dim=0)
                    out[f"{key}_lo"][sl], out[f"{key}_hi"][sl] = q[0].cpu(), q[1].cpu()
            finally:
                self.strongest, self.direction, self.w_dot_dir = strongest, direction, wdd
        return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}


def summary(
    stats: dict[str, torch.Tensor],
    beta: torch.Tensor,
    live: torch.Tensor,
    steps: list[int],
    flag: float,
    scaling: dict[str, torch.Tensor] | None = None,
):
    """Per checkpoint: the share of live latents present there, exclusive to it, with their onset / offset there,
    emerged there, died there, in each RelDec bin; per adjacent pair, the shares in each pair bin; overall: shared
    by all, transients, latents with gaps, and the latents flagged by Latent Scaling (absent at a checkpoint by
    norm, but with ``beta`` there at least ``flag`` times the strongest checkpoint's), with support counts when
    ``scaling`` (:meth:`Accumulator.latent_scaling`) is given."""
    present, K = stats["present"][live], len(steps)
    n_live = max(1, int(live.sum()))
    strongest = stats["norms"].argmax(1)
    # Minder et al.'s nu_eps where the strongest checkpoint's beta is positive (no ratio, so no flag, elsewhere)
    ref = beta.gather(1, strongest[:, None])
    nu = scaling["nu_eps"] if scaling is not None else beta / ref.clamp_min(1e-12)
    beta_ratio = torch.where(ref > 0, nu, torch.full_like(beta, float("nan")))
    looks_exclusive = (~stats["present"]) & (beta_ratio >= flag) & live[:, None]
    bins = stats["reldec_bin"][live]
    pair = stats["pair_bin"][live]
    rows = []
    for k, s in enumerate(steps):
        rows.append(
            {
                "step": s,
                "present": float(present[:, k].float().mean()) if len(present) else 0.0,
                "exclusive": float((present[:, k] & (present.sum(1) == 1)).sum() / n_live),
                "onset_here": float((stats["onset"][live] == k).sum() / n_live),
                "offset_here": float((stats["offset"][live] == k).sum() / n_live),
                "emerged_here": float((stats["emerged"][live] == k).sum() / n_live),
                "died_here": float((stats["died"][live] == k).sum() / n_live),
                "reldec_absent": float((bins[:, k] == 0).sum() / n_live),
                "reldec_shared": float((bins[:, k] == 1).sum() / n_live),
                "reldec_dominant": float((bins[:, k] == 2).sum() / n_live),
                "absent_but_scaled": float(looks_exclusive[:, k].sum() / n_live),
            }
        )
    pairs = [
        {
            "steps": [steps[k], steps[k + 1]],
            "first_dominant": float((pair[:, k] == 0).sum() / n_live),
            "shared": float((pair[:, k] == 1).sum() / n_live),
            "second_dominant": float((pair[:, k] == 2).sum() / n_live),
        }
        for k in range(K - 1)
    ]
    out = {
        "n_live": int(live.sum()),
        "shared_by_all": float((present.sum(1) == K).sum() / n_live),
        "persist": float((stats["emerged"][live] >= 0).sum() / n_live),
        "die": float((stats["died"][live] >= 0).sum() / n_live),
        "transient": float(stats["transient"][live].sum() / n_live),
        "with_gaps": float((stats["gaps"][live] > 0).sum() / n_live),
        "flagged_by_latent_scaling": float(looks_exclusive.any(1).sum() / n_live),
        "per_checkpoint": rows,
        "adjacent_pairs": pairs,
    }
    if scaling is not None:
        sup = scaling["support"][live].double()
        q = (
            [float(v) for v in torch.quantile(sup, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))]
            if len(sup)
            else [0.0] * 3
        )
        out["latent_scaling_support"] = {
            "p10": q[0],
            "median": q[1],
            "p90": q[2],
            "min": float(sup.min()) if len(sup) else 0.0,
            "share_live_ge_100": float((sup >= 100).sum() / n_live),
        }
    return out


def emergence_counts(stats: dict[str, torch.Tensor], live: torch.Tensor, K: int) -> np.ndarray:
    """Live latents emerging (present from there to the last checkpoint) at each block index."""
    e = stats["emerged"][live]
    return np.bincount(e[e >= 0].numpy(), minlength=K)


def lifecycle_counts(stats: dict[str, torch.Tensor], live: torch.Tensor, K: int) -> dict[str, np.ndarray]:
    """Live latents per block index by ``onset`` (every latent: transients included) and by ``offset`` (those
    absent at the last checkpoint), and the transients by onset."""
    on, off, tr = stats["onset"][live], stats["offset"][live], stats["transient"][live]
    return {
        "onset": np.bincount(on.numpy(), minlength=K),
        "offset": np.bincount(off[off >= 0].numpy(), minlength=K),
        "transient_onset": np.bincount(on[tr].numpy(), minlength=K),
    }
