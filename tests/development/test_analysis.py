"""The development analysis on planted run folders: the floor's columns through analyse(), per-position circuit
ids through translation, edge Jaccard at the edge threshold, and unresolvable faithfulness carried as None."""

import csv
import json

import numpy as np
import torch
from scipy.stats import poisson

from sfcd.development.analysis import analyse, circuit_development, translate
from sfcd.development.matching import Matching
from sfcd.io import write_json
from sfcd.paths import RunDir
from sfcd.sae.io import save_sae
from sfcd.sae.topk import TopKSAE
from tests.development.test_floor import D, truth, two_seeds, unit

WIDTH = 60  # every planted SAE padded to this many features with dead ones (never fired)


def save_planted(run: RunDir, step: int, name: str, W: torch.Tensor, dead_first: int) -> np.ndarray:
    """An SAE whose live decoder rows are ``W``, after ``dead_first`` dead rows (and more at the end); returns
    the full index of each row of ``W``."""
    sae = TopKSAE(D, WIDTH, k=2)
    idx = np.arange(dead_first, dead_first + len(W))
    with torch.no_grad():
        sae.W_dec[idx] = W * sae.scale  # export divides by the input scale
    density = torch.zeros(WIDTH)
    density[idx] = 0.01
    folder = run.root / "saes" / f"step{step}" / name
    save_sae(sae, folder, {}, density)
    write_json(folder / "metrics.json", {"fve": 0.9, "l0": 2.0, "dead_fraction": 0.1})
    return idx


def test_analyse_reports_births_beyond_the_floor_raw_counts_and_the_floor(tmp_path):
    g = torch.Generator().manual_seed(7)
    T0 = truth(40, g)
    new = truth(4, g)
    T1 = torch.cat([T0[5:], new])  # step 2 drops features 0-4 and gains 4
    a0, b0 = two_seeds(T0, g, list(range(5, 40)))
    a1, b1 = two_seeds(T1, g, list(range(35)))
    run = RunDir(tmp_path)
    save_planted(run, 1, "resid.0", a0, 3)
    save_planted(run, 1, "resid.0@seed=2", b0, 0)
    idx1 = save_planted(run, 2, "resid.0", a1, 5)
    save_planted(run, 2, "resid.0@seed=3", b1, 1)
    out = analyse(run, [1, 2], ["resid.0"], [], 0.7, {1: "@seed=2", 2: "@seed=3"})
    rows = list(csv.DictReader((tmp_path / "development" / "sae_development.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["1", "2"]
    # the per-feature rule finds exactly the planted changes; the reported counts are what exceeds the crossed-seed
    # null's 95% upper bound (Poisson of its mean count, at least its largest), computed here from the null
    rule = tuple(int(rows[1][f"{x}_rule"]) for x in ("births", "deaths", "splits", "merges"))
    assert rule == (4, 5, 0, 0)
    for x, n in zip(("births", "deaths", "splits", "merges"), rule, strict=True):
        mean, top = float(rows[1][f"{x}_null"]), int(rows[1][f"{x}_null_max"])
        hi = max(top, int(poisson.ppf(0.95, mean)) if mean > 0 else 0)
        assert int(rows[1][x]) == max(0, n - hi)
    assert int(rows[1]["births"]) >= 3 and int(rows[1]["deaths"]) >= 4
    assert int(rows[1]["births_raw"]) > 4 and int(rows[1]["deaths_raw"]) >= 5  # seed noise on top
    assert rows[0]["births"] == ""  # no previous step
    # the seeds paired across the steps: the planted changes drop out, only seed variance is left (here none:
    # the seeds of one step never miss the same feature, and a feature missed by a0 and a1 alike is not planted)
    assert float(rows[1]["births_null"]) <= 1 and float(rows[1]["deaths_null"]) <= 1
    # the floor at each step: the two seeds' own births (3 junk + 3 missed by the other seed), with a band
    for r in rows:
        assert int(r["floor_births"]) == 6 and float(r["floor_births_lo"]) < 6 < float(r["floor_births_hi"])
        assert 0 < float(r["floor_shared"]) < 1
    dev = json.loads((tmp_path / "development" / "development.json").read_text())  # strict JSON
    site = dev["sites"]["resid.0"]
    assert all(len(v) == 4 for v in site["changes"][0]["null"].values())  # four crossed pairings
    born = site["changes"][0]["born_features"]  # full SAE indices of step 2's born features
    cos = unit(a1[[int(np.nonzero(idx1 == i)[0][0]) for i in born]]) @ new.T
    assert len(born) == 4 and bool((cos.max(1).values > 0.9).all())
    assert site["floor_band"]["births"]["min"] == site["floor_band"]["births"]["max"] == 6
    assert site["seed_baseline"] == site["floor"][-1]["shared"] == out["sae_rows"][1]["seed_baseline"]
    # without seed baselines: raw counts only, births left empty rather than raw
    out = analyse(run, [1, 2], ["resid.0"], [], 0.7, None)
    assert out["sae_rows"][1]["births"] is None and out["sae_rows"][1]["births_raw"] > 4


def write_circuit(run: RunDir, step: int, nodes: dict, edges: list, meta: dict) -> None:
    p = run.root / "circuits" / "t" / f"step{step}" / "circuit.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    c = {
        "nodes": [{"id": k, "effect": v} for k, v in nodes.items()],
        "edges": [{"from": a, "to": b, "weight": w} for a, b, w in edges],
        "metadata": meta,
    }
    p.write_text(json.dumps(c))  # json.dumps writes NaN as the bare token NaN, as old circuit files had it


def test_per_position_circuits_edge_jaccard_at_the_threshold_and_null_faithfulness(tmp_path):
    """Hand-computed: step 2's feature j is step 1's feature match[j] (sim >= 0.7)."""
    run = RunDir(tmp_path)
    match, sim = np.array([2, 0, -1, 1]), np.array([0.9, 0.8, 0.1, 0.95])
    m = Matching(match, sim, sim, (np.arange(4), np.maximum(match, 0), sim))
    sites = {"resid.0": {"matchings": [m]}}
    n1 = {"resid.0/2@1": 1.0, "resid.0/0@3": 0.5, "resid.0/eps@1": 0.2}
    e1 = [
        ("resid.0/2@1", "y", 0.5),
        ("resid.0/0@3", "resid.0/2@1", 0.2),
        ("resid.0/eps@1", "y", 0.005),  # below the edge threshold 0.01: not an edge of the circuit
        ("resid.0/0@3", "resid.0/eps@1", -0.3),
    ]
    n2 = {"resid.0/0@1": 1.0, "resid.0/1@3": 0.4, "resid.0/3@2": 0.3, "resid.0/2@1": 0.2, "resid.0/eps@1": 0.1}
    e2 = [
        ("resid.0/0@1", "y", 0.4),
        ("resid.0/1@3", "resid.0/0@1", -0.02),
        ("resid.0/eps@1", "y", 0.3),
        ("resid.0/1@3", "resid.0/eps@1", 0.009),  # below
        ("resid.0/3@2", "y", 0.05),
    ]
    write_circuit(run, 1, n1, e1, {"faithfulness": None, "resolvable": False, "F_M": 0.01, "edge_threshold": 0.01})
    write_circuit(run, 2, n2, e2, {"faithfulness": float("nan"), "F_M": 2.0, "edge_threshold": 0.01})
    assert translate(n2, {"resid.0": np.where(sim >= 0.7, match, -1)}) == {
        "resid.0/2@1": 1.0,  # 0@1 -> 2@1, the position kept
        "resid.0/0@3": 0.4,
        "resid.0/1@2": 0.3,
        "resid.0/eps@1": 0.1,  # error nodes keep their ids; 2@1 (unmatched) is dropped
    }
    rows = circuit_development(run, [1, 2], ["t"], sites, 0.7)["t"]
    # nodes: {2@1, 0@3, 1@2, eps@1} vs {2@1, 0@3, eps@1}: 3 / 4
    assert rows[1]["jaccard_prev"] == 0.75 and rows[0]["jaccard_final"] == 0.75
    # edges at |w| >= 0.01: step 2 translated {2@1>y, 0@3>2@1, eps@1>y, 1@2>y}, step 1 {2@1>y, 0@3>2@1,
    # 0@3>eps@1}: 2 / 5 (with every edge it would be 4 / 5)
    assert rows[1]["edge_jaccard_prev"] == 0.4 and rows[0]["edge_jaccard_final"] == 0.4
    assert rows[1]["edge_jaccard_final"] == 1.0  # the last circuit against itself
    assert rows[0]["faithfulness"] is None and rows[0]["resolvable"] is False
    assert rows[1]["faithfulness"] is None and rows[1]["F_M"] == 2.0  # a NaN read back is None, never NaN
    json.dumps(rows, allow_nan=False)


def test_null_upper_bound_by_hand():
    """Poisson(1): P(<=2) = 0.920, P(<=3) = 0.981, so the 95% bound is 3; Poisson(0.25): P(<=1) = 0.974 -> 1, below
    the largest crossed count 4; no null count at all -> 0 (every rule count is beyond it)."""
    from sfcd.development.analysis import null_upper

    assert null_upper(1.0, 2) == 3
    assert null_upper(0.25, 4) == 4
    assert null_upper(0.0, 0) == 0
