"""JumpReLU SAE (Rajamanoharan et al. 2024): f = z * H(z - theta), theta = exp(log_theta) per latent, trained
with straight-through estimators (rectangle kernel of width ``bandwidth``) and an L0 penalty.

One autograd function computes f and the L0 together and backpropagates both in a few passes over the
[batch, d_sae] pre-activations (the threshold is positive, so no separate ReLU is needed).
"""

from __future__ import annotations

import torch

from sfcd.sae.base import SAE, linear_warmup, mse


class _JumpReLUWithL0(torch.autograd.Function):
    """Returns ``(f, l0, counts)``: ``f = z * (z > theta)``, ``l0`` = mean over rows of the number of active
    latents, ``counts`` = active rows per latent (no gradient).

    Pseudo-derivatives (rectangle kernel K of width eps): d f / d theta = -(theta / eps) K((z - theta) / eps),
    d l0 / d theta = -(1 / eps) K((z - theta) / eps) / batch; d f / d z = H(z - theta); d l0 / d z = 0.
    """

    @staticmethod
    def forward(ctx, z, theta, eps):
        # float masks and column sums: on the CPU, bool tensors' casts and reductions cost more than the math
        d = z - theta
        mask = (d > 0).to(z.dtype)
        counts = mask.sum(0)
        ctx.save_for_backward(d, theta, mask)
        ctx.eps = eps
        ctx.mark_non_differentiable(counts)
        return z * mask, counts.sum() / z.shape[0], counts

    @staticmethod
    def backward(ctx, g_f, g_l0, _):
        d, theta, mask = ctx.saved_tensors
        eps, batch = ctx.eps, d.shape[0]
        near = (d.abs_() < eps / 2).to(d.dtype)  # K((z - theta) / eps); d is not needed after this
        g_theta = -(theta / eps) * (near * g_f).sum(0) - (g_l0 / (batch * eps)) * near.sum(0)
        return g_f * mask, g_theta, None


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    apply_b_dec_to_input = False

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, **hparams):
        super().__init__(d_in, d_sae, seed, **hparams)
        init = float(hparams.get("threshold_init", 0.5))
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), init).log())  # kept in float32

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def training_loss(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        eps = float(self.hparams.get("bandwidth", 0.05))
        f, l0, counts = _JumpReLUWithL0.apply(self.pre_acts(x), self.threshold, eps)
        rec = mse(f @ self.W_dec + self.b_dec, x)
        coeff = self.hparams["l0_coeff"] * linear_warmup(progress, self.hparams.get("l0_warmup", 0.05))
        return {"loss": rec + coeff * l0, "mse": rec, "l0": l0.detach(), "fired": counts > 0}

    def export_extra(self):
        return {}, {"threshold": self.threshold.detach().clone()}
