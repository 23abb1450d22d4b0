"""JumpReLU SAE (Rajamanoharan et al. 2024): f = z * H(z - theta), theta = exp(log_theta) per latent, trained
with straight-through estimators (rectangle kernel of bandwidth ``bandwidth``) and an L0 penalty."""

from __future__ import annotations

import torch

from sfcd.sae.base import SAE, linear_warmup, mse


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        gz = g * (z > theta)
        gtheta = (-(theta / ctx.eps) * _rect((z - theta) / ctx.eps) * g).sum(0)
        return gz, gtheta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return None, (-(1.0 / ctx.eps) * _rect((z - theta) / ctx.eps) * g).sum(0), None


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    apply_b_dec_to_input = False

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, **hparams):
        super().__init__(d_in, d_sae, seed, **hparams)
        init = float(hparams.get("threshold_init", 0.001))
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), init).log())  # kept in float32

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        eps = float(self.hparams.get("bandwidth", 0.001))
        z = torch.relu(self.pre_acts(x))
        theta = self.threshold
        f = _JumpReLU.apply(z, theta, eps)
        x_hat = f @ self.W_dec + self.b_dec
        rec = mse(x_hat, x)
        l0 = _Step.apply(z, theta, eps).sum(-1).mean()
        coeff = self.hparams["l0_coeff"] * linear_warmup(progress, self.hparams.get("l0_warmup", 0.05))
        return {"loss": rec + coeff * l0, "mse": rec, "l0": l0.detach(), "fired": (f > 0).any(0)}

    def export_extra(self):
        return {}, {"threshold": self.threshold.detach().clone()}
