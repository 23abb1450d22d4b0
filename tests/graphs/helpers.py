"""Tiny seeded models and transcoders for the attribution-graph tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from sfcd.sae.transcoder import Transcoder

V, D = 40, 16


def tiny(kind: str = "neox", dtype: torch.dtype = torch.float64):
    """A 2-layer GPT-NeoX (parallel residual) or GPT-2 with random weights (eager attention, so patterns can be
    read back), in ``dtype``."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=D, n_layer=2, n_head=2)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = GPTNeoXConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            use_parallel_residual=True,
        )
        model = GPTNeoXForCausalLM(cfg)
    cfg._attn_implementation = "eager"
    with torch.no_grad():  # LayerNorm weights and biases away from 1 and 0, so freezing them is tested
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.to(dtype).eval()


def transcoders(model, d_sae: int = 24, k: int = 4, skip: bool = True, seed: int = 1) -> list[Transcoder]:
    """Random transcoders (one per MLP) with non-trivial scales, so raw-unit conversions are exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else 2):
        tc = Transcoder(D, d_sae, k=k, skip=skip)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(D, d_sae, generator=g) / D**0.5)
            tc.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1 + 0.2)
            tc.W_dec.copy_(torch.randn(d_sae, D, generator=g) * 0.3)
            tc.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
            if skip:
                tc.W_skip.copy_(torch.randn(D, D, generator=g) * 0.2)
            tc.scale.fill_(1.7)
            tc.out_scale.fill_(0.6)
        out.append(tc.to(next(model.parameters()).dtype).eval())
    return out
