"""A plain training loop for small crosscoders in tests: Adam on the crosscoder's own loss, on inputs scaled per
checkpoint (what the SAE loop does, without Lightning, resume or AuxK), so a planted series fits in seconds."""

from __future__ import annotations

import numpy as np
import torch

from sfcd.crosscoders.model import BatchTopKCrosscoder


def fit(
    x: np.ndarray | torch.Tensor,
    K: int,
    m: int = 128,
    k: int = 3,
    steps: int = 400,
    lr: float = 0.01,
    batch: int = 1024,
    seed: int = 0,
) -> BatchTopKCrosscoder:
    x = torch.as_tensor(x, dtype=torch.float32)
    torch.manual_seed(seed)
    cc = BatchTopKCrosscoder(
        x.shape[1], m, seed=seed, n_blocks=K, k=k, aux_coeff=0.0, sparse=False
    )  # dense: faster here
    cc.fit_input_scale(x[:8192])
    opt = torch.optim.Adam(cc.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(len(x), (batch,), generator=g)
        out = cc.training_loss(x[rows] * cc.scale, step / steps)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        opt.step()
    return cc.eval()
