"""Transcoders through training: latents matched by encoder and decoder, their onsets, and the graph's paths."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from sfcd.development.transcoders import number_nodes, site_development, strongest_paths
from sfcd.paths import RunDir
from sfcd.sae.io import save_transcoder
from sfcd.sae.transcoder import Transcoder


def _unit(g, n, d):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _save(run: RunDir, step: int, enc: torch.Tensor, dec: torch.Tensor, density: torch.Tensor) -> None:
    tc = Transcoder(enc.shape[1], len(enc), k=2)
    with torch.no_grad():
        tc.W_enc.copy_(enc.t() * 3.0)  # norms differ from the directions': only directions count
        tc.W_dec.copy_(dec * 0.5)
    folder = save_transcoder(tc, run.transcoders(step) / "mlp.0", {"sfcd_site": "mlp.0"}, density)
    (folder / "metrics.json").write_text(json.dumps({"fve": 0.9}))


def test_onsets_and_shares_on_planted_transcoders(tmp_path):
    """Planted latents at three steps (a < b < c), the last step's 8 live latents: 0-2 present at a and b, 3-5
    from b, 6 at a but not b (a gap), 7 at b only by its decoder (its encoder is another direction), plus one
    dead latent at c. Onsets: a for 0-2, b for 3-5, c for 6 and 7; shares of the last live latents present:
    4/8 at a (0-2 and 6), 6/8 at b, 1 at c. Bugs caught: matching by the decoder
    alone (7 would date to b), an onset that skips gaps (6 would date to a), dead latents counted as live,
    permuted latent order read as different features."""
    g = torch.Generator().manual_seed(0)
    d, m = 16, 9
    enc_c, dec_c = _unit(g, m, d), _unit(g, m, d)
    dens_c = torch.tensor([0.1] * 8 + [0.0])  # latent 8 dead
    run = RunDir(tmp_path)
    _save(run, 30, enc_c, dec_c, dens_c)

    def step_with(present: list[int], decoder_only: list[int], seed: int):
        gg = torch.Generator().manual_seed(seed)
        enc, dec = _unit(gg, m, d), _unit(gg, m, d)
        perm = torch.randperm(m, generator=gg)  # another latent order
        for j in present:
            enc[perm[j]] = torch.nn.functional.normalize(enc_c[j] + 0.05 * torch.randn(d, generator=gg), dim=0)
            dec[perm[j]] = torch.nn.functional.normalize(dec_c[j] + 0.05 * torch.randn(d, generator=gg), dim=0)
        for j in decoder_only:
            dec[perm[j]] = dec_c[j]
        return enc, dec

    _save(run, 20, *step_with([0, 1, 2, 3, 4, 5], [7], 1), torch.full((m,), 0.1))
    _save(run, 10, *step_with([0, 1, 2, 6], [], 2), torch.full((m,), 0.1))
    dev = site_development(run, [10, 20, 30], "mlp.0", threshold=0.7)
    assert dev["live"] == 8
    assert dev["onset"] == {0: 10, 1: 10, 2: 10, 3: 20, 4: 20, 5: 20, 6: 30, 7: 30}
    assert dev["shared_with_final"] == pytest.approx([4 / 8, 6 / 8, 1.0])


def _all_paths(graph, source, target):
    out = {}
    for e in graph["links"]:
        out.setdefault(e["source"], []).append((e["target"], abs(e["weight"])))

    def walk(v, score, path):
        if v == target:
            yield score, path
        for w, x in out.get(v, []):
            yield from walk(w, score * x, [*path, w])

    yield from walk(source, 1.0, [source])


def test_strongest_paths_equal_brute_force_enumeration():
    """On a random layered DAG (tokens -> 3 feature layers -> logit), the top 3 paths through a set of nodes by
    product of |weight| equal those found by enumerating every path. Bugs caught: the "through" condition
    dropped, only one partial path kept per node, signed weights multiplied."""
    rng = np.random.default_rng(0)
    layers = [["T@0", "T@1"], [f"F0.{i}@1" for i in range(4)], [f"F1.{i}@1" for i in range(4)], ["L5"]]
    links = [
        {"source": a, "target": b, "weight": float(rng.normal())}
        for la, lb in itertools.pairwise(layers)
        for a in la
        for b in lb
        if rng.random() < 0.8
    ] + [{"source": "T@1", "target": "L5", "weight": 5.0}]  # the strongest path avoids the number nodes
    graph = {"links": links}
    through = {"F0.1@1", "F1.2@1"}
    want = sorted((p for p in _all_paths(graph, "T@1", "L5") if through & set(p[1])), key=lambda t: -t[0])[:3]
    got = strongest_paths(graph, "T@1", "L5", through, n=3)
    assert [g["path"] for g in got] == [p for _, p in want]
    assert [g["score"] for g in got] == pytest.approx([s for s, _ in want])


def test_number_nodes_are_the_features_that_change_with_the_subject():
    """A kept feature node carries number when its activation on the flipped prompt differs by more than half
    of itself (in either direction); error and token nodes never do. Bug caught: a signed comparison."""
    graph = {
        "nodes": [
            {"id": "F0.1@2", "kind": "feature", "layer": 0, "position": 2, "latent": 1, "activation": 2.0},
            {"id": "F0.2@2", "kind": "feature", "layer": 0, "position": 2, "latent": 2, "activation": 2.0},
            {"id": "F1.0@3", "kind": "feature", "layer": 1, "position": 3, "latent": 0, "activation": 1.0},
            {"id": "E0@2", "kind": "error", "layer": 0, "position": 2, "latent": None, "activation": None},
        ]
    }
    flipped = {0: torch.zeros(4, 3), 1: torch.zeros(4, 3)}
    flipped[0][2, 1], flipped[0][2, 2], flipped[1][3, 0] = 1.5, 3.5, 0.0  # -25%, +75%, -100%
    assert [n["id"] for n in number_nodes(graph, flipped)] == ["F0.2@2", "F1.0@3"]
