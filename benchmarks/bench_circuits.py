"""Edge computation: the fast mode (one backward per downstream node) against the reference mode (one per
example, position and node), on identical inputs, in one run; and node-effect time for 100 pairs.

A demo-sized GPT-NeoX (2 layers, d_model 128) with random weights and random TopK SAEs (d_sae 1024) at the
7 sites; 100 contrastive pairs of 6 tokens. Prints one JSON line per figure.
"""

from __future__ import annotations

import json
import time

import torch
from transformers import GPTNeoXForCausalLM

from sfcd.circuits.data import PairBatch
from sfcd.circuits.effects import edge_effects, edge_pairs, node_effects
from sfcd.config import compose
from sfcd.models.presets import neox_config
from sfcd.models.sites import parse_site, valid_sites
from sfcd.sae.topk import TopKSAE


def main() -> None:
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(neox_config(compose(["model=tiny"]).model, 820)).eval()  # the demo's preset
    for p in model.parameters():
        p.requires_grad_(False)
    sites = [parse_site(s, model) for s in valid_sites(model) if not s.startswith("mlp_act")]
    dicts = {s: TopKSAE(128, 1024, seed=i, k=32).eval() for i, s in enumerate(sites)}
    g = torch.Generator().manual_seed(0)
    n, T = 100, 6
    clean = torch.randint(2, 820, (n, T), generator=g)
    patch = clean.clone()
    patch[:, 1] = torch.randint(2, 820, (n,), generator=g)
    batch = [
        PairBatch(
            clean[i : i + 32],
            patch[i : i + 32],
            torch.randint(2, 820, (len(clean[i : i + 32]),), generator=g),
            torch.randint(2, 820, (len(clean[i : i + 32]),), generator=g),
        )
        for i in range(0, n, 32)
    ]
    for method in ("attrib", "ig"):
        t = time.perf_counter()
        effs = [node_effects(model, dicts, b, method) for b in batch]
        print(
            json.dumps(
                {
                    "figure": "node_effects_100_pairs",
                    "method": method,
                    "sites": len(sites),
                    "seconds": round(time.perf_counter() - t, 2),
                }
            )
        )
    b, eff = batch[0], effs[0]
    fast_t = ref_t = 0.0
    max_diff = 0.0
    for up, down, stop in edge_pairs(sites):
        nodes = [int(i) for i in eff[down].ie_f.sum((0, 1)).abs().topk(5).indices] + [-1]
        t = time.perf_counter()
        fast = edge_effects(model, dicts, b, up, down, stop, eff, nodes)
        fast_t += time.perf_counter() - t
        t = time.perf_counter()
        ref = edge_effects(model, dicts, b, up, down, stop, eff, nodes, reference=True)
        ref_t += time.perf_counter() - t
        max_diff = max(max_diff, (fast - ref).abs().max().item())
    print(
        json.dumps(
            {
                "figure": "edges_fast_vs_reference",
                "pairs_of_sites": len(edge_pairs(sites)),
                "downstream_nodes_per_pair": 6,
                "examples": len(b),
                "positions": T,
                "fast_s": round(fast_t, 3),
                "reference_s": round(ref_t, 3),
                "speedup": round(ref_t / fast_t, 1),
                "max_abs_difference": max_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
