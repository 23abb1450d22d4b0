"""Each group's gradient clip in one pass, against torch's own ``clip_grad_norm_`` applied group by group."""

import torch

from sfcd.training import clip_grad_norms_


def test_each_group_clipped_as_torch_clips_it_alone():
    """Groups of different sizes and parameter counts, some above the limit and some below, one with a parameter
    without a gradient and one with none at all. Bugs caught: one norm over every group (the SAEs' clips no
    longer independent), a gradient counted in the wrong group, a group's coefficient given to its neighbour,
    gradients below the limit scaled up."""
    g = torch.Generator().manual_seed(0)
    shapes = [[(8, 4), (4,)], [(3,)], [(5, 5), (5,), (2, 5)], [(6,)], [(2, 2)]]
    scales = [3.0, 0.01, 1.0, 0.2, 0.0]  # group 4's parameter has no gradient (nor has group 2's last)
    ours, torchs = [], []
    for shape, scale in zip(shapes, scales, strict=True):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shape]
        for p in params:
            if scale and p.shape != (2, 5):  # group 2's last parameter: no gradient
                p.grad = torch.randn(p.shape, generator=g) * scale
        ours.append(params)
        torchs.append([torch.nn.Parameter(p.detach().clone()) for p in params])
        for p, q in zip(params, torchs[-1], strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
    clip_grad_norms_(ours, 1.0)
    for group in torchs:
        if any(p.grad is not None for p in group):
            torch.nn.utils.clip_grad_norm_(group, 1.0)
    for a, b in zip(ours, torchs, strict=True):
        for p, q in zip(a, b, strict=True):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert ours[1][0].grad.norm() < 0.1  # below the limit: left as it was, not scaled up to it
