"""ReLU SAE with Anthropic's April 2024 recipe: L1 weighted by decoder norms, warmed up; resampling of dead
features is done by the trainer (see :meth:`ReLUSAE.resample`)."""

from __future__ import annotations

import torch

from sfcd.sae.base import SAE, linear_warmup


class ReLUSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"
    apply_b_dec_to_input = False

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
    """The one-layer reference recipe (neelnanda-io/1L-Sparse-Autoencoder): b_dec subtracted from the input,
    unit-norm decoder with gradient projection, L1 on the sum over batch and features of |f| next to the batch
    mean of the summed squared error, raw (unscaled) inputs."""

    architecture = "relu_reference"
    saelens_architecture = "standard"
    apply_b_dec_to_input = True
    unit_norm_decoder = True
    normalize_input = False

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        f = torch.relu(self.pre_acts(x))
        x_hat = f @ self.W_dec + self.b_dec
        per_token = (x_hat - x).pow(2).sum(-1)
        rec = per_token.mean()
        l1 = f.sum()  # f >= 0: the sum of |f| over batch and features, as the reference
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
