"""Context windows (tokens + the feature's activation on each) for selected firing positions, and the tokens
each feature's decoder direction promotes and suppresses through the unembedding (direct logit effect)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sfcd.features.collect import feature_acts
from sfcd.models.sites import Site, architecture, site_module
from sfcd.sae.base import SAE


@dataclass
class Contexts:
    """Context windows of every feature, as arrays (O(d_sae * slots * window), whatever the number of tokens):
    slot c of feature f is the window around ``wanted[f, c]``, ``ids[f, c]`` its tokens (-1 where the window
    runs past its sequence's ends or the slot is empty), ``acts[f, c]`` f's activation on each, the wanted
    token at index ``left``."""

    ids: np.ndarray  # [F, C, left + 1 + right] int32
    acts: np.ndarray  # [F, C, left + 1 + right] float32
    left: int

    def window(self, f: int, c: int) -> dict | None:
        """Slot c of feature f as ``{"ids", "acts", "at"}`` (the tokens inside the sequence only), or None."""
        return self.block(range(f, f + 1))[0][c]

    def block(self, features: range) -> list[list[dict | None]]:
        """:meth:`window` of every slot of ``features`` (consecutive ids), converted together (fast)."""
        ids = self.ids[features.start : features.stop]
        ok = ids >= 0
        W = ids.shape[-1]
        lo = ok.argmax(-1).tolist()  # first token inside the sequence
        hi = (W - ok[..., ::-1].argmax(-1)).tolist()
        has = ok[..., self.left].tolist()
        id_l, act_l = ids.tolist(), _short(self.acts[features.start : features.stop]).tolist()
        return [
            [
                {"ids": i[a:b], "acts": v[a:b], "at": self.left - a} if h else None
                for i, v, a, b, h in zip(ii, vv, la, lb, hh, strict=True)
            ]
            for ii, vv, la, lb, hh in zip(id_l, act_l, lo, hi, has, strict=True)
        ]


def _short(x: np.ndarray, digits: int = 5) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits (short JSON numbers; 1e-5 relative)."""
    x = x.astype(np.float64)
    mag = np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x))))
    scale = 10.0 ** (digits - 1 - mag)
    return np.round(x * scale) / scale


@torch.no_grad()
def windows_for(
    model,
    site: Site,
    sae: SAE,
    windows: np.ndarray,
    wanted: np.ndarray,
    left: int,
    right: int,
    batch: int = 16,
) -> Contexts:
    """For each feature f and slot c with a flat token position ``wanted[f, c] >= 0``, the window of tokens
    around it in its sequence and f's activation on each. Only the sequences that hold a wanted position are
    rerun, ``batch`` at a time; the gathering happens on the work's device."""
    F, C = wanted.shape
    T, W = windows.shape[1], left + 1 + right
    ids = np.full((F, C, W), -1, dtype=np.int32)
    acts = np.zeros((F, C, W), dtype=np.float32)
    f_idx, c_idx = np.nonzero(wanted >= 0)
    pos = wanted[f_idx, c_idx]
    order = np.argsort(pos // T, kind="stable")
    f_idx, c_idx, pos = f_idx[order], c_idx[order], pos[order]
    seq = pos // T
    seqs = np.unique(seq)
    offsets = np.arange(-left, right + 1)
    dev = sae.W_enc.device
    for b in range(0, len(seqs), batch):
        chunk = seqs[b : b + batch]
        lo, hi = np.searchsorted(seq, [chunk[0], chunk[-1] + 1])
        x = torch.from_numpy(windows[chunk]).to(dev)
        a = feature_acts(model, site, sae, x)  # [b, T, F]
        row = np.searchsorted(chunk, seq[lo:hi])  # each entry's sequence within the chunk
        t = (pos[lo:hi] % T)[:, None] + offsets  # [n, W] token index of each window place
        inside = (t >= 0) & (t < T)
        tc = t.clip(0, T - 1)
        fs = f_idx[lo:hi]
        got = a[
            torch.from_numpy(row).to(dev)[:, None],
            torch.from_numpy(tc).to(dev),
            torch.from_numpy(fs).to(dev)[:, None],
        ]  # [n, W]
        toks = windows[chunk[row][:, None], tc]
        ids[fs, c_idx[lo:hi]] = np.where(inside, toks, -1)
        acts[fs, c_idx[lo:hi]] = np.where(inside, got.float().cpu().numpy(), 0.0)
    return Contexts(ids, acts, left)


def unembedding(model) -> torch.Tensor:
    """[vocab, d_model] output embedding."""
    return model.get_output_embeddings().weight.detach()


def logit_effects(
    model, site: Site, sae: SAE, k: int = 10, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k promoted and suppressed token ids (and values) of each feature's decoder direction, read through
    the unembedding (after the MLP's output projection for ``mlp_act`` sites; the final layer norm is left out,
    as in the usual direct-logit-effect view). Returns (pos_ids, pos_vals, neg_ids, neg_vals), each [F, k].
    Computed in float32 whatever the model's dtype (a float16/bfloat16 model's weights are upcast block-free:
    only the [d, vocab] unembedding is copied).

    ``block`` features at a time: [block, vocab], never [F, vocab] (32,768 x 50,304 floats would be 6.6 GB)."""
    W = sae.decoder_rows()  # [F, d_out] in raw units (a transcoder's: in the MLP output's)
    if site.kind == "mlp_act":
        mlp = site_module(model, Site(f"mlp.{site.layer}", "mlp", site.layer))
        proj = mlp.dense_4h_to_h if architecture(model) == "gpt_neox" else mlp.c_proj
        P = proj.weight.detach().float()
        W = W.float() @ (P.t() if architecture(model) == "gpt_neox" else P)
    U = unembedding(model).t().float()
    W = W.float()
    parts = []
    for b in range(0, W.shape[0], block):
        effects = W[b : b + block] @ U  # [block, vocab]
        pos, neg = effects.topk(k, dim=1), effects.topk(k, dim=1, largest=False)
        parts.append((pos.indices.cpu(), pos.values.cpu(), neg.indices.cpu(), neg.values.cpu()))
    return tuple(torch.cat(x) for x in zip(*parts, strict=True))
