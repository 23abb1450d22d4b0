"""Sparse kernels for top-k SAEs: only the k active latents enter the decoder and the backward pass.

``gather_pre(x, W_enc, b_enc, idx, pre)`` returns ``pre.gather(1, idx)`` (pre-activations already computed
densely without grad) with a backward that touches only the selected latents:
grad_x = sum_j g_j W_enc[:, idx_j] (an embedding bag), grad_W_enc = x^T G (a sparse-dense product),
grad_b_enc = scatter-add of g. ``sparse_decode`` is an embedding bag over decoder rows.

One dtype inside: under autocast (``bf16-mixed``) the dense encoder matmul gives bf16 pre-activations, while the
parameters stay float32; the sparse kernels compute in the parameters' dtype and return gradients in each
input's own dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, idx, pre):
        ctx.save_for_backward(x, W_enc, idx)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):  # the backward may run inside autocast (Lightning)
            return _GatherPre._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, W_enc, idx = ctx.saved_tensors
        B, k = idx.shape
        d_sae = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        g = g.to(W_enc.dtype)
        flat_idx, flat_g = idx.reshape(-1), g.reshape(-1).contiguous()
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=g.contiguous(), mode="sum")
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            # G^T as CSR [d_sae, B]: rows are latents, sorted by latent; grad_W_enc^T = G^T @ x
            # the same stable order as sorting the int64 indices; float keys (exact below 2^24 latents) because
            # this torch's CPU sort of int64 is several times slower than of float32
            order = torch.argsort(flat_idx.float() if d_sae < 2**24 else flat_idx, stable=True)
            counts = torch.bincount(flat_idx, minlength=d_sae)
            crow = torch.zeros(d_sae + 1, dtype=torch.long, device=x.device)
            crow[1:] = counts.cumsum(0)
            rows_b = torch.arange(B, device=x.device).repeat_interleave(k)[order]
            gt = torch.sparse_csr_tensor(crow, rows_b, flat_g[order], size=(d_sae, B), check_invariants=False)
            grad_W = (gt @ x.to(W_enc.dtype)).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, flat_g)
        return grad_x, grad_W, grad_b, None, None


def gather_pre(x, W_enc, b_enc, idx, pre) -> torch.Tensor:
    """``pre.gather(1, idx)`` with a sparse backward to ``x``, ``W_enc`` and ``b_enc``."""
    return _GatherPre.apply(x, W_enc, b_enc, idx, pre)


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j vals[:, j] * W_dec[idx[:, j]]`` without materialising [B, k, d]."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum")


def dense_from_sparse(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], d_sae, dtype=vals.dtype, device=vals.device).scatter(1, idx, vals)
