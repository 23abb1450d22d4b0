"""The local replacement model of Ameisen et al. (2025), as forward hooks on the real ``transformers`` model.

Inside :func:`replacement` the model computes exactly what it computes without hooks (every value is the
model's own, ``value + (g - g.detach())`` adds exact zeros), but its gradients are those of the local
replacement model, which is linear in its sources once feature activations are frozen:

- each MLP's output carries the gradient of its transcoder's skip path ``W_skip x`` only (the features' part and
  the error, MLP out − reconstruction, are constants of the backward pass), so with every error node kept the
  forward is the model's own;
- attention patterns are frozen: the query and key parts of the QKV projection are detached, the value part
  stays live, so attention is linear in its input;
- LayerNorm scales are frozen: the gradient is that of ``(x − mean x) / σ · w`` with ``σ`` a constant.

The hooks record what attribution reads and writes: each MLP's input (the transcoders' input; feature targets
read it), each MLP's output (feature and error sources write there) and the token embeddings (token sources).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sfcd.models.sites import Site, architecture, n_layers, site_module
from sfcd.sae.transcoder import Transcoder

#: the QKV projection of each layer (its output is q, k and v; only v keeps its gradient)
_QKV = {"gpt_neox": "gpt_neox.layers.{l}.attention.query_key_value", "gpt2": "transformer.h.{l}.attn.c_attn"}


def value_columns(model) -> torch.Tensor:
    """A bool mask over the QKV projection's output features that marks the value part: GPT-NeoX interleaves
    (q, k, v) per head (``view(..., heads, 3 * head_dim)``), GPT-2 concatenates them (``split(d, dim=-1)``)."""
    d = model.config.hidden_size
    cols = torch.arange(3 * d)
    if architecture(model) == "gpt_neox":
        head_dim = d // model.config.num_attention_heads
        return (cols % (3 * head_dim)) >= 2 * head_dim
    return cols >= 2 * d


def live(value: torch.Tensor, grad_from: torch.Tensor) -> torch.Tensor:
    """``value`` exactly, with the gradient of ``grad_from`` (``grad_from - grad_from.detach()`` is exact zeros)."""
    return value.detach() + (grad_from - grad_from.detach())


def frozen_layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The linear part of a LayerNorm at ``x`` with its scale held constant: ``(x − mean x) / σ(x) · w``."""
    sigma = (x.detach().var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
    y = (x - x.mean(-1, keepdim=True)) / sigma
    return y * module.weight if module.weight is not None else y


@dataclass
class Trace:
    """What the hooks recorded in the last forward pass (tensors of the autograd graph, [B, T, d])."""

    mlp_in: list[torch.Tensor | None] = field(default_factory=list)
    mlp_out: list[torch.Tensor | None] = field(default_factory=list)
    embed: torch.Tensor | None = None


def raw_skip(tc: Transcoder, x: torch.Tensor) -> torch.Tensor | None:
    """The transcoder's skip path ``W_skip x`` in raw units (None without one)."""
    return None if tc.W_skip is None else tc.skip(x)


def encoder_vectors(tc: Transcoder, latents: torch.Tensor) -> torch.Tensor:
    """Raw-unit encoder directions [n, d_in] of ``latents``: pre-activation = x · v + b_enc."""
    return (tc.W_enc[:, latents] * tc.scale).t()


def decoder_vectors(tc: Transcoder, latents: torch.Tensor) -> torch.Tensor:
    """Raw-unit decoder rows [n, d_out] of ``latents``: what one unit of activation writes to the MLP output."""
    return tc.W_dec[latents] / tc.out_scale


@contextlib.contextmanager
def replacement(model, transcoders: list[Transcoder]) -> Iterator[Trace]:
    """Hooks that turn ``model`` into the local replacement model for the ``transcoders`` (one per layer, in
    order), yielding the :class:`Trace` of each forward pass. The model's parameters do not require gradients
    inside (the token embeddings are the graph's leaves); all hooks and flags are restored on exit."""
    kind = architecture(model)
    n = n_layers(model)
    if len(transcoders) != n:
        raise ValueError(f"{len(transcoders)} transcoders for a model of {n} layers; expected one per MLP")
    trace = Trace(mlp_in=[None] * n, mlp_out=[None] * n)
    vcols = value_columns(model).to(next(model.parameters()).device)
    handles = []
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def ln_hook(module, args, output):
        return live(output, frozen_layer_norm(module, args[0]))

    def qkv_hook(module, args, output):
        return output.detach() + (output - output.detach()) * vcols.to(output.dtype)

    def mlp_hook(layer: int):
        def hook(module, args, output):
            x = args[0]
            skip = raw_skip(transcoders[layer], x)
            out = output.detach().requires_grad_(True) if skip is None else live(output, skip)
            trace.mlp_in[layer], trace.mlp_out[layer] = x, out
            return out

        return hook

    def embed_hook(module, args, output):
        trace.embed = output.detach().requires_grad_(True)
        return trace.embed

    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                handles.append(m.register_forward_hook(ln_hook))
        for layer in range(n):
            handles.append(model.get_submodule(_QKV[kind].format(l=layer)).register_forward_hook(qkv_hook))
            mlp = site_module(model, Site(f"mlp.{layer}", "mlp", layer))
            handles.append(mlp.register_forward_hook(mlp_hook(layer)))
        handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
        yield trace
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
