"""ReLU SAE with Anthropic's April 2024 recipe: L1 weighted by decoder norms, warmed up; resampling of dead
features is done by the trainer (see :meth:`ReLUSAE.resample`)."""

from __future__ import annotations

import torch

from sfcd.sae.base import SAE, linear_warmup


class ReLUSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"
    apply_b_dec_to_input = False
    compiles = True  # dense: Inductor fuses the [B, d_sae] elementwise work around the matmuls (1.32x on the CPU)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        f = torch.relu(self.pre_acts(x))
        x_hat = f @ self.W_dec + self.b_dec
        per_token = (x_hat - x).pow(2).sum(-1)
        rec = per_token.mean()
        f_sum = f.sum(0)  # sum_i f_i ||W_dec,i|| summed over the batch, without a [batch, d_sae] product
        sparsity = f_sum @ self.W_dec.norm(dim=1) / x.shape[0]
        coeff = self.hparams["l1_coeff"] * linear_warmup(progress, self.hparams.get("l1_warmup", 0.05))
        with torch.no_grad():
            l0 = torch.count_nonzero(f) / x.shape[0]
        return {
            "loss": rec + coeff * sparsity,
            "mse": rec,
            "l1": sparsity,
            "l0": l0,
            "fired": f_sum.detach() > 0,
            "per_token_mse": per_token.detach(),
        }

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, x: torch.Tensor, per_token_loss: torch.Tensor, g: torch.Generator) -> None:
        """Anthropic-style: point dead features at inputs drawn with probability ~ loss^2."""
        n = int(dead.sum())
        if n == 0:
            return
        p = per_token_loss.pow(2)
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / len(p))
        # drawn on the CPU with the trainer's CPU generator: the same picks on any device
        picks = torch.multinomial(p.float().cpu(), n, replacement=True, generator=g).to(x.device)
        v = x[picks].to(self.W_dec.dtype) - self.b_dec
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.ones((), device=x.device)
        self.W_dec[dead] = v * 0.1
        self.W_enc[:, dead] = (v * enc_norm * 0.2).t()
        self.b_enc[dead] = 0.0
        self.tokens_since_fired[dead] = 0


class ReferenceReLUSAE(ReLUSAE):
    """The one-layer reference recipe (neelnanda-io/1L-Sparse-Autoencoder, ``utils.py``/``train.py``), step by step.

    - Start: ``W_enc`` [d_in, d_sae] then ``W_dec`` [d_sae, d_in] drawn with ``kaiming_uniform_`` (in that order,
      from a generator seeded with ``seed``: the reference's ``torch.manual_seed(seed)`` start), decoder rows then
      normalised, ``b_enc = b_dec = 0``. Encoder columns have norm ~ sqrt(2 d_in / d_sae) (0.5 at 8x).
    - Forward and loss: ``b_dec`` subtracted from the input; batch mean of the summed squared error plus
      ``l1_coeff`` x the sum over batch and features of ``|f|``; raw (unscaled) inputs.
    - Step: the gradient component along each decoder row removed, then the decoder renormalised, *before*
      Adam's step (so the next forward sees rows slightly off unit norm, as the reference's).
    - Resampling every ``resample_every`` steps: features whose density over ``resample_tokens`` fresh tokens is
      below ``resample_density`` (10^-5.5) get fresh kaiming encoder columns and decoder rows (full matrices
      drawn, the dead ones copied, decoder rows left unnormalised until the next step) and ``b_enc = 0``;
      Adam's state is kept. ``schedule_scale`` multiplies the two counts (one factor for a scaled-down run).
    """

    architecture = "relu_reference"
    saelens_architecture = "standard"
    apply_b_dec_to_input = True
    b_dec_at_median = False
    unit_norm_decoder = True
    normalize_input = False
    resample_criterion = "fresh_density"
    resample_resets_adam = False

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, **hparams):
        super().__init__(d_in, d_sae, seed=seed, **hparams)
        w_enc, w_dec = self.kaiming_pair(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            self.W_enc.copy_(w_enc)
            self.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True))

    def kaiming_pair(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's two draws, in its order: ``W_enc`` [d_in, d_sae] (bound sqrt(6 / d_sae)), then
        ``W_dec`` [d_sae, d_in] (bound sqrt(6 / d_in)); on the CPU, float32."""
        init = torch.nn.init.kaiming_uniform_
        w_enc = init(torch.empty(self.d_in, self.d_sae), generator=g)
        return w_enc, init(torch.empty(self.d_sae, self.d_in), generator=g)

    def resample_period(self) -> int:
        return round(int(self.hparams.get("resample_every") or 0) * float(self.hparams.get("schedule_scale", 1.0)))

    def resample_sample_tokens(self) -> int:
        return max(1, round(int(self.hparams["resample_tokens"]) * float(self.hparams.get("schedule_scale", 1.0))))

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        f = torch.relu(self.pre_acts(x))
        x_hat = f @ self.W_dec + self.b_dec
        acc = torch.promote_types(x_hat.dtype, torch.float32)  # the reference's .float(): at least float32
        per_token = (x_hat.to(acc) - x.to(acc)).pow(2).sum(-1)
        rec = per_token.mean()
        l1 = f.to(acc).sum()  # f >= 0: the sum of |f| over batch and features, as the reference
        with torch.no_grad():
            l0 = torch.count_nonzero(f) / x.shape[0]
        return {
            "loss": rec + self.hparams["l1_coeff"] * l1,
            "mse": rec,
            "l1": l1.detach() / x.shape[0],
            "l0": l0,
            "fired": f.detach().sum(0) > 0,
            "per_token_mse": per_token.detach(),
        }

    @torch.no_grad()
    def before_step(self) -> None:
        """The reference's order: project the decoder gradient, then renormalise the rows, then Adam steps."""
        super().before_step()
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, x: torch.Tensor, per_token_loss: torch.Tensor, g: torch.Generator) -> None:
        """The reference's ``re_init``: fresh kaiming matrices drawn whole on the CPU generator, the dead
        features' columns and rows copied in, ``b_enc`` zeroed; the optimiser's state is left alone."""
        idx = dead.nonzero().squeeze(1)
        if len(idx) == 0:
            return
        w_enc, w_dec = self.kaiming_pair(g)
        cpu = idx.cpu()
        self.W_enc[:, idx] = w_enc[:, cpu].to(self.W_enc)
        self.W_dec[idx] = w_dec[cpu].to(self.W_dec)
        self.b_enc[idx] = 0.0
        self.tokens_since_fired[idx] = 0
