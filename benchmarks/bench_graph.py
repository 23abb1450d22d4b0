"""Attribution graph at a Pythia-70m shape: a random-weight GPT-NeoX (hidden 512, 6 layers, 8 heads, intermediate
2048, vocab 50304) with random 32,768-latent TopK (k 32) skip transcoders at every MLP, one 16-token prompt; the
seconds of each phase (setup, logit rows, feature rows, pruning and scores) and the process's peak RSS. Prints one
JSON line per figure.

    python benchmarks/bench_graph.py [--tokens 16] [--batch-size 256] [--max-feature-nodes N]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfcd.graphs.attribution import attribute  # noqa: E402
from sfcd.graphs.prune import graph_scores, prune_graph  # noqa: E402
from sfcd.sae.transcoder import Transcoder  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def emit(figure: str, value, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, **extra}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    tcs = []
    for layer in range(6):
        tc = Transcoder(512, args.d_sae, seed=layer, k=32, skip=True)
        with torch.no_grad():
            tc.W_dec.normal_(0, 0.02)
            tc.W_skip.normal_(0, 0.02)
        tcs.append(tc.eval())
    ids = torch.randint(2, 50000, (args.tokens,))
    ids[0] = 0
    base = rss_gib()
    t = time.perf_counter()
    graph = attribute(model, tcs, ids, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
    t_attr = time.perf_counter() - t
    rss_attr = rss_gib()
    t = time.perf_counter()
    pruned = prune_graph(graph.adjacency, graph.layout, graph.probabilities)
    scores = graph_scores(graph.adjacency, graph.layout, graph.probabilities)
    t_prune = time.perf_counter() - t
    shape = {
        "tokens": args.tokens,
        "d_sae": args.d_sae,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }
    emit("graph_attribution_s", round(t_attr, 1), **shape, **{k: round(v, 2) for k, v in graph.timing.items()})
    emit("graph_prune_and_scores_s", round(t_prune, 2), nodes=graph.layout.n_nodes)
    emit("graph_active_features", graph.n_active, attributed=graph.layout.n_features, logits=graph.layout.n_logits)
    emit("graph_nodes_kept", int(pruned.node_mask.sum()), edges_kept=int(pruned.edge_mask.sum()))
    emit("graph_scores", {"replacement": round(scores[0], 4), "completeness": round(scores[1], 4)})
    emit("graph_peak_rss_gib", round(max(rss_attr, rss_gib()), 2), before_gib=round(base, 2))


if __name__ == "__main__":
    main()
