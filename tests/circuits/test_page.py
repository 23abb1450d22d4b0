"""The interactive circuit page in headless Chromium: it renders the circuit, the sliders (driven through the
URL hash) filter nodes and edges, a node links to its dashboard entry, and markup in labels stays text."""

import html
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sfcd.circuits.page import render
from tests.conftest import run_chromium

from .test_stage import _one_thread  # noqa: F401  (an autouse fixture: one torch thread, as in test_stage.py)


def page_data(page: Path) -> dict:
    """The JSON embedded in a circuit page, parsed strictly (NaN / Infinity refused, as JSON.parse does)."""
    text = page.read_text()
    (raw,) = re.findall(r"<script id='sfcd-data' type='application/json'>(.*?)</script>", text, re.S)
    return json.loads(raw, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))


def shown(dom: str) -> tuple[set[str], int]:
    nodes = {html.unescape(m) for m in re.findall(r'class="node"[^>]*data-id="([^"]+)"', dom)}
    return nodes, len(re.findall(r'class="edge"', dom))


def test_stage_page_shows_what_the_model_computes(chromium, test_run, test_saes, test_features, tmp_path):
    """The page ``sfcd circuit`` writes, read back (the JSON it embeds, and the DOM after headless Chromium ran its
    scripts) against values computed here without sfcd's circuit code (attribution by autograd through plain hooks,
    edges by finite differences, faithfulness by setting the modules' outputs; see test_stage.py), and the features
    stage's own index for the hover. Bugs caught: a page carrying other numbers than the model's (stale, rescaled,
    another run's; effects or edges that depend on ``circuit.batch_size``: means per batch, or over a full batch's
    size), sliders that do not filter (or filter edges without their nodes), links to dashboards that do not exist,
    hover text without the feature's effect and density, a summary with another faithfulness."""
    from transformers import AutoTokenizer

    from .test_stage import (
        attrib_effects,
        check_edges,
        check_nodes,
        mean_ablated,
        reference_model,
        sae_sites,
        stage,
        task_rows,
    )

    tau, edge_tau = 0.0005, 0.0001
    _, eff, out = stage(
        test_run,
        tmp_path,
        "page",
        "circuit.method=attrib",
        "circuit.n_examples=8",
        "circuit.batch_size=3",  # batches of 3, 3 and 2 pairs: effects and edges are means over all 8
        f"circuit.node_threshold={tau}",
        f"circuit.edge_threshold={edge_tau}",
        "circuit.resolve_z=0",
        "circuit.resolve_floor=0",
        "circuit.sweep_points=2",
    )
    page = out / "circuit.html"
    shown_c = page_data(page)["circuit"]
    folder = Path(test_run.run_dir) / "model" / "step24"
    model, tok = reference_model(folder), AutoTokenizer.from_pretrained(folder)
    p = task_rows(shown_c["metadata"]["pairs"]["discovery"], tok)
    sites = sae_sites(test_run, model, p)
    want, grads = attrib_effects(model, p, sites)
    kept = check_nodes(shown_c, eff, want, tau)  # the page's nodes: every node above tau, with its effect
    weights = check_edges(shown_c, model, p, sites, kept, grads["mlp.1"], len(p))  # its edges, each valued
    weights |= {
        (f"mlp.1/{'eps' if k < 0 else k}", "y"): float(want["mlp.1"][0][k]) if k >= 0 else want["mlp.1"][1]
        for k in kept["mlp.1"]
    }
    effect = {
        f"{s}/{'eps' if j < 0 else j}": float(want[s][0][j] if j >= 0 else want[s][1])
        for s, js in kept.items()
        for j in js
    }

    def expected(node_t: float, edge_t: float) -> tuple[set[str], int]:
        nodes = {k for k, v in effect.items() if abs(v) >= node_t}
        ok = nodes | {"y"}
        return nodes, sum(abs(w) >= edge_t and a in ok and b in ok for (a, b), w in weights.items())

    dom = run_chromium(chromium, page.as_uri())
    nodes, n_edges = shown(dom)
    assert (nodes, n_edges) == expected(tau, edge_tau) and len(nodes) > 5 and n_edges > 5
    node_t = sorted(abs(v) for v in effect.values())[len(effect) // 2] * 1.0001  # between two effects
    edge_t = sorted(abs(w) for w in weights.values())[len(weights) // 2] * 1.0001
    dom = run_chromium(chromium, page.as_uri() + f"#node={node_t}&edge={edge_t}")
    nodes2, n_edges2 = shown(dom)
    assert (nodes2, n_edges2) == expected(node_t, edge_t)
    assert 0 < len(nodes2) < len(nodes) and 0 < n_edges2 < n_edges
    # the summary's faithfulness: the circuit's, on the evaluation pairs
    q = task_rows(shown_c["metadata"]["pairs"]["evaluation"], tok)
    f_m, f_e, f_c, _ = mean_ablated(model, q, sae_sites(test_run, model, q), shown_c)
    faith = float(re.search(r"faithfulness (-?[0-9.]+),", re.search(r'<p id="summary">([^<]*)</p>', dom).group(1))[1])
    assert faith == pytest.approx((f_c - f_e) / (f_m - f_e), abs=1.5e-3)  # printed to 3 decimals
    # a feature node links to its dashboard entry, which exists; its hover shows its effect and its density
    links = re.findall(r'<a href="([^"]+)" class="node" data-id="(resid\.0/(\d+))"><title>([^<]*)</title>', dom)
    assert links
    index = json.loads((Path(test_run.run_dir) / "features/step24/resid.0/index.json").read_text())
    for href, nid, feat, title in links:
        target, _, frag = html.unescape(href).partition("#")
        assert (out / target).resolve() == (Path(test_run.run_dir) / "features/step24/resid.0/index.html").resolve()
        assert frag == f"open={feat}" and (out / target).exists()
        lines = html.unescape(title).split("\n")
        assert lines[0] == nid and float(lines[1].removeprefix("effect ")) == pytest.approx(effect[nid], rel=1e-3)
        density = float(next(x for x in lines if x.startswith("density ")).removeprefix("density "))
        assert density == pytest.approx(index["density"][int(feat)], rel=1e-3)


def test_markup_in_a_label_stays_text(chromium, tmp_path):
    evil = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
    circuit = {
        "metadata": {
            "task": "t</title><b>x</b>",
            "step": 1,
            "node_threshold": 0.1,
            "edge_threshold": 0.01,
            "faithfulness": 1.0,
            "completeness": 0.0,
            "method": "ig",
            "aggregation": "sum",
            "ablation": "mean",
            "positions": None,
        },
        "sites": ["resid.0"],
        "nodes": [{"id": "resid.0/3", "site": "resid.0", "feature": 3, "position": None, "effect": 0.5, "label": evil}],
        "edges": [{"from": "resid.0/3", "to": "y", "weight": 0.5}],
    }
    page = tmp_path / "circuit.html"
    page.write_text(render(circuit, {"resid.0/3": {"density": 0.01, "contexts": [evil]}}, {}))
    dom = run_chromium(chromium, page.as_uri())
    assert "pwned" not in re.findall(r"<title>([^<]*)</title>", dom)[0]
    assert "<img" not in dom.split("<body>")[1].split("sfcd-data")[0]  # no element made from the label
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # shown as text (in the hover title)
    assert shown(dom) == ({"resid.0/3"}, 1)


def synthetic_circuit(n_edges: int, n_nodes: int = 1900, seed: int = 0, missing: bool = True) -> dict:
    """A circuit of pythia-70m's 19 sites with ``n_edges`` edges between random nodes, effects and weights
    log-uniform (two and six decades) with random signs; with ``missing``, some effects and weights NaN and the
    faithfulness NaN (what an unresolvable or broken run could hand the page)."""
    rng = np.random.default_rng(seed)
    sites = ["embed"] + [f"{k}.{layer}" for layer in range(6) for k in ("attn", "mlp", "resid")]
    nodes = []
    for i in range(n_nodes):
        site = sites[i % len(sites)]
        eff = float(rng.choice([-1, 1]) * 10 ** rng.uniform(-2, 0))
        nodes.append({"id": f"{site}/{i}", "site": site, "feature": i, "position": None, "effect": eff, "label": ""})
    if missing:
        for n in nodes[::97]:
            n["effect"] = float("nan")
    ids = [n["id"] for n in nodes]
    src, dst = rng.integers(0, n_nodes, n_edges), rng.integers(0, n_nodes, n_edges)
    w = rng.choice([-1, 1], n_edges) * 10 ** rng.uniform(-6, 0, n_edges)
    edges = [{"from": ids[a], "to": ids[b], "weight": float(x)} for a, b, x in zip(src, dst, w, strict=True)]
    if missing:
        for e in edges[::1001]:
            e["weight"] = float("nan")
    meta = {
        "task": "synthetic",
        "step": 1,
        "node_threshold": 0.1,
        "edge_threshold": 0.01,
        "faithfulness": float("nan") if missing else 0.9,
        "completeness": None if missing else 0.1,
        "resolvable": not missing,
        "method": "ig",
        "aggregation": "sum",
        "ablation": "mean",
        "positions": None,
    }
    return {"metadata": meta, "sites": sites, "nodes": nodes, "edges": edges}


def test_page_at_300k_edges_with_missing_values(chromium, tmp_path):
    # catches: Math.min(...xs) / Math.max(...xs) spreads over the edges (a RangeError above ~120k: the page stays
    # blank), NaN written into the page's JSON (JSON.parse throws: blank), NaN effects or weights drawn or
    # counted, a null faithfulness printed as a number, every passing edge drawn (no cap) or the wrong ones counted
    c = synthetic_circuit(300_000)
    page = tmp_path / "circuit.html"
    page.write_text(render(c, {}, {}))
    assert page_data(page)["circuit"]["metadata"]["faithfulness"] is None  # NaN became null
    dom = run_chromium(chromium, page.as_uri(), timeout=300)
    ok = [n for n in c["nodes"] if np.isfinite(n["effect"])]
    want_nodes = {n["id"] for n in ok if abs(n["effect"]) >= 0.1}
    passing = [
        e
        for e in c["edges"]
        if np.isfinite(e["weight"]) and abs(e["weight"]) >= 0.01 and e["from"] in want_nodes and e["to"] in want_nodes
    ]
    nodes, n_edges = shown(dom)
    assert nodes == want_nodes and len(passing) > 20_000 and n_edges == 20_000
    n_missing = sum(not np.isfinite(n["effect"]) for n in c["nodes"]) + sum(
        not np.isfinite(e["weight"]) for e in c["edges"]
    )
    count = re.search(r'<span id="count">([^<]*)</span>', dom).group(1)
    assert count == (
        f"{len(want_nodes)} of 1900 nodes, {len(passing)} of 300000 edges (the strongest 20000 drawn), "
        f"{n_missing} missing values (null) not drawn"
    )
    summary = re.search(r'<p id="summary">([^<]*)</p>', dom).group(1)
    assert "faithfulness unresolvable, completeness unresolvable" in summary and "NaN" not in summary
    # the sliders span the finite values' log range (a NaN in the range would leave them unset)
    weights = [abs(e["weight"]) for e in c["edges"] if np.isfinite(e["weight"])]
    smin = float(re.search(r'id="edge-slider" min="([^"]+)"', dom).group(1))
    assert smin == pytest.approx(np.log10(min(weights)) - 0.5, abs=1e-6)
    # the edges drawn are the strongest 20000 that pass
    drawn = Counter(re.findall(r'class="edge"[^>]*data-from="([^"]+)" data-to="([^"]+)"', dom))
    strongest = sorted(passing, key=lambda e: -abs(e["weight"]))[:20_000]
    assert drawn == Counter((e["from"], e["to"]) for e in strongest)
