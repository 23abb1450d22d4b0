"""sfcd's side of the circuit-tracer check: the full, unpruned attribution graph of ``--prompt`` from
``sfcd.graphs.attribution.attribute`` (transcoders at every MLP), its scores and pruning masks from
``sfcd.graphs.prune``, and the plain Hugging Face model's logits and per-layer MLP input/output (to cross-check
TransformerLens' hooks on the other side). Writes ``<out>/sfcd_graph.npz``.

Run with sfcd's interpreter (``/work/main/.venv/bin/python``), never with circuit-tracer's venv.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sfcd.graphs.attribution import attribute, tokenize
from sfcd.graphs.prune import graph_scores, prune_graph
from sfcd.models.loading import load_model, load_tokenizer
from sfcd.sae.io import load_transcoder

# (node_threshold, edge_threshold) pairs whose masks are compared with circuit-tracer's prune_graph
THRESHOLDS = ((0.8, 0.98), (1.0, 1.0))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="sfcd run with model/step<N>/ and transcoders/step<N>/")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--prompt", default="The athlete that the chefs")
    p.add_argument("--out", type=Path, required=True, help="work folder for the npz files")
    return p.parse_args()


def mlp_in_out(model, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's MLP input (after post_attention_layernorm, weight and bias included) and output, [layer, pos, d]."""
    ins, outs, handles = {}, {}, []
    for layer, block in enumerate(model.gpt_neox.layers):

        def hook(_module, args, output, layer=layer):
            ins[layer] = args[0][0].detach().numpy()
            outs[layer] = output[0].detach().numpy()

        handles.append(block.mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        for h in handles:
            h.remove()
    n = len(model.gpt_neox.layers)
    return np.stack([ins[i] for i in range(n)]), np.stack([outs[i] for i in range(n)])


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model_dir = args.run_dir / "model" / f"step{args.step}"
    tc_dir = args.run_dir / "transcoders" / f"step{args.step}"
    model = load_model(str(model_dir), None, dtype="float32")
    tok = load_tokenizer(str(model_dir))
    n_layers = model.config.num_hidden_layers
    tcs = [load_transcoder(str(tc_dir / f"mlp.{layer}")) for layer in range(n_layers)]
    ids = tokenize(tok, args.prompt)
    g = attribute(model, tcs, ids, max_logits=10, logit_probability=0.95, batch_size=256, max_feature_nodes=None)
    rep, comp = graph_scores(g.adjacency, g.layout, g.probabilities)
    with torch.no_grad():
        hf_logits = model(ids[None]).logits[0].numpy()
    mlp_in, mlp_out = mlp_in_out(model, ids)
    masks = {}
    for nt, et in THRESHOLDS:
        r = prune_graph(g.adjacency, g.layout, g.probabilities, nt, et)
        masks[f"prune_{nt}_{et}_node"] = r.node_mask.numpy()
        masks[f"prune_{nt}_{et}_edge"] = r.edge_mask.numpy()

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out / "sfcd_graph.npz",
        token_ids=g.token_ids.numpy(),
        features=g.features.numpy(),
        activations=g.activations.numpy(),
        logit_ids=g.logit_ids.numpy(),
        probabilities=g.probabilities.numpy(),
        adjacency=g.adjacency.numpy(),
        n_features=g.layout.n_features,
        n_layers=g.layout.n_layers,
        n_pos=g.layout.n_pos,
        n_logits=g.layout.n_logits,
        replacement=rep,
        completeness=comp,
        hf_logits=hf_logits,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        thresholds=np.array(THRESHOLDS),
        **masks,
    )
    summary = {
        "side": "sfcd",
        "ids": ids.tolist(),
        "n_features": g.layout.n_features,
        "logits": g.logit_ids.tolist(),
        "replacement": rep,
        "completeness": comp,
        "adjacency_shape": list(g.adjacency.shape),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
