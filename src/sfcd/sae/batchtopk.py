"""BatchTopK SAE (Bussmann et al. 2024): keep the k * batch largest pre-activations across the batch; at
inference a threshold (running mean of the smallest kept activation) makes it a JumpReLU, and it is exported
as ``jumprelu``.

Candidates are each row's top ``candidate_mult * k`` latents (a row rarely holds more of the batch's top
k*B); the batch-level selection then runs over those candidates only.
"""

from __future__ import annotations

import torch

from sfcd.sae.base import extremes, mse
from sfcd.sae.sparse_ops import (
    ActiveLatents,
    dense_from_sparse,
    encoder_pre,
    gather_pre,
    kth_largest,
    sparse_decode,
    top_k,
)
from sfcd.sae.topk import TopKSAE, fired_latents


def _world() -> int:
    """Processes that share each global batch (DDP's ranks; 1 outside a process group)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, **hparams):
        super().__init__(d_in, d_sae, seed, **hparams)
        self.register_buffer("threshold", torch.tensor(0.0))

    def selection_score(self, pre: torch.Tensor) -> torch.Tensor:
        """What the batch's top ``k * batch`` is taken over, and the inference threshold applies to: the
        pre-activation (a crosscoder weighs it by its decoder norms)."""
        return pre

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (self.selection_score(pre) > self.threshold)

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        b_in = self.b_dec if self.apply_b_dec_to_input else None
        with torch.no_grad():
            xc = x if b_in is None else x - b_in
            pre = encoder_pre(xc, self.W_enc, self.b_enc)
            m = min(self.d_sae, int(self.hparams.get("candidate_mult", 4)) * self.k)
            # a row's candidates for the batch's top (unsorted: only the selection matters; on the CPU by groups)
            score = self.selection_score(pre)
            cand_vals, idx = top_k(score, m)
            flat = cand_vals.flatten()
            world = _world()
            if world > 1:  # DDP: the global batch's top k * B, from every rank's candidates, as one process takes it
                parts = [torch.empty_like(flat) for _ in range(world)]
                torch.distributed.all_gather(parts, flat.contiguous())
                flat = torch.cat(parts)
            n_keep = min(self.k * x.shape[0] * world, flat.numel())
            kth = kth_largest(flat, n_keep)
            keep = (cand_vals >= kth) & (cand_vals > 0)
        sparse = self.hparams.get("sparse", True)
        if sparse:
            active = ActiveLatents(idx, self.d_sae)
            vals = torch.relu(gather_pre(x, self.W_enc, self.b_enc, active, pre, b_in, xc=xc)) * keep
            x_hat = sparse_decode(active, vals, self.W_dec) + self.b_dec
        else:
            pre_g = (x if b_in is None else x - b_in) @ self.W_enc + self.b_enc
            vals = torch.relu(pre_g.gather(1, idx)) * keep
            x_hat = dense_from_sparse(idx, vals, self.d_sae) @ self.W_dec + self.b_dec
        with torch.no_grad():
            # all on the device (no host sync): the smallest kept score, inf when nothing is kept
            smallest = torch.where(keep, cand_vals, float("inf")).amin().to(self.threshold.dtype)
            if world > 1:  # the global batch's smallest kept score: every rank keeps the same threshold
                torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
            momentum = self.hparams.get("threshold_momentum", 0.99)
            moved = torch.where(self.threshold == 0, smallest, momentum * self.threshold + (1 - momentum) * smallest)
            # a batch with NaN or inf leaves the threshold alone (the step then stops on the check in training)
            ok = torch.cat([smallest.reshape(1).float(), extremes(x).float()]).isfinite().all()
            self.threshold.copy_(torch.where(ok, moved, self.threshold))
        rec = mse(x_hat, x)
        fired = fired_latents(idx, vals, self.d_sae)
        aux = self.aux_loss(x, x, x_hat, pre if sparse else pre_g, sparse)
        return {
            "loss": rec + self.hparams.get("aux_coeff", 1 / 32) * aux,
            "mse": rec,
            "aux": aux,
            "l0": (vals > 0).float().sum(-1).mean(),
            "fired": fired,
        }

    def export_extra(self):
        return {}, {"threshold": torch.full((self.d_sae,), float(self.threshold))}
