"""Edge computation: the fast mode (one backward per downstream node) against the reference mode (one per
example, position and node), on identical inputs, in one run; and node-effect time for 100 pairs.

A demo-sized GPT-NeoX (2 layers, d_model 128) with random weights and random TopK SAEs (d_sae 1024) at the
7 sites; 100 contrastive pairs of 6 tokens. Prints one JSON line per figure.

``--pythia``: the paper's scale, through the circuit stage's own functions: a Pythia-70m-shaped model (random
weights) with 32,768-feature TopK SAEs at all 19 sites, 100 pairs of 8 tokens in batches of 32; time and peak
RSS for the node effects and for the edges between the ~100 strongest nodes, and what the per-batch state
for edges holds (compact) against the four dense [B, T, F] tensors per site it held before.

    python benchmarks/bench_circuits.py [--pythia [--method attrib|ig] [--nodes 100]]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import GPTNeoXForCausalLM

from sfcd.circuits.data import PairBatch
from sfcd.circuits.effects import edge_effects, edge_pairs, node_effects
from sfcd.config import compose
from sfcd.models.presets import neox_config
from sfcd.models.sites import parse_site, valid_sites
from sfcd.sae.topk import TopKSAE


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pythia(method: str, n_nodes: int) -> None:
    from omegaconf import OmegaConf

    from sfcd.circuits.stage import all_effects, circuit_edges, keep_masks

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(neox_config(compose(["model=pythia-70m-deduped"]).model, 50304)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sites = [parse_site(s, model) for s in valid_sites(model) if not s.startswith("mlp_act")]
    dicts = {s: TopKSAE(512, 32768, seed=i, k=32).eval() for i, s in enumerate(sites)}
    g = torch.Generator().manual_seed(0)
    n, T, B = 100, 8, 32
    clean = torch.randint(2, 50000, (n, T), generator=g)
    patch = clean.clone()
    patch[:, 2] = torch.randint(2, 50000, (n,), generator=g)
    answers = torch.randint(2, 50000, (2, n), generator=g)
    bs = [
        PairBatch(clean[i : i + B], patch[i : i + B], answers[0, i : i + B], answers[1, i : i + B])
        for i in range(0, n, B)
    ]
    c = OmegaConf.create({"method": method, "steps": 10, "aggregation": "sum", "edges": True, "ig_batch": 256})
    base = rss_gib()
    t = time.perf_counter()
    per_batch, agg, n_ex = all_effects(model, dicts, bs, c)
    t_nodes, rss_nodes = time.perf_counter() - t, rss_gib()
    sizes = torch.cat([f.abs().flatten() for f, _ in agg.values()] + [e.abs().flatten() for _, e in agg.values()])
    tau = float(sizes.topk(n_nodes).values[-1])
    keep = keep_masks(agg, tau, True)
    nodes = []
    for s in sites:
        f, err = agg[s]
        mask, ke = keep[s]
        nodes += [
            {"id": f"{s.name}/{j}", "site": s.name, "feature": j, "position": None, "effect": float(f[j])}
            for j in mask.nonzero().flatten().tolist()
        ]
        if bool(ke):
            nodes.append(
                {"id": f"{s.name}/eps", "site": s.name, "feature": None, "position": None, "effect": float(err)}
            )
    t = time.perf_counter()
    edges = circuit_edges(model, dicts, bs, per_batch, sites, keep, n_ex, False, nodes)
    t_edges, rss_edges = time.perf_counter() - t, rss_gib()
    B_T_F = sum(len(b) for b in bs) * T * 32768
    dense_gib = 4 * len(sites) * B_T_F * 4 / 2**30  # f, delta, grad, effect per site, float32
    compact_gib = (
        sum(
            t._nnz() * (t.ndim * 8 + 4)
            for e in per_batch
            for se in e.values()
            for t in (se.f_clean, se.delta_f, se.grad_f, se.ie_f)
        )
        / 2**30
    )
    print(
        json.dumps(
            {
                "figure": "pythia70m_shaped_circuit",
                "method": method,
                "sites": len(sites),
                "d_sae": 32768,
                "pairs": n,
                "positions": T,
                "nodes_kept": len(nodes),
                "edges": len(edges),
                "nodes_s": round(t_nodes, 1),
                "edges_s": round(t_edges, 1),
                "rss_before_gib": round(base, 2),
                "peak_rss_after_nodes_gib": round(rss_nodes, 2),
                "peak_rss_after_edges_gib": round(rss_edges, 2),
                "edge_state_dense_gib": round(dense_gib, 2),
                "edge_state_compact_gib": round(compact_gib, 3),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pythia", action="store_true", help="the paper's scale (slow on a CPU)")
    ap.add_argument("--method", default="attrib", choices=["attrib", "ig"])
    ap.add_argument("--nodes", type=int, default=100)
    a = ap.parse_args()
    if a.pythia:
        return pythia(a.method, a.nodes)
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
