"""The interactive circuit page: one self-contained HTML file per circuit (no network, opens from the file
system), beside ``circuit.json`` and built from the same data.

Nodes sit in one row per site (the metric y on top), ordered by the size of their effect, or in one column per
token of the template for per-position circuits. Two sliders (log scale) set the node and edge thresholds; the
page redraws what passes them, so a 3,000-edge circuit can be read at any size; at most 20,000 edges (the
strongest that pass) are drawn at once, so a 300k-edge circuit loads too (no argument spreads over the data). Hovering a node shows its
feature's label, density and top contexts (from ``sfcd features`` when it ran); clicking it opens the feature's
dashboard entry. The data are embedded as strict JSON (NaN and inf as ``null``, drawn as missing) with ``<``, ``>`` and ``&`` escaped and every element is built
with ``textContent``, so labels and tokens are shown as text, never read as markup. The thresholds live in the
URL hash (``#node=0.1&edge=0.01``), so views can be linked to and driven headlessly.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from sfcd.features.dashboard import embed_json
from sfcd.io import finite, write_text

_CSS = """
body{font:14px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#main{flex:1;overflow:auto;padding:8px}#side{width:30%;overflow:auto;border-left:1px solid #ccc;padding:8px}
.controls label{margin-right:18px}.controls input{vertical-align:middle;width:220px}
svg text{font:10px monospace;pointer-events:none}.ctx{font-family:monospace;white-space:pre-wrap;margin:3px 0}
.node{cursor:pointer}.edge{pointer-events:none}
"""

_JS = r"""
const D = JSON.parse(document.getElementById('sfcd-data').textContent);
const C = D.circuit, INFO = D.info, LINKS = D.links, NS = 'http://www.w3.org/2000/svg';
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
const sv = (tag, attrs) => { const e = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v); return e; };
// loops, not Math.min(...xs): spreading 10^5 arguments overflows the call stack. A null (NaN or inf in the
// source, written as null) is missing: never drawn, never counted into a range.
const MAX_EDGES = 20000;  // at most this many edges are drawn at once, the strongest (the count says so)
const ok = v => typeof v === 'number' && Number.isFinite(v);
function range(items, key) {
  let lo = Infinity, hi = -Infinity;
  for (const it of items) { const v = it[key]; if (ok(v) && v !== 0) { const a = Math.abs(v); if (a < lo) lo = a; if (a > hi) hi = a; } }
  return lo <= hi ? [Math.log10(lo), Math.log10(hi)] : [-4, 0];
}
function absMax(items, key) { let m = 1e-12; for (const it of items) { const a = Math.abs(it[key]); if (a > m) m = a; } return m; }
const NR = range(C.nodes, 'effect'), ER = range(C.edges, 'weight');
const missing = C.nodes.filter(n => !ok(n.effect)).length + C.edges.filter(e => !ok(e.weight)).length;
const fmt = (v, d) => ok(v) ? v.toFixed(d) : 'unresolvable';
const state = {node: C.metadata.node_threshold, edge: C.metadata.edge_threshold};
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.has('node')) state.node = Number(h.get('node')); if (h.has('edge')) state.edge = Number(h.get('edge'));
}
function writeHash() { history.replaceState(null, '', '#' + new URLSearchParams({node: state.node, edge: state.edge}).toString()); }
function slider(id, r, key) {
  const s = document.getElementById(id); s.min = r[0] - 0.5; s.max = r[1] + 0.01; s.step = (r[1] - r[0] + 0.51) / 200;
  s.value = Math.log10(Math.max(state[key], 1e-12));
  s.oninput = () => { state[key] = Math.pow(10, Number(s.value)); writeHash(); draw(); };
}
function showInfo(n) {
  const p = document.getElementById('side'); p.replaceChildren();
  p.append(el('h3', n.id)); p.append(el('p', 'effect ' + (ok(n.effect) ? n.effect.toPrecision(4) : 'missing')));
  const i = INFO[n.id];
  if (n.label) p.append(el('p', 'label: ' + n.label));
  if (i) {
    p.append(el('p', 'density ' + (ok(i.density) ? i.density.toExponential(3) : 'missing')));
    p.append(el('b', 'top contexts')); for (const c of i.contexts) p.append(el('div', c, 'ctx'));
  } else if (n.feature !== null) p.append(el('p', 'no dashboard data (run sfcd features)'));
}
function tooltip(n) {
  const i = INFO[n.id]; const lines = [n.id, 'effect ' + n.effect.toPrecision(4)];
  if (n.label) lines.push('label: ' + n.label);
  if (i) { lines.push('density ' + (ok(i.density) ? i.density.toExponential(3) : 'missing')); for (const c of i.contexts) lines.push(c); }
  return lines.join('\n');
}
function draw() {
  const nodes = C.nodes.filter(n => ok(n.effect) && Math.abs(n.effect) >= state.node);
  const shown = new Set(nodes.map(n => n.id)); shown.add('y');
  let edges = C.edges.filter(e => ok(e.weight) && Math.abs(e.weight) >= state.edge && shown.has(e.from) && shown.has(e.to));
  const passing = edges.length;
  if (passing > MAX_EDGES) edges = edges.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES);
  const rows = C.sites.length, rowH = 90, pos = {}, cells = {};
  const perPos = Array.isArray(C.metadata.positions) && C.metadata.positions.length > 0;
  for (const n of nodes) { const k = n.site + '|' + (perPos ? n.position : ''); (cells[k] = cells[k] || []).push(n); }
  let widest = 1; for (const v of Object.values(cells)) if (v.length > widest) widest = v.length;
  const col = perPos ? widest * 26 + 30 : 0;
  const ncol = perPos ? C.metadata.positions.length : 1;
  const width = Math.max(400, perPos ? ncol * col + 80 : widest * 26 + 80);
  const yOf = r => (rows - r) * rowH + 30;
  for (const [k, ns] of Object.entries(cells)) {
    ns.sort((a, b) => Math.abs(b.effect) - Math.abs(a.effect));
    const [site, p] = k.split('|'), r = C.sites.indexOf(site);
    const cx = perPos ? 80 + Number(p) * col + col / 2 : width / 2 + 40;
    ns.forEach((n, i) => { pos[n.id] = [cx + (i - (ns.length - 1) / 2) * 26, yOf(r)]; });
  }
  pos.y = [perPos ? 80 + (ncol - 1) * col + col / 2 : width / 2 + 40, 20];
  const svg = sv('svg', {width: width, height: yOf(-1) + 40, id: 'graph'});
  C.sites.forEach((s, r) => { const t = sv('text', {x: 2, y: yOf(r) + 4}); t.textContent = s; svg.append(t); });
  if (perPos) C.metadata.positions.forEach((tok, p) => { const t = sv('text', {x: 80 + p * col + col / 2, y: yOf(-1) + 20, 'text-anchor': 'middle'}); t.textContent = JSON.stringify(tok); svg.append(t); });
  const wmax = absMax(edges, 'weight'), emax = absMax(nodes, 'effect');
  for (const e of edges) {
    const [x1, y1] = pos[e.from], [x2, y2] = pos[e.to];
    const line = sv('line', {x1, y1, x2, y2, class: 'edge', stroke: e.weight > 0 ? '#1f77b4' : '#d62728',
      'stroke-width': 0.5 + 3 * Math.abs(e.weight) / wmax, 'stroke-opacity': 0.6});
    line.dataset.from = e.from; line.dataset.to = e.to; svg.append(line);
  }
  const y = sv('rect', {x: pos.y[0] - 12, y: 8, width: 24, height: 24, fill: '#ddd', stroke: 'black'}); svg.append(y);
  const yt = sv('text', {x: pos.y[0], y: 24, 'text-anchor': 'middle'}); yt.textContent = 'y'; svg.append(yt);
  for (const n of nodes) {
    const [x, yy] = pos[n.id], a = 0.15 + 0.85 * Math.abs(n.effect) / emax;
    const fill = n.effect > 0 ? 'rgba(31,119,180,' + a + ')' : 'rgba(214,39,40,' + a + ')';
    const link = n.feature !== null && LINKS[n.site] ? LINKS[n.site] + '#open=' + n.feature : null;
    const g = link ? sv('a', {href: link, class: 'node'}) : sv('g', {class: 'node'});
    g.dataset.id = n.id;
    const shape = n.feature === null ? sv('polygon', {points: [x, yy - 11, x - 11, yy + 9, x + 11, yy + 9].join(' ')}) : sv('circle', {cx: x, cy: yy, r: 11});
    shape.setAttribute('fill', fill); shape.setAttribute('stroke', 'black');
    const title = sv('title'); title.textContent = tooltip(n); g.append(title, shape);
    const t = sv('text', {x: x, y: yy + 3, 'text-anchor': 'middle'}); t.textContent = n.feature === null ? 'ε' : String(n.feature); g.append(t);
    g.addEventListener('mouseover', () => showInfo(n)); svg.append(g);
  }
  const box = document.getElementById('graph-box'); box.replaceChildren(svg);
  document.getElementById('count').textContent = nodes.length + ' of ' + C.nodes.length + ' nodes, ' + passing + ' of ' + C.edges.length + ' edges'
    + (passing > edges.length ? ' (the strongest ' + edges.length + ' drawn)' : '') + (missing ? ', ' + missing + ' missing values (null) not drawn' : '');
  document.getElementById('node-value').textContent = state.node.toExponential(2);
  document.getElementById('edge-value').textContent = state.edge.toExponential(2);
}
const m = C.metadata;
document.getElementById('summary').textContent = m.task + ' @ step ' + m.step + ': faithfulness ' + fmt(m.faithfulness, 3) + ', completeness ' + fmt(m.completeness, 3)
  + (m.resolvable === false ? ' (F(M) - F(empty) is within its noise: faithfulness is not reported)' : '') + ' (' + m.method + ', ' + m.aggregation + ', ablation ' + m.ablation + ')';
readHash(); slider('node-slider', NR, 'node'); slider('edge-slider', ER, 'edge'); draw();
"""


def node_info(circuit: dict, notes: dict) -> dict[str, dict]:
    """Density and top contexts of each feature node that has features-stage data (``notes``: {site name:
    :func:`sfcd.features.api.feature_notes`})."""
    out = {}
    for n in circuit["nodes"]:
        note = notes.get(n["site"], {}).get(n["feature"]) if n["feature"] is not None else None
        if note is not None:
            out[n["id"]] = {"density": note["density"], "contexts": note["contexts"]}
    return out


def render(circuit: dict, info: dict, links: dict[str, str]) -> str:
    m = circuit["metadata"]
    title = f"circuit {m['task']} @ step {m['step']}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        f"<style>{_CSS}</style></head><body><div id='main'><h2>" + html.escape(title) + "</h2>"
        "<p id='summary'></p><div class='controls'>"
        "<label>node threshold <input type='range' id='node-slider'> <span id='node-value'></span></label>"
        "<label>edge threshold <input type='range' id='edge-slider'> <span id='edge-value'></span></label>"
        "<span id='count'></span></div><div id='graph-box'></div></div>"
        "<div id='side'><p>Hover a node for its feature; click it for its dashboard.</p></div>"
        f"<script id='sfcd-data' type='application/json'>"
        f"{embed_json(finite({'circuit': circuit, 'info': info, 'links': links}))}</script>"
        f"<script>{_JS}</script></body></html>\n"
    )


def write_circuit_page(out: Path, circuit: dict, features_dir: Path, notes: dict) -> Path:
    """``out/circuit.html`` for ``circuit`` (the data of ``circuit.json``), with ``notes`` ({site name:
    :func:`sfcd.features.api.feature_notes`}) for hovering, linking the dashboards of
    ``features_dir/<site>/index.html`` where they exist."""
    links = {
        s: os.path.relpath(features_dir / s / "index.html", out)
        for s in circuit["sites"]
        if (features_dir / s / "index.html").exists()
    }
    return write_text(out / "circuit.html", render(circuit, node_info(circuit, notes), links))
