"""Influence, pruning and the two scores on a hand-made graph, computed by hand (circuit-tracer's rules)."""

from __future__ import annotations

import pytest
import torch

from sfcd.graphs.prune import Layout, compute_influence, graph_scores, normalize_matrix, prune_graph

# nodes: f0, f1 (features), e0, e1 (errors: 1 layer x 2 positions), t0, t1 (tokens), y (one logit, p = 1)
F0, F1, E0, E1, T0, T1, Y = range(7)
LAYOUT = Layout(n_features=2, n_layers=1, n_pos=2, n_logits=1)
P = torch.tensor([1.0], dtype=torch.float64)


def hand_graph() -> torch.Tensor:
    a = torch.zeros(7, 7, dtype=torch.float64)
    a[Y, F1], a[Y, E1] = 3.0, -1.0  # normalised: 0.75, 0.25
    a[F1, F0], a[F1, T1] = 1.0, -1.0  # 0.5, 0.5
    a[F0, T0], a[F0, E0] = 2.0, 2.0  # 0.5, 0.5
    return a


def test_influence_and_scores_by_hand():
    # influence: y -> f1 .75, e1 .25; f1 -> f0 .375, t1 .375; f0 -> t0 .1875, e0 .1875
    # catches: |A| not row-normalised, the sum stopped after A (direct effects only), a sign kept
    a = hand_graph()
    w = torch.tensor([0, 0, 0, 0, 0, 0, 1.0], dtype=torch.float64)
    influence = compute_influence(normalize_matrix(a), w)
    want = torch.tensor([0.375, 0.75, 0.1875, 0.25, 0.1875, 0.375, 0.0], dtype=torch.float64)
    torch.testing.assert_close(influence, want)
    # replacement: tokens / (tokens + errors) = .5625 / (.5625 + .4375)
    # completeness: non-error share of each row (y .75, f0 .5, others 1) weighted by influence + p: 2.6875 / 3.125
    # catches: errors counted as tokens (or features in the replacement score), completeness weighted without p
    replacement, completeness = graph_scores(a, LAYOUT, P)
    assert replacement == pytest.approx(0.5625)
    assert completeness == pytest.approx(2.6875 / 3.125)


def test_influence_equals_the_matrix_series_on_a_random_dag():
    # the series w (Â + Â² + ...) equals w ((I - Â)^-1 - I) for an acyclic graph
    # catches: the iteration stopping early (e.g. after a fixed number of terms)
    g = torch.Generator().manual_seed(0)
    n = 30
    a = torch.randn(n, n, generator=g, dtype=torch.float64).tril(-1)  # sources before targets: a DAG
    a = a.flip(0).flip(1)  # targets read later nodes, as logits read features
    w = torch.zeros(n, dtype=torch.float64)
    w[:3] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    hat = normalize_matrix(a)
    want = w @ (torch.linalg.inv(torch.eye(n, dtype=torch.float64) - hat) - torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(compute_influence(hat, w), want)


def test_pruning_by_hand():
    # node influences .75 (f1), .375 (f0, t1), .25 (e1), .1875 (e0, t0); shares .35 .53 .71 .82 ...: at 0.8 the
    # threshold is .25, so e0 goes (tokens and the logit stay whatever their influence). Among the rest the edge
    # scores Â (pruned, renormalised) x (influence + p) are y<-f1 .75, f1<-f0 .375, f1<-t1 .375, f0<-t0 .375,
    # y<-e1 .25: at 0.98 all five stay; at 0.85 (shares .35 .53 .71 .88 1) y<-e1 goes, and e1 with it (no
    # outgoing edge left).
    # catches: tokens or logits pruned, edge scores without the logit probability, nodes left without edges,
    # the cumulative share computed on the wrong order
    a = hand_graph()
    r = prune_graph(a, LAYOUT, P, 0.8, 0.98)
    assert r.node_mask.tolist() == [True, True, False, True, True, True, True]
    kept = {(int(t), int(s)) for t, s in r.edge_mask.nonzero()}
    assert kept == {(Y, F1), (Y, E1), (F1, F0), (F1, T1), (F0, T0)}
    r = prune_graph(a, LAYOUT, P, 0.8, 0.85)
    assert r.node_mask.tolist() == [True, True, False, False, True, True, True]
    assert {(int(t), int(s)) for t, s in r.edge_mask.nonzero()} == {(Y, F1), (F1, F0), (F1, T1), (F0, T0)}
    total = 2.125
    torch.testing.assert_close(r.cumulative[F1], torch.tensor(0.75 / total, dtype=torch.float64))
    torch.testing.assert_close(r.cumulative[E1], torch.tensor(1.75 / total, dtype=torch.float64))


def test_nodes_left_without_edges_go():
    # y <- f1, t1 (.5 each); f1 <- f0, e1 (.5 each); f0 <- t0. Edge scores .5 .5 .25 .25 .25: at 0.5 only the
    # two edges into y stay, so f1 (no incoming edge), f0 and e1 (no outgoing edge) go, and y <- f1 with f1;
    # tokens always stay
    # catches: features kept without an incoming edge, features or errors kept without an outgoing one
    a = torch.zeros(7, 7, dtype=torch.float64)
    a[Y, F1], a[Y, T1] = 1.0, 1.0
    a[F1, F0], a[F1, E1] = 1.0, -1.0
    a[F0, T0] = 1.0
    r = prune_graph(a, LAYOUT, P, 1.0, 0.5)
    assert r.node_mask.tolist() == [False, False, False, False, True, True, True]
    assert {(int(t), int(s)) for t, s in r.edge_mask.nonzero()} == {(Y, T1)}


def test_thresholds_of_one_keep_every_nonzero_edge_and_no_zero_one():
    """At node and edge thresholds 1, the pruned graph is the whole graph: every nonzero edge between nodes with
    influence, whatever the float32 rounding of the cumulative sum (here scores spanning 1e-9 to 1, whose sum
    reaches 1 before the smallest), and no zero-weight edge. Bugs caught: circuit-tracer's threshold search at 1
    (tiny edges dropped when the sum reaches 1 early, or zeros kept when it never does)."""
    a = hand_graph().float()
    a[F1, T0] = 1e-9  # a tiny but real edge
    pruned = prune_graph(a, LAYOUT, P.float(), node_threshold=1.0, edge_threshold=1.0)
    assert torch.equal(pruned.edge_mask, a != 0)
