"""The interactive circuit page in headless Chromium: it renders the circuit, the sliders (driven through the
URL hash) filter nodes and edges, a node links to its dashboard entry, and markup in labels stays text."""

import html
import json
import re
from pathlib import Path

from sfcd.circuits.page import render
from tests.conftest import run_chromium

from .test_circuits import run_circuit


def shown(dom: str) -> tuple[set[str], int]:
    nodes = {html.unescape(m) for m in re.findall(r'class="node"[^>]*data-id="([^"]+)"', dom)}
    return nodes, len(re.findall(r'class="edge"', dom))


def expected(c: dict, node_t: float, edge_t: float) -> tuple[set[str], int]:
    nodes = {n["id"] for n in c["nodes"] if abs(n["effect"]) >= node_t}
    edges = [
        e for e in c["edges"] if abs(e["weight"]) >= edge_t and e["from"] in nodes | {"y"} and e["to"] in nodes | {"y"}
    ]
    return nodes, len(edges)


def test_circuit_page_renders_filters_and_links(chromium, test_run, test_saes, test_features):
    # catches: a page that does not render, sliders that do not filter (or filter edges without their nodes),
    # links to dashboards that do not exist, hover text without the feature's data
    c, _ = run_circuit(
        test_run,
        "circuit.n_examples=8",
        "circuit.node_threshold=0.0005",
        "circuit.edge_threshold=0.0001",
        "circuit.baselines=false",
        "circuit.sweep_points=3",
    )
    out = Path(test_run.run_dir) / "circuits" / "nounpp" / "step24"
    page = out / "circuit.html"
    assert json.loads((out / "circuit.json").read_text()) == c  # the page's data is circuit.json's
    dom = run_chromium(chromium, page.as_uri())
    nodes, n_edges = shown(dom)
    assert (nodes, n_edges) == expected(c, 0.0005, 0.0001) and len(nodes) > 5 and n_edges > 5
    effects = sorted(abs(n["effect"]) for n in c["nodes"])
    weights = sorted(abs(e["weight"]) for e in c["edges"])
    node_t, edge_t = effects[len(effects) // 2], weights[len(weights) // 2]
    dom = run_chromium(chromium, page.as_uri() + f"#node={node_t}&edge={edge_t}")
    nodes2, n_edges2 = shown(dom)
    assert (nodes2, n_edges2) == expected(c, node_t, edge_t)
    assert len(nodes2) < len(nodes) and n_edges2 < n_edges
    # a feature node links to its dashboard entry, which exists
    links = re.findall(r'<a href="([^"]+)" class="node" data-id="(resid\.0/\d+)"', dom)
    assert links
    href, nid = links[0]
    target, _, frag = html.unescape(href).partition("#")
    assert (out / target).resolve() == (Path(test_run.run_dir) / "features/step24/resid.0/index.html").resolve()
    assert frag == f"open={nid.split('/')[1]}" and (out / target).exists()
    titles = re.findall(r"<title>([^<]*)</title>", dom)
    assert any("density" in t and "[" in t for t in titles)  # hover: density and a top context


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
