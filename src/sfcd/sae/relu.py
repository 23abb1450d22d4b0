"""ReLU SAE with Anthropic's April 2024 recipe: L1 weighted by decoder norms, warmed up; resampling of dead
features is done by the trainer (see :meth:`ReLUSAE.resample`)."""

from __future__ import annotations

import torch

from sfcd.sae.base import SAE, decoder_norm_weighted_l1, linear_warmup, mse


class ReLUSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"
    apply_b_dec_to_input = False

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        f = torch.relu(self.pre_acts(x))
        x_hat = f @ self.W_dec + self.b_dec
        rec = mse(x_hat, x)
        sparsity = decoder_norm_weighted_l1(f, self.W_dec)
        coeff = self.hparams["l1_coeff"] * linear_warmup(progress, self.hparams.get("l1_warmup", 0.05))
        return {
            "loss": rec + coeff * sparsity,
            "mse": rec,
            "l1": sparsity,
            "l0": (f > 0).float().sum(-1).mean(),
            "fired": (f > 0).any(0),
            "per_token_mse": (x_hat - x).pow(2).sum(-1).detach(),
        }

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, x: torch.Tensor, per_token_loss: torch.Tensor, g: torch.Generator) -> None:
        """Anthropic-style: point dead features at inputs drawn with probability ~ loss^2."""
        n = int(dead.sum())
        if n == 0:
            return
        p = per_token_loss.pow(2)
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / len(p))
        picks = torch.multinomial(p, n, replacement=True, generator=g)
        v = x[picks] - self.b_dec
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        self.W_dec[dead] = v * 0.1
        self.W_enc[:, dead] = (v * enc_norm * 0.2).t()
        self.b_enc[dead] = 0.0
        self.tokens_since_fired[dead] = 0
