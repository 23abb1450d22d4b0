"""Each architecture recovers known features: synthetic activations are sparse non-negative combinations of
64 unit directions in 32 dimensions (more directions than dimensions)."""

import pytest
import torch

from sfcd.config import compose
from sfcd.sae.train import SAEModule, make_specs, train_module

from .synthetic import make_data, mmcs

SETTINGS = {
    "relu": ["sae.l1_coeff=3"],
    "topk": ["sae.k=4"],
    "batchtopk": ["sae.k=4"],
    "jumprelu": ["sae.l0_coeff=1", "sae.threshold_init=0.5"],
}


@pytest.fixture(scope="module")
def data():
    return make_data()


CASES = [(a, "32-true") for a in sorted(SETTINGS)] + [("topk", "bf16-mixed"), ("batchtopk", "bf16-mixed")]


@pytest.mark.parametrize(("arch", "precision"), CASES)
def test_architecture_recovers_the_true_directions(arch, precision, data, tmp_path):
    """Also under bf16 autocast (the GPU preset's precision; CPU torch runs it too) for the sparse-kernel
    architectures: catches dtype mixes in the kernels and thresholds, and bf16 master weights (exports must stay
    float32 and load). Every architecture also trains and exports in bf16 in tests/test_gpu_check.py."""
    from sfcd.sae.io import load_sae, save_sae

    acts, dirs = data
    cfg = compose(
        [
            f"trainer.precision={precision}",
            f"sae.architecture={arch}",
            "sae.batch_size=512",
            "sae.d_sae=128",
            "sae.lr=3e-3",
            "sae.n_tokens=400000",
            "sae.dead_tokens=5000",
            "sae.checkpoint_every=0",
            *SETTINGS[arch],
        ]
    )
    steps = cfg.sae.n_tokens // cfg.sae.batch_size
    module = SAEModule(make_specs(cfg.sae, {"x": 32}), cfg.sae, steps)
    train_module(module, cfg.trainer, tmp_path, {"x": acts})
    sae = module.saes[0]
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    _, tensors = sae.export()
    score = mmcs(dirs, tensors["W_dec"])
    assert score >= 0.95, f"{arch} ({precision}): mean max cosine {score:.3f}"
    loaded = load_sae(save_sae(sae, tmp_path / "saved", {}))
    x = torch.from_numpy(acts[:256])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), atol=1e-4, rtol=1e-4)
