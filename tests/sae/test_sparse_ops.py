"""The sparse kernels against computations written out densely here: the CPU top-k by groups against a full
sort, the latent-grouped sums and per-pair dots against dense matrices, the encoder bias gradients against
autograd of the dense formula, and the reused pre-activation buffer."""

import pytest
import torch

from sfcd.sae.sparse_ops import ActiveLatents, encoder_pre, gather_pre, kth_largest, top_k


@pytest.mark.parametrize(
    "case", ["gaussian", "ties", "negative", "one_group_holds_all", "fallback_width", "fallback_shape"]
)
def test_top_k_keeps_the_k_largest_values(case):
    """Bugs caught: candidates offset wrongly within their group (contiguous instead of strided members), the
    group maximum over the wrong axis, fewer than k groups searched, the second top-k's indices returned without
    mapping back to latents (member and slot swapped), values out of step with their indices."""
    g = torch.Generator().manual_seed(0)
    B, m, k = 64, 1024, 16
    if case == "gaussian":
        pre = torch.randn(B, m, generator=g)
    elif case == "ties":  # few distinct values: many ties at the k-th
        pre = torch.randint(0, 6, (B, m), generator=g).float()
    elif case == "negative":
        pre = -torch.rand(B, m, generator=g) - 1
    elif case == "one_group_holds_all":  # the row's top k all in one strided group (latents j, j + m/8, ...)
        pre = torch.randn(B, m, generator=g)
        pre[:, 5 :: m // 8] += 100  # 8 members only: the top 16 also need the next group's
    elif case == "fallback_width":  # k * GROUP * 8 > m: torch.topk
        pre, k = torch.randn(B, 96, generator=g), 16
    else:  # m not a multiple of the group size
        pre = torch.randn(B, 1001, generator=g)
    vals, idx = top_k(pre, k)
    assert idx.shape == (B, k)
    assert all(len(set(row.tolist())) == k for row in idx), "a latent kept twice"
    assert torch.equal(vals, pre.gather(1, idx)), "the values are not those of the indices"
    got = vals.sort(1, descending=True).values
    want = pre.sort(1, descending=True).values[:, :k]
    assert torch.equal(got, want)


@pytest.mark.parametrize("by_topk", [False, True])
def test_kth_largest_is_the_nth_of_a_descending_sort(by_topk):
    """Both ways (kthvalue, on the CPU; topk's smallest, on a GPU), with ties and negatives, every n from 1 to the
    length. Bugs caught: the n-th counted from the wrong end or off by one (kthvalue's k is from the smallest)."""
    g = torch.Generator().manual_seed(0)
    flat = torch.cat([torch.randn(200, generator=g), torch.randint(-3, 3, (56,), generator=g).float()])
    want = flat.sort(descending=True).values
    got = torch.stack([kth_largest(flat, n, by_topk=by_topk) for n in range(1, len(flat) + 1)])
    assert got.shape == want.shape and torch.equal(got, want)


def _pairs(B=48, m=96, k=5, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(B)])
    return idx, torch.randn(B, k, generator=g), torch.randn(B, d, generator=g), torch.randn(m, d, generator=g)


def test_per_latent_sum_equals_the_dense_product():
    """G^T @ dense with G[b, idx[b, s]] = vals[b, s]. Bugs caught: pairs sorted by latent but given the wrong
    rows (the row of flat entry e is e // k), counts or offsets off by one latent."""
    idx, vals, dense, _ = _pairs()
    G = torch.zeros(idx.shape[0], 96).scatter(1, idx, vals)
    torch.testing.assert_close(ActiveLatents(idx, 96).per_latent_sum(vals, dense), G.t() @ dense)


@pytest.mark.parametrize("sampled", [True, False])
def test_per_pair_dot_both_ways(sampled):
    """g[b] . W[idx[b, s]], by the sampled matmul over the pairs grouped by latent (the CPU's) and by gathered
    rows (elsewhere). Bugs caught: the gathered rows' chunking dropping or shifting rows, the latent-grouped dots
    put back in the wrong pair order (scattered by ``order``'s inverse, or left grouped)."""
    idx, _, g, W = _pairs()
    want = torch.einsum("bd,bkd->bk", g, W[idx])
    torch.testing.assert_close(ActiveLatents(idx, 96).per_pair_dot(g, W, sampled=sampled), want)


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_gather_pre_gradients_equal_autograd_of_the_dense_formula(x_needs_grad):
    """pre = (x - b_dec) @ W_enc + b_enc gathered at idx. Bugs caught: b_dec's gradient with the wrong sign or
    from W_enc^T, the bias gradient scattered to the wrong latents, x's gradient missing when x requires grad."""
    idx, _, x, _ = _pairs(d=12)
    gen = torch.Generator().manual_seed(1)
    W, b, bd = (torch.randn(*s, generator=gen) for s in ((12, 96), (96,), (12,)))
    w = torch.randn(idx.shape, generator=gen)  # an arbitrary upstream gradient
    ours = [t.clone().requires_grad_(True) for t in (x, W, b, bd)]
    ours[0].requires_grad_(x_needs_grad)
    pre = ((x - bd) @ W + b).detach()
    (gather_pre(ours[0], ours[1], ours[2], ActiveLatents(idx, 96), pre, ours[3]) * w).sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (x, W, b, bd)]
    (((ref[0] - ref[3]) @ ref[1] + ref[2]).gather(1, idx) * w).sum().backward()
    for name, a, r in zip(("x", "W_enc", "b_enc", "b_dec"), ours, ref, strict=True):
        if name == "x" and not x_needs_grad:
            assert a.grad is None
            continue
        torch.testing.assert_close(a.grad, r.grad, msg=name)


def test_encoder_pre_reuses_one_buffer_per_shape_and_stays_correct():
    """The CPU buffer: the same storage for calls of one shape, a separate one per shape, the right values after
    calls of other shapes in between; under autocast a new bf16 tensor. Bug caught: a buffer keyed without its
    width (a call of another width overwriting or reshaping it)."""
    g = torch.Generator().manual_seed(2)
    xa, Wa, ba = torch.randn(8, 4, generator=g), torch.randn(4, 32, generator=g), torch.randn(32, generator=g)
    Wb, bb = torch.randn(4, 16, generator=g), torch.randn(16, generator=g)
    a1 = encoder_pre(xa, Wa, ba)
    want_a = torch.addmm(ba, xa, Wa)
    b1 = encoder_pre(xa, Wb, bb)
    torch.testing.assert_close(a1, want_a)
    torch.testing.assert_close(b1, torch.addmm(bb, xa, Wb))
    a2 = encoder_pre(xa * 2, Wa, ba)
    assert a2.data_ptr() == a1.data_ptr() and b1.data_ptr() != a1.data_ptr()
    torch.testing.assert_close(a2, torch.addmm(ba, xa * 2, Wa))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = encoder_pre(xa, Wa, ba)
    assert c.dtype == torch.bfloat16 and c.data_ptr() != a1.data_ptr()
