"""Acausal crosscoders over K checkpoints (Lindsey et al. 2024): one latent vector per token, read from and
written to every checkpoint's activations at one site.

A crosscoder is an SAE on the K checkpoints' activations concatenated, ``x = [a^1, ..., a^K]`` (``d_in = K*d``):
``f = act(sum_m a^m W_enc^m + b_enc)`` is that SAE's encoder, and ``a_hat^m = f W_dec^m + b_dec^m`` its decoder read
block by block. What differs from an SAE is per block: each checkpoint is normalised by its own scale
(E||a^m|| = sqrt(d)), and the sparsity and the latent selection weigh a latent by the *sum* of its per-checkpoint
decoder norms (so a latent can live in some checkpoints only). So the stream, the Lightning loop, resume and DDP
are the SAE's (:class:`sfcd.sae.train.SAEModule`), with these classes as the dictionaries.

- :class:`BatchTopKCrosscoder` (the default; Minder et al. 2025): keep the ``k * batch`` largest
  ``relu(pre_i) * sum_m ||W_dec,i^m||`` over the batch; at inference a threshold on that score (the running mean
  of the smallest kept one) makes it a JumpReLU with per-latent threshold ``theta / sum_m ||W_dec,i^m||``.
  AuxK on dead latents as the TopK SAE, with ``k_aux = d / 2`` of one checkpoint's width ``d``.
- :class:`L1Crosscoder`: ReLU, loss ``sum_m ||a^m - a_hat^m||^2 + l1 * sum_i f_i sum_m ||W_dec,i^m||``.
"""

from __future__ import annotations

import math

import torch

from sfcd.sae.base import SAE, linear_warmup, mse
from sfcd.sae.batchtopk import BatchTopKSAE


class Crosscoder(BatchTopKSAE):
    """The shared part: K blocks of ``d`` inputs (``hparams["n_blocks"]``), a per-block input scale."""

    architecture = ""
    apply_b_dec_to_input = False
    unit_norm_decoder = False
    b_dec_at_median = False

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, **hparams):
        SAE.__init__(self, d_in, d_sae, seed, **hparams)
        K = self.n_blocks
        if K < 2 or d_in % K:
            raise ValueError(f"a crosscoder needs n_blocks >= 2 dividing d_in; got n_blocks={K}, d_in={d_in}")
        # each block's decoder row starts at norm dec_init_norm (Bayazit et al. 0.08), the encoder its transpose
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, K, self.d, generator=g)
        w = w / w.norm(dim=2, keepdim=True) * float(hparams.get("dec_init_norm", 0.08))
        with torch.no_grad():
            self.W_dec.copy_(w.reshape(d_sae, d_in))
            self.W_enc.copy_(w.reshape(d_sae, d_in).t())
        self.scale = torch.ones(d_in)  # per block, repeated over the block's d inputs (a buffer: replaced)
        self.register_buffer("threshold", torch.tensor(0.0))
        # each checkpoint's mean activation (raw units, [K*d]), measured after training (crosscoders/io.py saves it):
        # what "checkpoint m alone" puts in place of the other checkpoints' activations; NaN until known. Not in the
        # training state (persistent=False), so resumable states from before it load unchanged
        self.register_buffer("block_mean", torch.full((d_in,), float("nan")), persistent=False)

    @property
    def small_graph(self) -> bool:
        # one backward pass per crosscoder: the stage's memory plan (crosscoders/memory.py) counts one site's
        # working tensors of a step at a time; the L1 crosscoder's graph keeps its [B, d_sae] activations besides
        return False

    @property
    def n_blocks(self) -> int:
        return int(self.hparams["n_blocks"])

    @property
    def d(self) -> int:
        return self.d_in // self.n_blocks

    def block_scales(self) -> torch.Tensor:
        return self.scale.view(self.n_blocks, self.d)[:, 0]

    def fit_input_scale(self, sample: torch.Tensor) -> None:
        """Each checkpoint's scale from its own block of ``sample`` [n, K*d]: E||a^m * s_m|| = sqrt(d)."""
        norms = sample.view(len(sample), self.n_blocks, self.d).norm(dim=2).mean(0)
        if not torch.isfinite(norms).all() or (norms <= 0).any():
            raise ValueError(f"mean activation norms per checkpoint {norms.tolist()}; cannot scale them")
        self.scale.copy_((math.sqrt(self.d) / norms).repeat_interleave(self.d))

    def has_block_means(self) -> bool:
        return bool(torch.isfinite(self.block_mean).all())

    def alone_bias(self, m: int) -> torch.Tensor:
        """[d_sae]: ``b_enc + sum_{m' != m} E[a^{m'}] s_{m'} W_enc^{m'}``, checkpoint ``m``'s encoder bias when it is
        seen alone: every other checkpoint's term is replaced by its expectation over the crosscoder's data (so
        nothing token-specific from another checkpoint reaches m's latents). Needs :attr:`block_mean`."""
        if not self.has_block_means():
            from sfcd.errors import MissingArtifactError

            raise MissingArtifactError(
                "this crosscoder has no block means (block_means in its weights file: crosscoders trained before "
                "they were saved lack them), which checkpoint-alone views need; retrain it with `sfcd crosscoder`"
            )
        d, K = self.d, self.n_blocks
        mean = (self.block_mean * self.scale).view(K, d)
        enc = self.W_enc.view(K, d, self.d_sae)
        others = [j for j in range(K) if j != m]
        out = self.b_enc.detach().clone()
        for j in others:
            out = out + mean[j].to(enc.dtype) @ enc[j].detach()
        return out

    def decoder_norms(self) -> torch.Tensor:
        """[d_sae, K]: each latent's decoder norm at each checkpoint (in the normalised units it trains in)."""
        return self.W_dec.view(self.d_sae, self.n_blocks, self.d).norm(dim=2)

    def export(self):
        raise NotImplementedError("crosscoders are written by sfcd.crosscoders.io.save_crosscoder")


class BatchTopKCrosscoder(Crosscoder):
    architecture = "crosscoder_batchtopk"

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, **hparams):
        super().__init__(d_in, d_sae, seed, **hparams)
        # AuxK's dead latents: half of one checkpoint's width, as the published BatchTopK crosscoder
        # (bayazitdeniz/crosscoding-through-time, trainer.py: top_k_aux = d_in // 2 with d_in one model's width),
        # not half of K x d (the SAE default on the joined input), which would grow with K
        if not self.hparams.get("k_aux"):
            self.hparams["k_aux"] = self.d // 2

    def selection_score(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * self.decoder_norms().sum(1).detach()


class L1Crosscoder(Crosscoder):
    architecture = "crosscoder_l1"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        f = torch.relu(torch.addmm(self.b_enc, x, self.W_enc))
        x_hat = f @ self.W_dec + self.b_dec
        rec = mse(x_hat, x)
        sparsity = (f * self.decoder_norms().sum(1)).sum(-1).mean()
        coeff = float(self.hparams.get("l1_coeff", 2.0)) * linear_warmup(progress, self.hparams.get("l1_warmup", 0.05))
        return {
            "loss": rec + coeff * sparsity,
            "mse": rec,
            "l1": sparsity,
            "l0": (f > 0).float().sum(-1).mean(),
            "fired": (f > 0).any(0),
        }


CROSSCODERS: dict[str, type[Crosscoder]] = {"batchtopk": BatchTopKCrosscoder, "l1": L1Crosscoder}
