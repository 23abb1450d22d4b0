"""A self-contained HTML dashboard (no network, works from the file system): an index of features sortable by
density and max activation and searchable by token; per feature its contexts shaded by activation, its
activation histogram and its logit effects.

The data are embedded as JSON with ``<``, ``>`` and ``&`` escaped, and the page builds every element with
``textContent``: token text is always shown as text, never read as markup. The page's state lives in the URL
hash (``#sort=max&dir=desc&q=uncle&open=12``), so views can be linked to and driven headlessly.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from sfcd.io import write_text


def embed_json(obj) -> str:
    """JSON safe to place inside a <script> element."""
    return (
        json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    )


_CSS = """
body{font:14px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#left{width:46%;overflow:auto;border-right:1px solid #ccc;padding:8px}
#right{flex:1;overflow:auto;padding:12px}
table{border-collapse:collapse;width:100%}th,td{padding:2px 6px;text-align:right;font-size:12px}
th{cursor:pointer;background:#f3f3f3;position:sticky;top:0}td.tok{text-align:left;font-family:monospace}
tr.row{cursor:pointer}tr.row:hover{background:#eef}tr.sel{background:#dde}
.flag{font-size:11px;padding:0 4px;border-radius:3px;background:#eee;margin-left:2px}
.ctx{font-family:monospace;white-space:pre;margin:2px 0;line-height:1.6}
.ctx span{border-radius:2px}.max{outline:1px solid #c00}
h3{margin:10px 0 4px}.logits{display:flex;gap:24px;font-family:monospace;font-size:12px}
"""

_JS = r"""
const D = JSON.parse(document.getElementById('sfcd-data').textContent);
const feats = D.features; let state = {sort: 'id', dir: 'asc', q: '', open: null};
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
const tokText = id => D.tokens[id] ?? ('#' + id);
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  state.sort = h.get('sort') || 'id'; state.dir = h.get('dir') || (state.sort === 'id' ? 'asc' : 'desc');
  state.q = h.get('q') || ''; state.open = h.has('open') ? Number(h.get('open')) : null;
}
function writeHash() {
  const h = new URLSearchParams({sort: state.sort, dir: state.dir});
  if (state.q) h.set('q', state.q); if (state.open !== null) h.set('open', state.open);
  history.replaceState(null, '', '#' + h.toString());
}
function matches(f) {
  if (!state.q) return true; const q = state.q.toLowerCase();
  const toks = [...f.top.flatMap(c => c.ids), ...f.logits_pos.map(x => x[0])];
  return toks.some(id => tokText(id).toLowerCase().includes(q));
}
function renderIndex() {
  const key = {id: f => f.id, density: f => f.density, max: f => f.max, mean: f => f.mean}[state.sort];
  const rows = feats.filter(matches).sort((a, b) => (key(a) - key(b)) * (state.dir === 'asc' ? 1 : -1));
  const tb = document.getElementById('rows'); tb.replaceChildren();
  for (const f of rows) {
    const tr = el('tr', undefined, 'row' + (f.id === state.open ? ' sel' : '')); tr.dataset.id = f.id;
    tr.append(el('td', String(f.id)), el('td', f.density.toExponential(2)), el('td', f.max.toFixed(3)), el('td', f.mean.toFixed(3)));
    const c = f.top[0]; const t = el('td', c ? JSON.stringify(tokText(c.ids[c.at])) : '', 'tok');
    for (const fl of f.flags) t.append(el('span', fl, 'flag'));
    tr.append(t); tr.onclick = () => openFeature(f.id); tb.append(tr);
  }
  document.getElementById('count').textContent = rows.length + ' of ' + feats.length + ' features';
}
function context(c, scale) {
  const d = el('div', undefined, 'ctx');
  c.ids.forEach((id, i) => {
    const s = el('span', tokText(id).replaceAll('\n', '\u21b5')); const a = c.acts[i];
    s.style.background = 'rgba(255,80,0,' + Math.min(1, Math.max(0, a / (scale || 1))).toFixed(3) + ')';
    s.title = a.toFixed(4); if (i === c.at) s.className = 'max'; d.append(s);
  });
  return d;
}
function histogram(f) {
  const ns = 'http://www.w3.org/2000/svg', svg = document.createElementNS(ns, 'svg');
  const w = 360, h = 80, m = Math.max(1, ...f.hist); svg.setAttribute('width', w); svg.setAttribute('height', h + 14);
  f.hist.forEach((v, i) => { const r = document.createElementNS(ns, 'rect'); const bw = w / f.hist.length;
    r.setAttribute('x', i * bw); r.setAttribute('width', bw - 1); r.setAttribute('y', h - h * v / m);
    r.setAttribute('height', h * v / m); r.setAttribute('fill', '#4a7'); svg.append(r); });
  const lab = document.createElementNS(ns, 'text'); lab.setAttribute('y', h + 12); lab.setAttribute('font-size', 10);
  lab.textContent = 'log10 activation ' + D.hist_range[0] + ' .. ' + D.hist_range[1]; svg.append(lab);
  return svg;
}
function openFeature(id) {
  state.open = id; writeHash(); renderIndex();
  const f = feats.find(x => x.id === id), p = document.getElementById('right'); p.replaceChildren();
  if (!f) { p.append(el('p', 'no feature ' + id)); return; }
  p.append(el('h2', 'Feature ' + f.id));
  p.append(el('p', 'density ' + f.density.toExponential(3) + ' · max ' + f.max.toFixed(4) + ' · mean ' + f.mean.toFixed(4) + (f.flags.length ? ' · ' + f.flags.join(', ') : '')));
  p.append(el('h3', 'Activation histogram')); p.append(histogram(f));
  p.append(el('h3', 'Top activating contexts')); f.top.forEach(c => p.append(context(c, f.max)));
  if (f.samples.length) { p.append(el('h3', 'Contexts from lower quantiles')); f.samples.forEach(c => p.append(context(c, f.max))); }
  p.append(el('h3', 'Logit effects (direct, through the unembedding)'));
  const lg = el('div', undefined, 'logits');
  for (const [name, list] of [['promoted', f.logits_pos], ['suppressed', f.logits_neg]]) {
    const col = el('div'); col.append(el('b', name));
    for (const [id, v] of list) col.append(el('div', JSON.stringify(tokText(id)) + '  ' + v.toFixed(3)));
    lg.append(col);
  }
  p.append(lg);
}
function sortBy(k) { state.dir = state.sort === k ? (state.dir === 'asc' ? 'desc' : 'asc') : (k === 'id' ? 'asc' : 'desc'); state.sort = k; writeHash(); renderIndex(); }
document.querySelectorAll('th[data-sort]').forEach(th => th.onclick = () => sortBy(th.dataset.sort));
const search = document.getElementById('search');
search.oninput = () => { state.q = search.value; writeHash(); renderIndex(); };
document.getElementById('summary').textContent = D.summary_text;
readHash(); search.value = state.q; renderIndex(); if (state.open !== null) openFeature(state.open);
"""


def render(data: dict, title: str) -> str:
    """The dashboard page for ``data`` (see :func:`sfcd.features.stage.feature_records`)."""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        f"<style>{_CSS}</style></head><body>"
        "<div id='left'><h2>" + html.escape(title) + "</h2><p id='summary'></p>"
        "<input id='search' placeholder='search by token' size='30'> <span id='count'></span>"
        "<table><thead><tr><th data-sort='id'>id</th><th data-sort='density'>density</th>"
        "<th data-sort='max'>max act</th><th data-sort='mean'>mean act</th><th>top token / flags</th></tr></thead>"
        "<tbody id='rows'></tbody></table></div><div id='right'><p>Click a feature.</p></div>"
        f"<script id='sfcd-data' type='application/json'>{embed_json(data)}</script>"
        f"<script>{_JS}</script></body></html>\n"
    )


def write_dashboard(path: Path, data: dict, title: str) -> Path:
    return write_text(path, render(data, title))
