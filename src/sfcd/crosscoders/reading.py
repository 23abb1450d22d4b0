"""Reading a crosscoder's latents over checkpoints: relative decoder norms, emergence and death, decoder cosines,
Latent Scaling, and per-checkpoint reconstruction.

- **RelDec** (Bayazit et al.): ``r_i^m = ||W_dec,i^m|| / sum_m' ||W_dec,i^m'||`` (normalised units).
- **Presence**: latent i is present at checkpoint m when ``||W_dec,i^m|| >= presence * max_m' ||W_dec,i^m'||``
  (relative to its own largest norm, so the rule does not depend on K; with K = 2 and presence 0.3/0.7 this is
  close to Bayazit et al.'s bins). It **emerges** at the first checkpoint from which it is present to the last
  one, and **dies** at the first checkpoint after its last present one.
- **Latent Scaling** (Minder et al. 2025): per latent and checkpoint, the scalar ``beta_i^m`` that best explains
  checkpoint m's reconstruction error plus the latent's own contribution, ``e^m + f_i W_dec,i^m``, along
  ``f_i d_i`` (``d_i`` the latent's decoder direction at its strongest checkpoint), by least squares over tokens.
  A latent absent at m (small norm) whose ``beta^m`` is large next to its strongest checkpoint's only *looks*
  exclusive: flagged.
"""

from __future__ import annotations

import numpy as np
import torch

from sfcd.crosscoders.model import Crosscoder

#: emergence status codes
PERSISTS, DIES = "persists", "dies"


@torch.no_grad()
def decoder_stats(cc: Crosscoder, presence: float = 0.3) -> dict[str, torch.Tensor]:
    """Per latent: ``norms`` [m, K], ``rel`` (RelDec) [m, K], ``present`` [m, K] bool, ``emerged`` (block index,
    -1 when not present at the last checkpoint), ``died`` (block index, -1 when it persists), ``cos_to_last`` and
    ``cos_to_prev`` [m, K] (decoder cosine of each checkpoint's direction to the last / previous one)."""
    norms = cc.decoder_norms().float().cpu()
    K = norms.shape[1]
    rel = norms / norms.sum(1, keepdim=True).clamp_min(1e-12)
    present = norms >= presence * norms.max(1, keepdim=True).values
    # emerged: the first index from which every later one is present
    suffix = present.flip(1).int().cumprod(1).flip(1).bool()  # suffix[i, k]: present at k..K-1
    emerged = torch.where(suffix[:, -1], suffix.int().argmax(1), torch.full((len(norms),), -1))
    idx = torch.arange(K)
    last_present = torch.where(present, idx, -1).max(1).values
    died = torch.where(present[:, -1], -1, last_present + 1)
    W = cc.W_dec.float().cpu().view(cc.d_sae, K, cc.d)
    unit = W / W.norm(dim=2, keepdim=True).clamp_min(1e-12)
    cos_last = (unit * unit[:, -1:]).sum(2)
    cos_prev = torch.ones_like(cos_last)
    cos_prev[:, 1:] = (unit[:, 1:] * unit[:, :-1]).sum(2)
    return {
        "norms": norms,
        "rel": rel,
        "present": present,
        "emerged": emerged,
        "died": died,
        "cos_to_last": cos_last,
        "cos_to_prev": cos_prev,
    }


class Accumulator:
    """Streaming per-checkpoint reconstruction metrics and Latent Scaling sums over batches of ``x`` [B, K*d]
    (raw activations), fed chunk by chunk: nothing grows with the number of tokens. Memory: ``d_sae x K`` sums and
    one batch's ``[B, d_sae]`` latents (feed batches of a few thousand rows).

    Per checkpoint: the crosscoder's FVE, and the FVE of its block seen alone (:func:`sfcd.crosscoders.io.
    checkpoint_sae`: pre-activations ``a^m W_enc^m + b_enc`` without the other checkpoints' terms). Latent Scaling
    needs each latent's direction ``d_i`` (its decoder row at its strongest checkpoint), fixed once trained, so
    ``sum_x f_i(x) <e^m(x), d_i>`` is summed directly ([d_sae, K]), not ``sum_x f_i(x) e^m(x)`` ([K, d_sae, d])."""

    def __init__(self, cc: Crosscoder):
        self.cc, K, d, m = cc, cc.n_blocks, cc.d, cc.d_sae
        dev = cc.W_enc.device
        self.n = 0
        self.sq_err = torch.zeros(K, dtype=torch.float64, device=dev)
        self.sq_err_alone = torch.zeros(K, dtype=torch.float64, device=dev)
        self.sum_x = torch.zeros(K, d, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros(K, dtype=torch.float64, device=dev)
        self.fired = torch.zeros(m, dtype=torch.long, device=dev)
        self.l0 = 0.0
        with torch.no_grad():
            W = cc.W_dec.detach().float().view(m, K, d)
            self.direction = W[torch.arange(m, device=dev), W.norm(dim=2).argmax(1)]  # [m, d]
            self.w_dot_dir = (W * self.direction[:, None]).sum(2).double()  # <W_dec,i^k, d_i> [m, K]
        self.f_err = torch.zeros(m, K, dtype=torch.float64, device=dev)  # sum_x f_i(x) <e^k(x), d_i>
        self.f_sq = torch.zeros(m, dtype=torch.float64, device=dev)  # sum_x f_i(x)^2

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        cc, K, d = self.cc, self.cc.n_blocks, self.cc.d
        xs = x.to(cc.W_enc.device, torch.float32) * cc.scale
        f = cc.activation(torch.addmm(cc.b_enc, xs, cc.W_enc))
        err = (xs - (f @ cc.W_dec + cc.b_dec)).view(len(x), K, d)
        xb = xs.view(len(x), K, d)
        self.n += len(x)
        self.sq_err += err.double().pow(2).sum((0, 2))
        self.sum_x += xb.double().sum(0)
        self.sum_sq += xb.double().pow(2).sum((0, 2))
        active = f > 0
        self.fired += active.sum(0)
        self.l0 += float(active.sum())
        self.f_sq += f.double().pow(2).sum(0)
        for k in range(K):
            blk = slice(k * d, (k + 1) * d)
            self.f_err[:, k] += (f * (err[:, k] @ self.direction.t())).sum(0, dtype=torch.float64)
            f_alone = cc.activation(torch.addmm(cc.b_enc, xb[:, k], cc.W_enc[blk]))
            err_alone = xb[:, k] - (f_alone @ cc.W_dec[:, blk] + cc.b_dec[blk])
            self.sq_err_alone[k] += err_alone.double().pow(2).sum()

    def _total(self) -> torch.Tensor:
        return (self.sum_sq - self.sum_x.pow(2).sum(1) / max(1, self.n)).clamp_min(1e-12)

    def fve(self) -> list[float]:
        return (1 - self.sq_err / self._total()).tolist()

    def fve_alone(self) -> list[float]:
        """Each checkpoint's FVE from its block alone (in the crosscoder's units; FVE does not depend on them)."""
        return (1 - self.sq_err_alone / self._total()).tolist()

    @torch.no_grad()
    def latent_scaling(self) -> torch.Tensor:
        """``beta`` [d_sae, K] (NaN for latents that never fired): per latent i and checkpoint k, the least-squares
        ``argmin_b sum_x ||e^k(x) + f_i(x) W_dec,i^k - b f_i(x) d_i||^2``."""
        dd = self.direction.double().pow(2).sum(1)
        num = self.f_err + self.f_sq[:, None] * self.w_dot_dir
        beta = num / (self.f_sq[:, None] * dd[:, None])
        beta[self.f_sq == 0] = float("nan")
        return beta.float().cpu()


def summary(stats: dict[str, torch.Tensor], beta: torch.Tensor, live: torch.Tensor, steps: list[int], flag: float):
    """Per checkpoint: the share of live latents present there, exclusive to it, emerged there, died there;
    overall: shared by all, and the latents flagged by Latent Scaling (absent at a checkpoint by norm, but with
    ``beta`` there at least ``flag`` times the strongest checkpoint's)."""
    present, K = stats["present"][live], len(steps)
    n_live = max(1, int(live.sum()))
    strongest = stats["norms"].argmax(1)
    beta_ratio = beta / beta.gather(1, strongest[:, None]).clamp_min(1e-12)
    looks_exclusive = (~stats["present"]) & (beta_ratio >= flag) & live[:, None]
    rows = []
    for k, s in enumerate(steps):
        rows.append(
            {
                "step": s,
                "present": float(present[:, k].float().mean()) if len(present) else 0.0,
                "exclusive": float((present[:, k] & (present.sum(1) == 1)).sum() / n_live),
                "emerged_here": float((stats["emerged"][live] == k).sum() / n_live),
                "died_here": float((stats["died"][live] == k).sum() / n_live),
                "absent_but_scaled": float(looks_exclusive[:, k].sum() / n_live),
            }
        )
    return {
        "n_live": int(live.sum()),
        "shared_by_all": float((present.sum(1) == K).sum() / n_live),
        "persist": float((stats["emerged"][live] >= 0).sum() / n_live),
        "die": float((stats["died"][live] >= 0).sum() / n_live),
        "flagged_by_latent_scaling": float(looks_exclusive.any(1).sum() / n_live),
        "per_checkpoint": rows,
    }


def emergence_counts(stats: dict[str, torch.Tensor], live: torch.Tensor, K: int) -> np.ndarray:
    """Live latents emerging at each block index (the histogram's bars)."""
    e = stats["emerged"][live]
    return np.bincount(e[e >= 0].numpy(), minlength=K)
