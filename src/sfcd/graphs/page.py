"""``graph.html``: one self-contained page per attribution graph (no network; opens from the file system).

One column per prompt token, one row per layer (token embeddings at the bottom, the target logits on top); each
cell holds that layer's features and error node at that position. Two sliders set what is drawn: nodes up to a
share of the cumulative influence (all kept nodes at first), and edges above a
|weight| (log scale; at most 20,000 drawn, the strongest). Hovering a node shows its kind, activation and
influence, and for a feature its label, density and top contexts when ``sfcd features`` described the
transcoder. Data are embedded as strict JSON with ``<``, ``>`` and ``&`` escaped and every element is built with
``textContent`` (the circuit page's rules, :mod:`sfcd.circuits.page`, whose style sheet it shares), so tokens and
labels are shown as text, never read as markup.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

from sfcd.circuits.page import _CSS
from sfcd.features.dashboard import embed_json
from sfcd.io import finite, write_text

_JS = r"""
const D = JSON.parse(document.getElementById('sfcd-data').textContent);
const G = D.graph, INFO = D.info, M = G.metadata, NS = 'http://www.w3.org/2000/svg', MAX_EDGES = 20000;
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; };
const sv = (tag, attrs) => { const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v); return e; };
const ok = v => typeof v === 'number' && Number.isFinite(v);
const fixed = n => n.kind === 'token' || n.kind === 'logit';
let wlo = Infinity, whi = -Infinity;  // loops, not Math.min(...xs): 10^5 arguments overflow the stack
for (const e of G.links) { const a = Math.abs(e.weight); if (ok(a) && a > 0) { wlo = Math.min(wlo, a); whi = Math.max(whi, a); } }
if (!(wlo <= whi)) { wlo = 1e-6; whi = 1; }
const state = {node: 1, edge: wlo};  // every kept node (the last kept one's share is >= node_threshold)
function rowOf(n) { return n.kind === 'token' ? 0 : n.kind === 'logit' ? M.n_layers + 1 : n.layer + 1; }
function describe(n) {
  const lines = [n.id + ' (' + n.kind + ')'];
  if (n.token !== undefined && n.token !== null) lines.push('token ' + JSON.stringify(n.token));
  if (ok(n.probability)) lines.push('probability ' + n.probability.toFixed(4));
  if (ok(n.activation)) lines.push('activation ' + n.activation.toPrecision(4));
  if (ok(n.influence)) lines.push('influence ' + n.influence.toPrecision(4) + ' (cumulative share ' + (ok(n.cumulative) ? n.cumulative.toFixed(3) : '-') + ')');
  const i = INFO[n.id];
  if (i) { if (i.label) lines.push('label: ' + i.label); if (ok(i.density)) lines.push('density ' + i.density.toExponential(3));
    for (const c of i.contexts) lines.push(c); }
  else if (n.kind === 'feature') lines.push('no dashboard data (run sfcd features on the transcoders)');
  return lines;
}
function showInfo(n) { const p = document.getElementById('side'); p.replaceChildren(el('h3', n.id));
  for (const line of describe(n).slice(1)) p.append(el('div', line, 'ctx')); }
function draw() {
  const nodes = G.nodes.filter(n => fixed(n) || (ok(n.cumulative) && n.cumulative <= state.node));
  const shown = new Set(nodes.map(n => n.id));
  let edges = G.links.filter(e => ok(e.weight) && Math.abs(e.weight) >= state.edge && shown.has(e.source) && shown.has(e.target));
  const passing = edges.length;
  if (passing > MAX_EDGES) edges = edges.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES);
  const cells = {};
  for (const n of nodes) { const k = rowOf(n) + '|' + n.position; (cells[k] = cells[k] || []).push(n); }
  let widest = 1; for (const v of Object.values(cells)) widest = Math.max(widest, v.length);
  const col = Math.min(widest, 12) * 24 + 30, rowH = 80, rows = M.n_layers + 2, T = M.tokens.length;
  const width = 90 + T * col, yOf = r => (rows - 1 - r) * rowH + 30, pos = {};
  for (const [k, ns] of Object.entries(cells)) {
    ns.sort((a, b) => (b.influence || 0) - (a.influence || 0));
    const [r, p] = k.split('|').map(Number), cx = 90 + p * col + col / 2, per = Math.min(ns.length, 12);
    ns.forEach((n, i) => { pos[n.id] = [cx + ((i % per) - (per - 1) / 2) * 24, yOf(r) + Math.floor(i / per) * 8]; });
  }
  const svg = sv('svg', {width: width, height: yOf(-1) + 20});
  for (let r = 0; r < rows; r++) { const t = sv('text', {x: 2, y: yOf(r) + 4});
    t.textContent = r === 0 ? 'embed' : r === rows - 1 ? 'logits' : 'layer ' + (r - 1); svg.append(t); }
  M.tokens.forEach((tok, p) => { const t = sv('text', {x: 90 + p * col + col / 2, y: yOf(-1), 'text-anchor': 'middle'});
    t.textContent = JSON.stringify(tok); svg.append(t); });
  let wmax = 1e-12; for (const e of edges) wmax = Math.max(wmax, Math.abs(e.weight));
  for (const e of edges) {
    const [x1, y1] = pos[e.source], [x2, y2] = pos[e.target];
    svg.append(sv('line', {x1, y1, x2, y2, class: 'edge', stroke: e.weight > 0 ? '#1f77b4' : '#d62728',
      'stroke-width': 0.4 + 3 * Math.abs(e.weight) / wmax, 'stroke-opacity': 0.5}));
  }
  for (const n of nodes) {
    const [x, y] = pos[n.id], g = sv('g', {class: 'node'});
    const shape = n.kind === 'feature' ? sv('circle', {cx: x, cy: y, r: 9})
      : n.kind === 'error' ? sv('rect', {x: x - 8, y: y - 8, width: 16, height: 16})
      : sv('polygon', {points: [x, y - 10, x - 10, y + 8, x + 10, y + 8].join(' ')});
    shape.setAttribute('fill', {feature: '#9ecae1', error: '#fdae6b', token: '#d9d9d9', logit: '#a1d99b'}[n.kind]);
    shape.setAttribute('stroke', 'black');
    const title = sv('title'); title.textContent = describe(n).join('\n'); g.append(title, shape);
    const t = sv('text', {x: x, y: y + 3, 'text-anchor': 'middle'});
    t.textContent = n.kind === 'feature' ? String(n.latent) : n.kind === 'error' ? 'ε' : n.kind === 'logit' ? String(n.token) : '';
    g.append(t); g.addEventListener('mouseover', () => showInfo(n)); svg.append(g);
  }
  document.getElementById('graph-box').replaceChildren(svg);
  document.getElementById('count').textContent = nodes.length + ' of ' + G.nodes.length + ' nodes, ' + passing + ' of '
    + G.links.length + ' edges' + (passing > edges.length ? ' (the strongest ' + edges.length + ' drawn)' : '');
  document.getElementById('node-value').textContent = state.node.toFixed(3);
  document.getElementById('edge-value').textContent = state.edge.toExponential(2);
}
function slider(id, lo, hi, key, log) {
  const s = document.getElementById(id); s.min = lo; s.max = hi; s.step = (hi - lo) / 200;
  s.value = log ? Math.log10(state[key]) : state[key];
  s.oninput = () => { state[key] = log ? Math.pow(10, Number(s.value)) : Number(s.value); draw(); };
}
const f3 = v => ok(v) ? v.toFixed(3) : '-';
document.getElementById('summary').textContent = 'step ' + M.step + ': replacement score ' + f3(M.replacement_score)
  + ', completeness ' + f3(M.completeness_score) + '; ' + M.n_features_attributed + ' of ' + M.n_active_features
  + ' active features attributed; targets: ' + M.logits.map(l => JSON.stringify(l.token) + ' ' + l.probability.toFixed(3)).join(', ');
slider('node-slider', 0.01, 1, 'node', false);
slider('edge-slider', Math.log10(wlo) - 0.01, Math.log10(whi) + 0.01, 'edge', true);
draw();
"""  # noqa: E501


def node_info(graph: dict, notes: Mapping[int, Mapping[int, dict]]) -> dict[str, dict]:
    """Label, density and top contexts of each feature node whose layer's transcoder has features-stage data
    (``notes``: {layer: :func:`sfcd.features.api.feature_notes`})."""
    out = {}
    for n in graph["nodes"]:
        if n["kind"] == "feature":
            note = notes.get(n["layer"], {}).get(n["latent"])
            if note is not None:
                out[n["id"]] = {"label": note["label"], "density": note["density"], "contexts": note["contexts"]}
    return out


def render(graph: dict, info: dict) -> str:
    m = graph["metadata"]
    title = f"attribution graph: {m['prompt']!r} @ step {m['step']}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        f"<style>{_CSS}</style></head><body><div id='main'><h2>" + html.escape(title) + "</h2>"
        "<p id='summary'></p><div class='controls'>"
        "<label>nodes to cumulative influence <input type='range' id='node-slider'> "
        "<span id='node-value'></span></label>"
        "<label>edge |weight| &ge; <input type='range' id='edge-slider'> <span id='edge-value'></span></label>"
        "<span id='count'></span></div><div id='graph-box'></div></div>"
        "<div id='side'><p>Hover a node for its feature.</p></div>"
        f"<script id='sfcd-data' type='application/json'>{embed_json(finite({'graph': graph, 'info': info}))}</script>"
        f"<script>{_JS}</script></body></html>\n"
    )


def write_graph_page(out: Path, graph: dict, notes: Mapping[int, Mapping[int, dict]]) -> Path:
    """``out/graph.html`` for ``graph`` (the data of ``graph.json``) with ``notes`` ({layer: feature notes})."""
    return write_text(out / "graph.html", render(graph, node_info(graph, notes)))
