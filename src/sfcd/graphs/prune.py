"""Influence, pruning and scores of an attribution graph, as circuit-tracer computes them (its ``graph.py``).

The adjacency matrix ``A`` has one row per target and one column per source, nodes ordered features, error nodes
(layer by layer, position by position), tokens, logits. ``Â`` is ``|A|`` with each row normalised to sum to 1;
a node's influence on the output is ``w (Â + Â² + …)`` with ``w`` the logit targets' probabilities (zero
elsewhere). Nodes are kept in order of influence until ``node_threshold`` of the total (tokens and logits
always), edges of the graph among them in order of ``Â[t, s] · (influence of t + w_t)`` until ``edge_threshold``;
then feature and error nodes left without an outgoing edge (features also without an incoming one) are dropped,
repeatedly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """``|matrix|`` with each row divided by its sum (rows of zeros stay zero)."""
    a = matrix.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(a: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``logit_weights (a + a² + …)``, summed until the term vanishes (the graph is acyclic, so ``a`` is
    nilpotent and the sum ends after at most the longest path's length)."""
    current = logit_weights @ a
    influence = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ a
        influence += current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (is the adjacency matrix acyclic?)")


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score at which the scores sorted from the largest down reach ``threshold`` of their total. At 1 the
    smallest positive score, so that "keep everything" keeps every nonzero score and no zero one (circuit-tracer
    searches the float32 cumulative sum, which may reach 1 before the last tiny scores or never reach it, keeping
    zeros too, depending on rounding)."""
    if threshold >= 1.0:
        positive = scores[scores > 0]
        return positive.min() if len(positive) else scores.new_tensor(float("inf"))
    ranked = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ranked, dim=0) / torch.sum(ranked)
    index = min(int(torch.searchsorted(cumulative, threshold).item()), len(cumulative) - 1)
    return ranked[index]


@dataclass
class Layout:
    """Where each kind of node sits in the adjacency matrix's order."""

    n_features: int
    n_layers: int
    n_pos: int
    n_logits: int

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits


@dataclass
class Pruned:
    node_mask: torch.Tensor  # [n] bool: nodes kept
    edge_mask: torch.Tensor  # [n, n] bool: edges kept (rows targets, columns sources)
    influence: torch.Tensor  # [n] each node's influence on the logits (logit nodes: 0)
    cumulative: torch.Tensor  # [n] share of the total influence of the nodes at least as influential


def logit_weights(adjacency: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(adjacency.shape[0], dtype=adjacency.dtype, device=adjacency.device)
    w[adjacency.shape[0] - len(probabilities) :] = probabilities.to(adjacency)
    return w


def prune_graph(
    adjacency: torch.Tensor,
    layout: Layout,
    probabilities: torch.Tensor,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Pruned:
    """The nodes and edges kept at ``node_threshold`` / ``edge_threshold`` of the cumulative influence
    (circuit-tracer's ``prune_graph``)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v}; expected a share between 0 and 1")
    n_fixed = layout.n_pos + layout.n_logits  # tokens and logits, always kept
    w = logit_weights(adjacency, probabilities)
    influence = compute_influence(normalize_matrix(adjacency), w)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[-n_fixed:] = True

    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_matrix(pruned)
    edge_scores = normalized * (compute_influence(normalized, w) + w)[:, None]
    edge_mask = (edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)) & (edge_scores > 0)

    old = node_mask.clone()
    node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)  # features and errors: an outgoing edge
    node_mask[: layout.n_features] &= edge_mask[: layout.n_features].any(1)  # features: an incoming edge
    while not torch.equal(node_mask, old):
        old.copy_(node_mask)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)
        node_mask[: layout.n_features] &= edge_mask[: layout.n_features].any(1)

    ranked, order = torch.sort(influence, descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = torch.cumsum(ranked, dim=0) / torch.sum(ranked)
    return Pruned(node_mask, edge_mask, influence, cumulative)


def graph_scores(adjacency: torch.Tensor, layout: Layout, probabilities: torch.Tensor) -> tuple[float, float]:
    """(replacement score, completeness score) of the unpruned graph, as circuit-tracer's
    ``compute_graph_scores``: the replacement score is the tokens' share of the influence that reaches the
    logits from tokens and error nodes (1: every path from the input runs through features); the completeness
    score is the non-error share of each node's normalised inputs, averaged with weights influence + logit
    probability."""
    w = logit_weights(adjacency, probabilities)
    normalized = normalize_matrix(adjacency)
    influence = compute_influence(normalized, w)
    token = influence[layout.token_start : layout.logit_start].sum()
    error = influence[layout.error_start : layout.token_start].sum()
    replacement = token / (token + error)
    non_error = 1 - normalized[:, layout.error_start : layout.token_start].sum(dim=-1)
    weight = influence + w
    completeness = (non_error * weight).sum() / weight.sum()
    return float(replacement), float(completeness)


def partial_influences(
    rows: torch.Tensor, probabilities: torch.Tensor, row_nodes: torch.Tensor, max_iter: int = 128
) -> torch.Tensor:
    """Influence of every node computed from the rows attributed so far (``rows`` [r, n], the node of each row
    in ``row_nodes``; the first rows are the logits'): circuit-tracer's ``compute_partial_influences``, which
    orders the features to attribute when ``max_feature_nodes`` caps them."""
    normalized = rows.abs()
    normalized /= normalized.sum(dim=1, keepdim=True).clamp(min=1e-8)
    influences = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    prod = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    prod[-len(probabilities) :] = probabilities.to(rows)
    for _ in range(max_iter):
        prod = prod[row_nodes] @ normalized
        if not prod.any():
            return influences
        influences += prod
    raise RuntimeError("partial influences did not converge")
