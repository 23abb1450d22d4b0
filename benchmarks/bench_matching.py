"""Time to match two 32k-feature SAEs (d_in 512) by decoder cosine: candidates, assignment, total.
The second SAE is a permuted, perturbed copy of half of the first's features plus new ones. One JSON line."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sfcd.development.matching import match_decoders


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--features", type=int, default=32768)
    p.add_argument("--d-in", type=int, default=512)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    W = torch.randn(a.features, a.d_in, generator=g)
    half = a.features // 2
    perm = torch.randperm(a.features, generator=g)
    W2 = torch.cat(
        [
            W[perm[:half]] + 0.3 * torch.randn(half, a.d_in, generator=g),
            torch.randn(a.features - half, a.d_in, generator=g),
        ]
    )
    t = time.perf_counter()
    m = match_decoders(W2, W)
    dt = time.perf_counter() - t
    recovered = float(np.mean(m.match[:half] == perm[:half].numpy()))
    print(
        json.dumps(
            {
                "figure": "match_decoders",
                "features": a.features,
                "d_in": a.d_in,
                "seconds": round(dt, 1),
                "shared_fraction": round(m.shared_fraction(), 3),
                "planted_pairs_recovered": round(recovered, 4),
                "mmcs": round(m.mmcs, 3),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
