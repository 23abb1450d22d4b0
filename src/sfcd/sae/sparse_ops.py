"""Sparse kernels for top-k SAEs: only the k active latents enter the decoder and the backward pass.

A step's kept latents are an :class:`ActiveLatents`: ``idx`` [B, k] and, built once and shared by both weight
gradients, the same (row, latent) pairs grouped by latent (a CSR pattern [d_sae, B]).

``gather_pre(x, W_enc, b_enc, active, pre, b_dec)`` returns ``pre.gather(1, idx)`` (``pre = (x - b_dec) @ W_enc
+ b_enc``, already computed densely without grad) with a backward that touches only the selected latents:
grad_W_enc = (x - b_dec)^T G (an embedding bag per latent over its rows, produced [d_sae, d_in]: the layout
``W_enc`` is stored in, :class:`sfcd.sae.base.SAE`), grad_b_enc = a scatter-add
of g, grad_b_dec = -W_enc grad_b_enc (a matrix-vector product: no per-row gradient, no transposed copy of
W_enc), and grad_x (an embedding bag over W_enc's columns) only when ``x`` itself requires grad.
``sparse_decode(active, vals, W_dec)`` is an embedding bag over decoder rows; its backward gives grad_W_dec
by the latent-grouped product and grad_vals (one dot product per kept pair) by a sampled matmul on the CPU.

One dtype inside: under autocast (``bf16-mixed``) the dense encoder matmul gives bf16 pre-activations, while the
parameters stay float32; the sparse kernels compute in the parameters' dtype and return gradients in each
input's own dtype.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

#: the CPU top-k groups latents by this many (see :func:`top_k`)
GROUP = 8
#: one reused pre-activation buffer per (shape, dtype) on the CPU (see :func:`encoder_pre`)
_WORKSPACE: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def encoder_pre(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """``x @ W_enc + b_enc`` without grad, for a training step's selection.

    On the CPU outside autocast it is written into one buffer per shape, reused by every call (every SAE of that
    shape, every step): a fresh [B, d_sae] tensor is page-faulted in by the kernel on each step, which costs
    about a fifth of the matmul itself at d_sae 8,192 (bench_sae.py). The result is valid until the next call
    of the same shape, so a caller uses it within its own step. Elsewhere (CUDA's allocator caches blocks;
    autocast has no ``out=``) a new tensor.
    """
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x.dim() != 2:
        return torch.addmm(b_enc, x, W_enc)
    key = (x.shape[0], W_enc.shape[1], torch.promote_types(x.dtype, W_enc.dtype))
    out = _WORKSPACE.get(key)
    if out is None:
        out = _WORKSPACE[key] = torch.empty(key[:2], dtype=key[2])
    return torch.addmm(b_enc, x, W_enc, out=out)


def release_workspace() -> None:
    """Free the CPU pre-activation buffers (training calls this when it ends)."""
    _WORKSPACE.clear()


def top_k(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest entries of ``pre`` [B, m]: (values, indices), both [B, k], in no particular order
    (``values == pre.gather(1, indices)``, taken from the selection itself: no second gather from ``pre``).

    On the CPU, ``torch.topk`` over a whole row is slow (a heap per row), so it runs twice on less: the latents
    are split into ``m / GROUP`` strided groups, each group's maximum taken (one vectorised pass), and the row's
    top k taken among the members of its k groups with the largest maxima. Exact: an entry in the row's top k
    lies in one of those groups (were its group not among them, k group maxima, each at least as large as it,
    would rank above it); under ties the values kept are the same, the indices may differ. Elsewhere (CUDA's
    top-k is a radix select) and where the grouping saves nothing, ``torch.topk``.
    """
    m = pre.shape[-1]
    # it pays while the k groups' members are a small part of the row: measured at m = 8,192 (4,096 rows), k = 128
    # takes 94 ms grouped against 117 for torch.topk, k = 256 164 against 157
    if pre.device.type != "cpu" or m % GROUP or k * GROUP * 8 > m or pre.dim() != 2:
        return tuple(pre.topk(k, dim=-1, sorted=False))
    B, groups = pre.shape[0], m // GROUP
    members = pre.view(B, GROUP, groups)  # group j: latents j, j + groups, j + 2 groups, ...
    top_groups = members.amax(1).topk(k, dim=-1, sorted=False).indices
    # the k groups' members read through the group index broadcast over the GROUP strides ([B, GROUP, k]: member
    # i of slot s is latent i * groups + top_groups[s]), no [B, k * GROUP] index tensor built
    vals, pick = members.gather(2, top_groups[:, None, :].expand(B, GROUP, k)).view(B, -1).topk(k, dim=-1, sorted=False)
    return vals, pick.div(k, rounding_mode="floor") * groups + top_groups.gather(1, pick.remainder(k))


def kth_largest(flat: torch.Tensor, n: int, by_topk: bool | None = None) -> torch.Tensor:
    """The ``n``-th largest entry of the 1-d ``flat`` (a 0-d tensor, on its device: no host sync), by a selection,
    not a sort. ``by_topk`` (default: off the CPU) takes it as the smallest of ``topk(n, sorted=False)``: CUDA's
    top-k of one long slice is a radix select spread over many blocks, where ``kthvalue`` runs one block per slice
    (BatchTopK's one slice of 4 k x batch candidates, 524k at the pythia preset, on a single SM). On the CPU
    ``kthvalue``, measured faster there (``flat`` of 4 x 64 x 4,096: 19.7 ms against 28.5 for top-k; at k 32
    10-11 ms either way). Both give the same value."""
    if flat.device.type != "cpu" if by_topk is None else by_topk:
        return flat.topk(n, sorted=False).values.amin()
    return flat.kthvalue(flat.numel() - n + 1).values


class ActiveLatents:
    """The latents a step keeps, ``idx`` [B, k] (row b keeps latents ``idx[b]``), and the same pairs grouped by
    latent for the weight gradients (built on first use, once per step). ``pre``: their pre-activations [B, k]
    where the selection already has them (:func:`top_k`), so :func:`gather_pre` does not gather them again."""

    def __init__(self, idx: torch.Tensor, d_sae: int, pre: torch.Tensor | None = None):
        self.idx, self.d_sae, self.pre = idx, d_sae, pre

    @functools.cached_property
    def _by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = self.idx.reshape(-1)
        # a stable sort (the same order on every run); int32 keys: 6 ms against 10 (int64) and 44 (float32) for
        # 262k pairs on this torch's CPU sort
        order = torch.argsort(flat.to(torch.int32) if self.d_sae < 2**31 else flat, stable=True)
        crow = torch.zeros(self.d_sae + 1, dtype=torch.long, device=flat.device)
        # counts by index_add, not bincount (which reads the indices' range back to the host on CUDA)
        counts = torch.zeros(self.d_sae, dtype=torch.long, device=flat.device)
        crow[1:] = counts.index_add_(0, flat, torch.ones_like(flat)).cumsum(0)
        return order, crow, order // self.idx.shape[1]

    def per_latent_sum(self, vals: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``[d_sae, d]``: for each latent j, the sum over the rows b that keep it of ``vals[b, slot] * dense[b]``
        (``vals`` [B, k] aligned with ``idx``): G^T @ dense for the sparse G with ``G[b, idx[b, s]] = vals[b, s]``."""
        order, crow, rows = self._by_latent
        # an embedding bag per latent over ``dense``'s rows: half the time of torch's CSR @ dense on the CPU, which
        # zero-fills and copies its result besides the product (measured 12.5 ms against 23.7 at 4,096 rows x k 64,
        # d_sae 8,192, d 512); a latent no row keeps gets zeros
        return F.embedding_bag(rows, dense, crow[:-1], mode="sum", per_sample_weights=vals.reshape(-1)[order])

    def per_pair_dot(self, g: torch.Tensor, W: torch.Tensor, sampled: bool | None = None) -> torch.Tensor:
        """``[B, k]``: ``g[b] . W[idx[b, s]]`` for every kept pair (``W`` [d_sae, d], latents as rows). ``sampled``
        (default: on the CPU) by a sampled matmul over the pairs grouped by latent, else by the kept rows
        gathered, a bounded number at a time."""
        B, k = self.idx.shape
        if g.device.type == "cpu" if sampled is None else sampled:
            # one dot product per pair, taken latent by latent (W's rows in order, each read once, against the
            # rows of g that keep it) and put back in pair order: by pair, every dot reads a random row of W,
            # measured 26.5 ms against 16.4 at 4,096 rows x k 64, d_sae 8,192, d 512 (51 against 20 at d_sae
            # 16,384; about even, within 10%, at d_sae 4,096, k 32)
            order, crow, rows = self._by_latent
            pattern = torch.sparse_csr_tensor(
                crow, rows, g.new_zeros(B * k), size=(self.d_sae, B), check_invariants=False
            )
            by_latent = torch.sparse.sampled_addmm(pattern, W, g.t(), beta=0.0).values()
            return g.new_empty(B * k).index_copy_(0, order, by_latent).view(B, k)
        out = g.new_empty(B, k)
        step = max(1, 2**27 // max(1, k * W.shape[1]))
        for s in range(0, B, step):
            out[s : s + step] = torch.bmm(W[self.idx[s : s + step]], g[s : s + step, :, None]).squeeze(2)
        return out


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre, active, xc):
        if xc is None:
            xc = x if b_dec is None else x - b_dec
        ctx.save_for_backward(xc, W_enc)
        ctx.active = active
        return pre.gather(1, active.idx) if active.pre is None else active.pre.clone()

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):  # the backward may run inside autocast (Lightning)
            return _GatherPre._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        xc, W_enc = ctx.saved_tensors
        active: ActiveLatents = ctx.active
        g = g.to(W_enc.dtype).contiguous()
        grad_x = grad_W = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(active.idx, W_enc.t().contiguous(), per_sample_weights=g, mode="sum")
            grad_x = grad_x.to(xc.dtype)
        if ctx.needs_input_grad[1]:
            # [d_sae, d_in] transposed: the layout W_enc is stored in (SAE.__init__), so no copy is made for it
            grad_W = active.per_latent_sum(g, xc.to(W_enc.dtype)).t()
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device)
            grad_b.index_add_(0, active.idx.reshape(-1), g.reshape(-1))
            if ctx.needs_input_grad[3]:  # d pre / d b_dec = -W_enc^T for every row: summed, -W_enc grad_b_enc
                grad_b_dec = -(W_enc @ grad_b)
            if not ctx.needs_input_grad[2]:
                grad_b = None
        return grad_x, grad_W, grad_b, grad_b_dec, None, None, None


def gather_pre(x, W_enc, b_enc, active: ActiveLatents, pre, b_dec=None, xc=None) -> torch.Tensor:
    """``pre.gather(1, active.idx)`` for ``pre = (x - b_dec) @ W_enc + b_enc`` (``b_dec`` None: ``x @ W_enc +
    b_enc``), with a sparse backward to ``W_enc``, ``b_enc``, ``b_dec`` and (only if it requires grad) ``x``.
    ``xc``: ``x - b_dec`` as the caller already computed it (without grad), so it is not formed twice. Where
    ``active`` carries the selected pre-activations (``active.pre``), those are returned and ``pre`` is not read.
    """
    return _GatherPre.apply(x, W_enc, b_enc, b_dec, pre, active, None if xc is None else xc.detach())


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, W_dec, active):
        ctx.save_for_backward(vals, W_dec)
        ctx.active = active
        return F.embedding_bag(active.idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):
            vals, W_dec = ctx.saved_tensors
            active: ActiveLatents = ctx.active
            g = g.to(W_dec.dtype).contiguous()
            grad_vals = active.per_pair_dot(g, W_dec).to(vals.dtype) if ctx.needs_input_grad[0] else None
            grad_W = active.per_latent_sum(vals.to(W_dec.dtype), g) if ctx.needs_input_grad[1] else None
            return grad_vals, grad_W, None


def sparse_decode(active: ActiveLatents, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j vals[:, j] * W_dec[idx[:, j]]`` without materialising [B, k, d]."""
    return _SparseDecode.apply(vals, W_dec, active)


def dense_from_sparse(idx: torch.Tensor, vals: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], d_sae, dtype=vals.dtype, device=vals.device).scatter(1, idx, vals)
