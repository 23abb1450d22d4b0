"""An independent forward of the local replacement model of the tiny GPT-NeoX / GPT-2 models, written from their
weights: attention patterns and LayerNorm scales recorded from the real model and used as constants, every MLP
replaced by its transcoder's skip path plus fixed feature writes, error vectors and (position 0) a remainder.
Each source's write is multiplied by an input scalar, so d target / d multiplier is the source's direct effect."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Recorded:
    patterns: list[torch.Tensor]  # per layer [H, T, T]
    sigmas: dict[str, torch.Tensor]  # LayerNorm module name -> [T, 1]
    mlp_in: list[torch.Tensor]  # [T, d]
    mlp_out: list[torch.Tensor]  # [T, d]
    logits: torch.Tensor  # [T, V]


@torch.no_grad()
def record(model, ids: torch.Tensor) -> Recorded:
    sig, mlp_in, mlp_out, handles = {}, {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):

            def hook(mod, args, out, name=name):
                x = args[0][0]
                sig[name] = (x.var(-1, unbiased=False, keepdim=True) + mod.eps).sqrt()

            handles.append(m.register_forward_hook(hook))
    mlps = mlp_modules(model)
    for layer, m in enumerate(mlps):

        def mhook(mod, args, out, layer=layer):
            mlp_in[layer], mlp_out[layer] = args[0][0], out[0]

        handles.append(m.register_forward_hook(mhook))
    try:
        out = model(ids[None], output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    assert out.attentions is not None and out.attentions[0] is not None, "eager attention needed"
    n = len(mlps)
    return Recorded(
        [a[0] for a in out.attentions],
        sig,
        [mlp_in[i] for i in range(n)],
        [mlp_out[i] for i in range(n)],
        out.logits[0],
    )


def mlp_modules(model):
    if model.config.model_type == "gpt_neox":
        return [layer.mlp for layer in model.gpt_neox.layers]
    return [block.mlp for block in model.transformer.h]


def ln(model, name: str, rec: Recorded, x: torch.Tensor) -> torch.Tensor:
    m = model.get_submodule(name)
    return (x - x.mean(-1, keepdim=True)) / rec.sigmas[name] * m.weight + m.bias


def raw(tc):
    """The transcoder's raw-unit tensors, read from its export (the reference the tests use)."""
    return tc.export()[1]


def hand_forward(model, tcs, ids, rec: Recorded, feats, mlp_writes, m_feat, m_err, m_tok):
    """(feature pre-activations [A], final LayerNorm output [T, d]) of the replacement model.

    ``feats`` [A, 3] (layer, position, latent) with ``mlp_writes`` = (activations [A], errors [L, T, d],
    remainders [L, T, d]) fixed; the multipliers ``m_feat`` [A], ``m_err`` [L, T], ``m_tok`` [T] scale each
    source's write."""
    acts, errs, rems = mlp_writes
    neox = model.config.model_type == "gpt_neox"
    T = len(ids)
    H = model.config.num_attention_heads
    d = model.config.hidden_size
    hd = d // H
    if neox:
        h = model.gpt_neox.embed_in.weight[ids] * m_tok[:, None]
        prefix = "gpt_neox.layers"
    else:
        h = model.transformer.wte.weight[ids] * m_tok[:, None] + model.transformer.wpe.weight[:T]
        prefix = "transformer.h"
    pre = torch.zeros(len(feats), dtype=h.dtype)
    for layer, tc in enumerate(tcs):
        t = raw(tc)
        if neox:
            blk = model.gpt_neox.layers[layer]
            a_in = ln(model, f"{prefix}.{layer}.input_layernorm", rec, h)
            qkv = a_in @ blk.attention.query_key_value.weight.t() + blk.attention.query_key_value.bias
            v = qkv.view(T, H, 3 * hd)[..., 2 * hd :].transpose(0, 1)  # [H, T, hd]
            z = (rec.patterns[layer] @ v).transpose(0, 1).reshape(T, d)
            attn = z @ blk.attention.dense.weight.t() + blk.attention.dense.bias
            x = ln(model, f"{prefix}.{layer}.post_attention_layernorm", rec, h)
        else:
            blk = model.transformer.h[layer]
            a_in = ln(model, f"{prefix}.{layer}.ln_1", rec, h)
            qkv = a_in @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
            v = qkv[:, 2 * d :].view(T, H, hd).transpose(0, 1)
            z = (rec.patterns[layer] @ v).transpose(0, 1).reshape(T, d)
            attn = z @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
            h = h + attn
            x = ln(model, f"{prefix}.{layer}.ln_2", rec, h)
        sel = feats[:, 0] == layer
        pos, lat = feats[sel, 1], feats[sel, 2]
        pre = pre.index_put(
            (sel.nonzero(as_tuple=True)[0],), (x[pos] * t["W_enc"][:, lat].t()).sum(-1) + t["b_enc"][lat]
        )
        mlp = t["b_dec"] + errs[layer] * m_err[layer][:, None] + rems[layer]
        if "W_skip" in t:
            mlp = mlp + x @ t["W_skip"].t()
        writes = (acts[sel] * m_feat[sel])[:, None] * t["W_dec"][lat]
        mlp = mlp.index_add(0, pos, writes)
        h = h + mlp + attn if neox else h + mlp
    final = "gpt_neox.final_layer_norm" if neox else "transformer.ln_f"
    return pre, ln(model, final, rec, h)


@torch.no_grad()
def writes(tcs, rec: Recorded, zero_first: bool = True):
    """Active features [A, 3], activations, errors and the position-0 remainders, as circuit-tracer defines them:
    features and errors at position 0 zeroed (``zero_first``); what they left there is a constant remainder."""
    feats, acts, errs, rems = [], [], [], []
    for layer, tc in enumerate(tcs):
        t = raw(tc)
        x, y = rec.mlp_in[layer], rec.mlp_out[layer]
        f = tc.encode(x)
        full = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].t() if "W_skip" in t else 0)
        err = y - full
        if zero_first:
            f[0] = 0
            err = err.clone()
            err[0] = 0
        part = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].t() if "W_skip" in t else 0)
        rems.append(y - part - err)  # zero except at position 0
        errs.append(err)
        pos, lat = f.nonzero(as_tuple=True)
        feats.append(torch.stack([torch.full_like(pos, layer), pos, lat], 1))
        acts.append(f[pos, lat])
    return torch.cat(feats), torch.cat(acts), torch.stack(errs), torch.stack(rems)
