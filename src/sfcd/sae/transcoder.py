"""TopK (skip) transcoders: a sparse, wider replacement of an MLP, trained from the MLP's input to its output.

``y_hat = W_dec TopK(W_enc x + b_enc) + W_skip x + b_dec`` (Dunefsky et al. 2024; the affine skip path of Paulo
et al. 2025), with ``x`` what the MLP reads (site ``mlp_in.<l>``: the residual stream after the MLP's layer norm)
and ``y`` what it writes (``mlp.<l>``). Computed, initialised and saved as EleutherAI's sparsify does with
``transcode: true`` (``skip_connection: true``): no decoder bias subtracted from the input, zero ``W_dec`` and
``W_skip`` at the start, ``b_enc = -mean(x) W_enc`` and ``b_dec = mean(y)``, no unit-norm decoder. The training
loop, TopK selection, sparse kernels and AuxK are the TopK SAE's (:class:`sfcd.sae.topk.TopKSAE`), with the
target ``y`` in place of ``x``.

Training works on scaled inputs and targets (``x * scale`` with E||x * scale|| = sqrt(d_in), ``y * out_scale``
likewise); the raw-unit functions (``encode``, ``decode``, ``skip``, ``forward``) and the export fold both in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sfcd.sae.topk import TopKSAE


class Transcoder(TopKSAE):
    """A TopK transcoder of one MLP, with the affine skip path ``W_skip x`` when ``skip`` (the default)."""

    architecture = "transcoder"
    saelens_architecture = ""  # SAELens has no TopK transcoder (its transcoders are ReLU/JumpReLU)
    is_transcoder = True
    apply_b_dec_to_input = False  # sparsify's transcode: the input is not centred by b_dec
    unit_norm_decoder = False  # sparsify: normalize_decoder applies to autoencoders only
    b_dec_at_median = False

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, d_out: int | None = None, **hparams: Any):
        hparams.setdefault("skip", True)
        super().__init__(d_in, d_sae, seed=seed, **hparams)
        self.d_out = int(d_out or d_in)
        self.W_dec = nn.Parameter(torch.zeros(d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in)) if self.hparams["skip"] else None
        self.register_buffer("out_scale", torch.tensor(1.0))

    # ----------------------------------------------------------------------------------------- inference
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The latents' part of the output (with ``b_dec``), in raw units."""
        return (f @ self.W_dec + self.b_dec) / self.out_scale

    def decoder_rows(self) -> torch.Tensor:
        return self.W_dec.detach() / self.out_scale

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path's part of the output for raw input ``x`` (zero without one)."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_out, dtype=x.dtype, device=x.device)
        return (x * self.scale) @ self.W_skip.t() / self.out_scale

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return self.decode(f) + self.skip(x)

    # ------------------------------------------------------------------------------------------ training
    def add_skip(self, x: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        return y_hat if self.W_skip is None else torch.addmm(y_hat, x, self.W_skip.t())

    def fit_output_scale(self, sample: torch.Tensor) -> None:
        """The target scale from raw MLP outputs ``sample`` [n, d_out]: E||y * out_scale|| = sqrt(d_out)."""
        norm = sample.norm(dim=1).mean().item()
        if not math.isfinite(norm) or norm <= 0:
            raise ValueError(f"mean MLP output norm {norm}; cannot scale the targets (all zero, NaN or inf?)")
        self.out_scale.fill_(math.sqrt(self.d_out) / norm)

    @torch.no_grad()
    def init_biases(self, x_scaled: torch.Tensor, y_scaled: torch.Tensor) -> None:
        """sparsify's first-batch initialisation: pre-activations centred (``b_enc = -mean(x) W_enc``) and the
        output's mean in ``b_dec``."""
        self.b_enc.copy_(-x_scaled.mean(0) @ self.W_enc)
        self.b_dec.copy_(y_scaled.mean(0))

    # ---------------------------------------------------------------------------------------------- export
    @torch.no_grad()
    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """sfcd's cfg keys and the raw-unit tensors (SAELens orientation: ``W_enc`` [d_in, d_sae], ``W_dec``
        [d_sae, d_out], ``W_skip`` [d_out, d_in])."""
        s, t = self.scale, self.out_scale
        tensors = {
            "W_enc": (self.W_enc * s).contiguous(),
            "b_enc": self.b_enc.clone(),
            "W_dec": (self.W_dec / t).contiguous(),
            "b_dec": (self.b_dec / t).clone(),
        }
        if self.W_skip is not None:
            tensors["W_skip"] = (self.W_skip * (s / t)).contiguous()
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "d_out": self.d_out}
        return {**cfg, "k": self.k, "skip": self.W_skip is not None}, tensors
