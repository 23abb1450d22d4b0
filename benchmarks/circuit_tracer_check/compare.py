"""Compare sfcd's unpruned attribution graph (``<out>/sfcd_graph.npz``) with circuit-tracer's (``<out>/ct_graph.npz``).

Nodes are aligned by identity (feature (layer, pos, index), error (layer, pos), token pos, logit vocab id), so a
different node order would not count as a difference. Prints one JSON line ``{"figure": ..., "value": ...}`` per
figure: token ids, feature sets and logit targets, per-block and whole-matrix differences, each tool's own
replacement and completeness scores, and pruning masks (circuit-tracer's ``prune_graph`` on both adjacency
matrices, and sfcd's ``prune_graph`` masks from ``sfcd_side.py`` against circuit-tracer's on sfcd's matrix).

Exit status 1 when the graphs disagree: different token ids, feature sets or logit targets, a relative norm
``||A_sfcd - A_ct||_F / ||A_sfcd||_F`` above ``--tolerance`` (1e-4), or different masks at the default
thresholds (0.8, 0.98). Masks at (1.0, 1.0) are shown but not checked: at threshold 1.0 the cut depends on
where float32 rounding leaves the cumulative share against 1.0, so tiny differences in the matrix move it.

Run with circuit-tracer's venv (numpy, torch, circuit_tracer).
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from circuit_tracer.graph import prune_graph

CHECKED_THRESHOLDS = (0.8, 0.98)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder holding sfcd_graph.npz and ct_graph.npz")
    p.add_argument("--ct-graph", default="ct_graph.npz", help="circuit-tracer's npz, under --out")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed relative Frobenius norm")
    return p.parse_args()


def emit(figure: str, value) -> None:
    print(json.dumps({"figure": figure, "value": value}), flush=True)


def node_keys(features, n_layers: int, n_pos: int, logit_ids) -> list[tuple]:
    """Node identities in adjacency order: features, errors (layer-major), tokens, logits."""
    keys = [("feature", *map(int, f)) for f in features]
    keys += [("error", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    keys += [("token", pos) for pos in range(n_pos)]
    keys += [("logit", int(v)) for v in logit_ids]
    return keys


def ct_prune(adjacency: np.ndarray, s, thresholds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's prune_graph on ``adjacency`` (in sfcd's node order), through a stand-in for its Graph."""
    g = SimpleNamespace(
        adjacency_matrix=torch.tensor(adjacency, dtype=torch.float32),
        input_tokens=torch.tensor(s["token_ids"]),
        logit_targets=list(range(len(s["logit_ids"]))),
        selected_features=torch.arange(len(s["features"])),
        logit_probabilities=torch.tensor(s["probabilities"]),
    )
    r = prune_graph(g, *thresholds)
    return r.node_mask.numpy(), r.edge_mask.numpy()


def main() -> int:
    args = parse_args()
    s = np.load(args.out / "sfcd_graph.npz")
    c = np.load(args.out / args.ct_graph)
    n_layers, n_pos = int(s["n_layers"]), int(s["n_pos"])
    ok = True

    same_ids = bool(np.array_equal(s["token_ids"], c["token_ids"]))
    emit("token ids equal", same_ids)
    emit("token ids (sfcd)", s["token_ids"].tolist())
    emit("circuit-tracer's ids for the prompt string (not used)", c["ids_from_string"].tolist())

    sf = s["features"]
    cf = c["active_features"][c["selected"]]
    ks = node_keys(sf, n_layers, n_pos, s["logit_ids"])
    kc = node_keys(cf, n_layers, n_pos, c["logit_ids"])
    same_features = {k for k in ks if k[0] == "feature"} == {k for k in kc if k[0] == "feature"}
    same_logits = bool(np.array_equal(s["logit_ids"], c["logit_ids"]))
    emit("features (sfcd, circuit-tracer)", [len(sf), len(cf)])
    emit("feature sets identical", same_features)
    emit("feature order identical", ks[: len(sf)] == kc[: len(cf)])
    emit("logit targets identical (ids and order)", same_logits)
    emit("logit targets", s["logit_ids"].tolist())
    if not (same_ids and same_features and same_logits):
        emit("verdict", "FAIL: the graphs' nodes differ, nothing further compared")
        return 1

    emit("logit probabilities max abs diff", float(np.abs(s["probabilities"] - c["probabilities"]).max()))
    index = {k: i for i, k in enumerate(kc)}
    perm = np.array([index[k] for k in ks])
    ca = c["activations"][c["selected"]][perm[: len(sf)]]
    emit("feature activations max abs diff", float(np.abs(s["activations"] - ca).max()))

    a_s = s["adjacency"].astype(np.float64)
    a_c = c["adjacency"].astype(np.float64)[np.ix_(perm, perm)]
    nf = len(sf)
    e0, t0, l0 = nf, nf + n_layers * n_pos, nf + n_layers * n_pos + n_pos
    blocks = {
        "feature->feature": (slice(0, nf), slice(0, nf)),
        "error->feature": (slice(0, nf), slice(e0, t0)),
        "token->feature": (slice(0, nf), slice(t0, l0)),
        "feature->logit": (slice(l0, None), slice(0, nf)),
        "error->logit": (slice(l0, None), slice(e0, t0)),
        "token->logit": (slice(l0, None), slice(t0, l0)),
    }
    outside = np.ones_like(a_s, dtype=bool)
    for name, (rows, cols) in blocks.items():
        x, y = a_s[rows, cols], a_c[rows, cols]
        outside[rows, cols] = False
        emit(f"{name} nonzero edges (sfcd)", int((x != 0).sum()))
        emit(f"{name} max |weight| (sfcd)", float(np.abs(x).max()))
        emit(f"{name} max abs diff", float(np.abs(x - y).max()))
        emit(f"{name} relative norm", float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)))
    rest = [float(np.abs(m[outside]).max(initial=0.0)) for m in (a_s, a_c)]
    emit("max |weight| outside those blocks (sfcd, circuit-tracer)", rest)
    rel = float(np.linalg.norm(a_s - a_c) / np.linalg.norm(a_s))
    emit("whole matrix max abs diff", float(np.abs(a_s - a_c).max()))
    emit("whole matrix relative norm", rel)
    ok &= rel <= args.tolerance and not np.abs(a_c[outside]).any()

    emit("replacement score (sfcd, circuit-tracer)", [float(s["replacement"]), float(c["replacement"])])
    emit("completeness score (sfcd, circuit-tracer)", [float(s["completeness"]), float(c["completeness"])])

    for nt, et in (tuple(t) for t in s["thresholds"].tolist()):
        tag = f"prune({nt}, {et})"
        checked = (nt, et) == CHECKED_THRESHOLDS
        if not checked:
            tag += " [not checked]"
        node_s, edge_s = ct_prune(a_s, s, (nt, et))
        node_c, edge_c = ct_prune(a_c, s, (nt, et))
        sf_node, sf_edge = s[f"prune_{nt}_{et}_node"], s[f"prune_{nt}_{et}_edge"]
        same_ct = bool(np.array_equal(node_s, node_c) and np.array_equal(edge_s, edge_c))
        same_tools = bool(np.array_equal(sf_node, node_s) and np.array_equal(sf_edge, edge_s))
        emit(f"{tag} nodes/edges kept: circuit-tracer on sfcd A", [int(node_s.sum()), int(edge_s.sum())])
        emit(f"{tag} nodes/edges kept: circuit-tracer on circuit-tracer A", [int(node_c.sum()), int(edge_c.sum())])
        emit(f"{tag} nodes/edges kept: sfcd on sfcd A", [int(sf_node.sum()), int(sf_edge.sum())])
        emit(f"{tag} masks equal: circuit-tracer on sfcd A vs on circuit-tracer A", same_ct)
        emit(f"{tag} masks equal: sfcd vs circuit-tracer prune on sfcd A", same_tools)
        if checked:
            ok &= same_ct and same_tools

    emit(
        "verdict", "PASS" if ok else f"FAIL (tolerance {args.tolerance:g} relative norm, masks at {CHECKED_THRESHOLDS})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
