"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations; unit-norm decoder; AuxK on dead latents;
``b_dec`` initialised to the geometric median of a batch. The decoder and the backward pass use only the k
active latents (:mod:`sfcd.sae.sparse_ops`); ``sparse=False`` runs the dense reference computation."""

from __future__ import annotations

import torch
from torch import nn

from sfcd.sae.base import SAE, mse
from sfcd.sae.sparse_ops import ActiveLatents, dense_from_sparse, encoder_pre, gather_pre, sparse_decode, top_k


class TopKSAE(SAE):
    architecture = "topk"
    apply_b_dec_to_input = True
    unit_norm_decoder = True
    #: AuxK runs densely over the dead latents' columns when there are at most this many per kept slot: dense
    #: matmuls of B x n_dead x d run near the machine's matmul rate, the sparse kernels at a tenth of it or less
    dense_aux_ratio: int = 8
    #: whether AuxK cuts its slots to the most positive dead latents any row has (one read of the device a step
    #: while latents are dead): None, on the CPU, where a read is free and the slots cost time; elsewhere not, as a
    #: read is a host sync and the spare slots keep latents at or below 0, which add nothing (relu)
    aux_slots_read: bool | None = None

    @property
    def small_graph(self) -> bool:
        # the sparse path keeps [B, k], [B, d] and AuxK's [B, n_dead] tensors; the dense reference its [B, d_sae]
        # pre-activations
        return bool(self.hparams.get("sparse", True))

    @property
    def k(self) -> int:
        return int(self.hparams["k"])

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept latents' pre-activations and indices, both [B, k] (in no particular order)."""
        return top_k(pre, self.k)

    def training_loss(
        self, x: torch.Tensor, progress: float, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss terms on scaled inputs ``x``; ``target`` is what is reconstructed (``x`` itself for an SAE, the
        scaled MLP output for a transcoder, which also adds its skip path)."""
        y = x if target is None else target
        sparse = self.hparams.get("sparse", True)
        b_in = self.b_dec if self.apply_b_dec_to_input else None
        if sparse:
            with torch.no_grad():
                xc = x if b_in is None else x - b_in
                pre = encoder_pre(xc, self.W_enc, self.b_enc)
            picked, idx = self.select(pre)
            active = ActiveLatents(idx, self.d_sae, pre=picked)
            vals = torch.relu(gather_pre(x, self.W_enc, self.b_enc, active, pre, b_in, xc=xc))
            y_hat = sparse_decode(active, vals, self.W_dec) + self.b_dec
        else:
            xc = x if b_in is None else x - b_in
            pre = torch.addmm(self.b_enc, xc, self.W_enc)
            idx = self.select(pre.detach())[1]
            vals = torch.relu(pre.gather(1, idx))
            y_hat = dense_from_sparse(idx, vals, self.d_sae) @ self.W_dec + self.b_dec
        y_hat = self.add_skip(x, y_hat)
        rec = mse(y_hat, y)
        out = {"mse": rec, "l0": (vals > 0).float().sum(-1).mean(), "fired": fired_latents(idx, vals, self.d_sae)}
        aux = self.aux_loss(x, y, y_hat, pre, sparse)
        out["aux"] = aux
        out["loss"] = rec + self.hparams.get("aux_coeff", 1 / 32) * aux
        return out

    def add_skip(self, x: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """The reconstruction plus any path that bypasses the latents (none for an SAE; a transcoder's skip)."""
        return y_hat

    def aux_loss(self, x, y, y_hat, pre, sparse: bool) -> torch.Tensor:
        """AuxK (Gao et al. 2024, appendix B.1; as EleutherAI's sparsify): the top ``k_aux`` dead latents
        reconstruct the (detached) residual ``e = y - y_hat`` of the reconstruction (``x - x_hat``; a
        transcoder's ``y - y_hat``), encoding ``x``; ``e`` is formed only when some latent is dead. Returned in
        the main loss's units (squared error summed over dims, mean over the batch) times ``min(n_dead / k_aux,
        1)``, so ``mse + aux_coeff * aux`` weighs the two as sparsify's ``fvu + auxk_alpha * auxk_loss`` does
        (both of those are divided by the batch's centred variance ``sum ||x - mean(x)||^2``, which cancels in the
        ratio)."""
        dead = self.dead_latents(self.hparams.get("dead_tokens", 10_000_000))  # no host sync while none can be
        n_dead = len(dead)
        if n_dead == 0:
            return torch.zeros((), device=x.device)
        e = (y - y_hat).detach()
        k_aux = int(self.hparams.get("k_aux") or e.shape[-1] // 2)
        scale = min(n_dead / k_aux, 1.0)
        # the top k_aux among the dead latents' pre-activations only; a kept latent at or below 0 adds nothing to
        # e_hat and gets no gradient (relu), so no row needs more slots than its count of positive dead latents
        sub = pre.detach().index_select(1, dead)
        k_eff = min(k_aux, n_dead)
        if x.device.type == "cpu" if self.aux_slots_read is None else self.aux_slots_read:
            k_eff = min(k_eff, int((sub > 0).sum(1).max()))
        if k_eff == 0:
            return scale * e.pow(2).sum(-1).mean()
        local = top_k(sub, k_eff)[1]  # among the dead latents
        b_in = self.b_dec if self.apply_b_dec_to_input else None
        if sparse and n_dead <= self.dense_aux_ratio * k_eff:
            # the dead latents' own columns, densely: [B, n_dead] pre-activations, the kept ones decoded (their
            # encoder rows taken from the stored W_enc_T: whole rows, no copy of the rest, a gradient in its layout)
            pre_dead = nn.functional.linear(
                x if b_in is None else x - b_in, self.W_enc_T.index_select(0, dead), self.b_enc.index_select(0, dead)
            )
            keep = torch.zeros_like(pre_dead, dtype=torch.bool).scatter_(1, local, True)
            e_hat = (torch.relu(pre_dead) * keep) @ self.W_dec.index_select(0, dead)
            return scale * (e_hat - e).pow(2).sum(-1).mean()
        idx = dead[local]
        if sparse:
            active = ActiveLatents(idx, self.d_sae)
            vals = torch.relu(gather_pre(x, self.W_enc, self.b_enc, active, pre.detach(), b_in))
            e_hat = sparse_decode(active, vals, self.W_dec)
        else:
            vals = torch.relu(pre.gather(1, idx))
            e_hat = dense_from_sparse(idx, vals, self.d_sae) @ self.W_dec
        return scale * (e_hat - e).pow(2).sum(-1).mean()

    def export_extra(self):
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}, {}


def fired_latents(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Bool [d_sae]: the latents with a positive value in some row (kept on the device: no host sync)."""
    hits = torch.zeros(d_sae, dtype=torch.int32, device=idx.device)
    return hits.index_add_(0, idx.reshape(-1), (vals > 0).reshape(-1).to(torch.int32)) > 0


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
