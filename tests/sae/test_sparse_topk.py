"""The fast top-k path (only active latents in the decoder and backward) equals the dense computation."""

import pytest
import torch

from sfcd.sae.registry import sae_class


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_path_equals_dense(arch):
    x = torch.randn(96, 16, generator=torch.Generator().manual_seed(0)) * 2
    results = []
    for sparse in (True, False):
        sae = sae_class(arch)(16, 64, seed=3, k=4, sparse=sparse, dead_tokens=10)
        sae.tokens_since_fired[:20] = 1000  # some dead latents: the AuxK path runs too
        out = sae.training_loss(x, 0.5)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (a, ga), (b, gb) = results
    assert float(a["aux"]) > 0
    for key in ("loss", "mse", "aux", "l0"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert torch.equal(a["fired"], b["fired"])
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4)
