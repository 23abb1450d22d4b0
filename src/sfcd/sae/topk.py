"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations; unit-norm decoder; AuxK on dead latents;
``b_dec`` initialised to the geometric median of a batch. The decoder and the backward pass use only the k
active latents (:mod:`sfcd.sae.sparse_ops`); ``sparse=False`` runs the dense reference computation."""

from __future__ import annotations

import torch

from sfcd.sae.base import SAE, mse
from sfcd.sae.sparse_ops import dense_from_sparse, gather_pre, sparse_decode


class TopKSAE(SAE):
    architecture = "topk"
    apply_b_dec_to_input = True
    unit_norm_decoder = True

    @property
    def k(self) -> int:
        return int(self.hparams["k"])

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """Indices [B, k] of the kept latents."""
        return pre.topk(self.k, dim=-1).indices

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        xc = x - self.b_dec if self.apply_b_dec_to_input else x
        sparse = self.hparams.get("sparse", True)
        if sparse:
            with torch.no_grad():
                pre = torch.addmm(self.b_enc, xc, self.W_enc)
            idx = self.select(pre)
            vals = torch.relu(gather_pre(xc, self.W_enc, self.b_enc, idx, pre))
            x_hat = sparse_decode(idx, vals, self.W_dec) + self.b_dec
        else:
            pre = torch.addmm(self.b_enc, xc, self.W_enc)
            idx = self.select(pre.detach())
            vals = torch.relu(pre.gather(1, idx))
            x_hat = dense_from_sparse(idx, vals, self.d_sae) @ self.W_dec + self.b_dec
        rec = mse(x_hat, x)
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[idx[vals > 0]] = True
        out = {"mse": rec, "l0": (vals > 0).float().sum(-1).mean(), "fired": fired}
        aux = self.aux_loss(x, xc, x_hat, pre, sparse)
        out["aux"] = aux
        out["loss"] = rec + self.hparams.get("aux_coeff", 1 / 32) * aux
        return out

    def aux_loss(self, x, xc, x_hat, pre, sparse: bool) -> torch.Tensor:
        """AuxK (Gao et al. 2024, appendix B.1; as EleutherAI's sparsify): the top ``k_aux`` dead latents
        reconstruct the residual ``e = x - x_hat``. Returned in the main loss's units (squared error summed over
        dims, mean over the batch) times ``min(n_dead / k_aux, 1)``, so ``mse + aux_coeff * aux`` weighs the two
        as sparsify's ``fvu + auxk_alpha * auxk_loss`` does (both of those are divided by the batch's centred
        variance ``sum ||x - mean(x)||^2``, which cancels in the ratio)."""
        dead = self.tokens_since_fired > self.hparams.get("dead_tokens", 10_000_000)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return torch.zeros((), device=x.device)
        k_aux = int(self.hparams.get("k_aux") or self.d_in // 2)
        scale = min(n_dead / k_aux, 1.0)
        masked = pre.detach().masked_fill(~dead, float("-inf"))
        idx = masked.topk(min(k_aux, n_dead), dim=-1).indices
        if sparse:
            vals = torch.relu(gather_pre(xc, self.W_enc, self.b_enc, idx, pre.detach()))
            e_hat = sparse_decode(idx, vals, self.W_dec)
        else:
            vals = torch.relu(pre.gather(1, idx))
            e_hat = dense_from_sparse(idx, vals, self.d_sae) @ self.W_dec
        e = (x - x_hat).detach()
        return scale * (e_hat - e).pow(2).sum(-1).mean()

    def export_extra(self):
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}, {}


class GroupMaxSAE(TopKSAE):
    """sparsify's ``groupmax`` activation (inference only): the ReLU'd pre-activations split into ``k`` contiguous
    groups of ``d_sae / k`` latents, each group keeping only its largest."""

    architecture = "groupmax"
    saelens_architecture = ""  # no SAELens counterpart

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        groups = torch.relu(pre).unflatten(-1, (self.k, -1))
        vals, idx = groups.max(dim=-1, keepdim=True)
        return torch.zeros_like(groups).scatter(-1, idx, vals).flatten(-2)

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError("groupmax SAEs are loaded from sparsify files, not trained by sfcd")
