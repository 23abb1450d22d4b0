"""The feature dashboard of one SAE: a folder that opens from the file system (no server, no network) at any
number of features.

    index.html              the page, with a small index of every feature embedded (written last: it marks
                            the folder complete)
    index.json              the same index, for Python (:mod:`sfcd.features.api`)
    feats/shard_0012.js     the details of features 12*S .. 13*S-1 (S = ``shard_size``): contexts, histogram,
                            logit effects and the text of the tokens they use, loaded by the page on demand

The index holds per feature: density, max and mean activation, a label (the activating token of its top
context), flags and up to ``KEYS`` key tokens (the activating tokens of its top contexts, then the tokens it
promotes most) that the search matches, plus the text of those tokens. A shard file is JavaScript,
``sfcd_shard(\\n<JSON>\\n);``: a page opened from ``file://`` may load a <script> but not fetch() a file, and
Python reads the JSON line (:func:`read_shard`). Writing goes shard by shard, so memory holds one shard's
records and the index's columns, whatever the number of features.

Every JSON text is escaped (``<``, ``>``, ``&``) and the page builds every element with ``textContent``:
token text is always shown as text, never read as markup. The page's state lives in the URL hash
(``#sort=max&dir=desc&q=uncle&filter=live&open=12``), so views can be linked to and driven headlessly.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from sfcd.errors import InputError
from sfcd.io import dumps, write_json, write_text

KEYS = 8  # key tokens per feature in the index (what the search matches)
SHARD_DIR = "feats"


def embed_json(obj) -> str:
    """JSON safe to place inside a <script> element."""
    return dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def shard_name(n: int, digits: int) -> str:
    return f"{SHARD_DIR}/shard_{n:0{digits}d}.js"


def shard_digits(n_shards: int) -> int:
    return max(4, len(str(max(n_shards - 1, 0))))


def read_shard(path: str | Path) -> dict:
    """The JSON content of a shard file ``sfcd_shard(\\n<JSON>\\n);``."""
    text = Path(path).read_text(encoding="utf-8")
    head, _, rest = text.partition("\n")
    body, _, tail = rest.rpartition("\n);")
    if head != "sfcd_shard(" or tail.strip():
        raise InputError(f"{path} is not a dashboard shard (sfcd_shard(<JSON>);); rerun the features stage")
    return json.loads(body)


def _key_tokens(rec: dict) -> tuple[int, list[int]]:
    """The label (activating token of the top context, -1 without one) and the key tokens of a record."""
    acts = [c["ids"][c["at"]] for c in rec["top"]]
    keys = list(dict.fromkeys(acts + [int(i) for i, _ in rec["logits_pos"][:3]]))[:KEYS]
    return (acts[0] if acts else -1), keys


class DashboardWriter:
    """Writes a dashboard folder shard by shard: ``add`` the records of features 0.., in order, at most
    ``shard_size`` a call (the last call may be shorter), then ``finish``.

    A record is a dict: id, density, max, mean, hist (counts per log10-activation bin), flags (strings:
    ``dead``, ``ultra-low``, ``token: <t>``), top and samples (contexts ``{"ids", "acts", "at"}``), logits_pos and
    logits_neg (``[token id, value]``)."""

    def __init__(self, folder: str | Path, d_sae: int, shard_size: int = 256):
        if shard_size < 1:
            raise InputError(f"features.shard_size is {shard_size}; expected a positive number of features per file")
        self.folder, self.d_sae, self.size = Path(folder), d_sae, shard_size
        self.n_shards = -(-d_sae // shard_size)
        self.digits = shard_digits(self.n_shards)
        for name in ("index.html", "index.json", "features.json"):  # the folder is incomplete until finish()
            (self.folder / name).unlink(missing_ok=True)
        self.next = 0
        self.cols: dict[str, list] = {k: [] for k in ("density", "max", "mean", "label", "flags", "keys")}
        self.tokens: dict[int, str] = {}
        self.bytes_largest_shard = 0

    def add(self, records: list[dict], tok_of: Callable[[int], str]) -> Path:
        """Write the next shard: ``records`` are features ``next, next + 1, ...``; ``tok_of`` gives a token's text."""
        n = self.next // self.size
        if [r["id"] for r in records] != list(range(self.next, min(self.next + self.size, self.d_sae))):
            raise ValueError(f"shard {n} must hold features {self.next}.. in order, {self.size} of them")
        used: set[int] = set()
        for r in records:
            for c in r["top"] + r["samples"]:
                used.update(c["ids"])
            used.update(i for i, _ in r["logits_pos"] + r["logits_neg"])
            label, keys = _key_tokens(r)
            self.cols["density"].append(_sig(r["density"]))
            self.cols["max"].append(_sig(r["max"]))
            self.cols["mean"].append(_sig(r["mean"]))
            self.cols["label"].append(label)
            self.cols["flags"].append(r["flags"])
            self.cols["keys"].append(keys)
            for i in keys:
                if i not in self.tokens:
                    self.tokens[i] = tok_of(i)
        data = {
            "shard": n,
            "first": self.next,
            "tokens": {str(i): tok_of(i) for i in sorted(used)},
            "features": records,
        }
        text = "sfcd_shard(\n" + embed_json(data) + "\n);\n"
        self.bytes_largest_shard = max(self.bytes_largest_shard, len(text.encode("utf-8")))
        self.next += len(records)
        return write_text(self.folder / shard_name(n, self.digits), text)

    def finish(self, meta: dict, title: str) -> Path:
        """Write ``index.json`` and then ``index.html`` (``meta``: summary, summary_text, hist_range, ...)."""
        if self.next != self.d_sae:
            raise ValueError(f"the dashboard has {self.next} of {self.d_sae} features")
        for old in (self.folder / SHARD_DIR).glob("shard_*.js"):  # a previous run's files beyond this one's
            if old.name not in {Path(shard_name(n, self.digits)).name for n in range(self.n_shards)}:
                old.unlink()
        index = {
            **meta,
            "d_sae": self.d_sae,
            "shard_size": self.size,
            "shard_digits": self.digits,
            **self.cols,
            "tokens": {str(i): t for i, t in sorted(self.tokens.items())},
        }
        write_json(self.folder / "index.json", index, indent=None)
        return write_text(self.folder / "index.html", render(index, title))


def write_dashboard(
    folder: str | Path,
    records: Iterable[dict],
    d_sae: int,
    meta: dict,
    title: str,
    tok_of: Callable[[int], str],
    shard_size: int = 256,
) -> DashboardWriter:
    """A whole dashboard from an iterable of records (consumed shard by shard)."""
    w = DashboardWriter(folder, d_sae, shard_size)
    batch: list[dict] = []
    for r in records:
        batch.append(r)
        if len(batch) == shard_size:
            w.add(batch, tok_of)
            batch = []
    if batch:
        w.add(batch, tok_of)
    w.finish(meta, title)
    return w


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


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
const D = JSON.parse(document.getElementById('sfcd-index').textContent);
const F = D.d_sae, PAGE = 500, shards = {}, waiting = {};
let state = {sort: 'id', dir: 'asc', q: '', filter: 'all', open: null, n: PAGE};
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
const tokText = (id, table) => (table || D.tokens)[id] ?? ('#' + id);
const lower = {}; for (const id in D.tokens) lower[id] = D.tokens[id].toLowerCase();
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  state.sort = h.get('sort') || 'id'; state.dir = h.get('dir') || (state.sort === 'id' ? 'asc' : 'desc');
  state.q = h.get('q') || ''; state.filter = h.get('filter') || 'all';
  state.open = h.has('open') ? Number(h.get('open')) : null; state.n = Math.max(PAGE, Number(h.get('n')) || PAGE);
}
function writeHash() {
  const h = new URLSearchParams({sort: state.sort, dir: state.dir});
  if (state.q) h.set('q', state.q); if (state.filter !== 'all') h.set('filter', state.filter);
  if (state.n !== PAGE) h.set('n', state.n); if (state.open !== null) h.set('open', state.open);
  history.replaceState(null, '', '#' + h.toString());
}
const FILTERS = {
  all: i => true, live: i => !D.flags[i].includes('dead'), dead: i => D.flags[i].includes('dead'),
  'ultra-low': i => D.flags[i].includes('ultra-low'), token: i => D.flags[i].some(f => f.startsWith('token:')),
};
function matcher() {
  const q = state.q.trim().toLowerCase(); if (!q) return i => true;
  const hit = new Set(); for (const id in lower) if (lower[id].includes(q)) hit.add(Number(id));
  const asId = /^\d+$/.test(q) ? Number(q) : null;
  return i => i === asId || D.keys[i].some(t => hit.has(t));
}
function renderIndex() {
  const col = {id: null, density: D.density, max: D.max, mean: D.mean}[state.sort];
  const ok = FILTERS[state.filter] || FILTERS.all, m = matcher(), rows = [];
  for (let i = 0; i < F; i++) if (ok(i) && m(i)) rows.push(i);
  const sgn = state.dir === 'asc' ? 1 : -1;
  if (col) rows.sort((a, b) => (col[a] - col[b]) * sgn || a - b); else if (sgn < 0) rows.reverse();
  const tb = document.getElementById('rows'), frag = document.createDocumentFragment();
  for (const i of rows.slice(0, state.n)) {
    const tr = el('tr', undefined, 'row' + (i === state.open ? ' sel' : '')); tr.dataset.id = i;
    tr.append(el('td', String(i)), el('td', D.density[i].toExponential(2)), el('td', D.max[i].toFixed(3)), el('td', D.mean[i].toFixed(3)));
    const t = el('td', D.label[i] >= 0 ? JSON.stringify(tokText(D.label[i])) : '', 'tok');
    for (const fl of D.flags[i]) t.append(el('span', fl, 'flag'));
    tr.append(t); frag.append(tr);
  }
  tb.replaceChildren(frag);
  document.getElementById('count').textContent = rows.length + ' of ' + F + ' features' + (rows.length > state.n ? ' (first ' + state.n + ' shown)' : '');
  document.getElementById('more').hidden = rows.length <= state.n;
}
function context(c, scale, table) {
  const d = el('div', undefined, 'ctx');
  c.ids.forEach((id, i) => {
    const s = el('span', tokText(id, table).replaceAll('\n', '\u21b5')); const a = c.acts[i];
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
const shardOf = id => Math.floor(id / D.shard_size);
const shardFile = n => 'feats/shard_' + String(n).padStart(D.shard_digits, '0') + '.js';
function sfcd_shard(data) { const n = data.shard; shards[n] = data; (waiting[n] || []).forEach(fn => fn()); delete waiting[n]; }
function withShard(n, fn) {
  if (shards[n]) return fn(); if (waiting[n]) { waiting[n].push(fn); return; } waiting[n] = [fn];
  const s = document.createElement('script'); s.src = shardFile(n);
  s.onerror = () => { const p = document.getElementById('right'); p.replaceChildren(el('p', 'could not load ' + shardFile(n) + ' (was the dashboard folder copied whole?)')); };
  document.head.append(s);
}
function openFeature(id) {
  state.open = id; writeHash(); renderIndex();
  const p = document.getElementById('right'); p.replaceChildren();
  if (!(Number.isInteger(id) && id >= 0 && id < F)) { p.append(el('p', 'no feature ' + id)); return; }
  p.append(el('p', 'loading feature ' + id + ' ...'));
  withShard(shardOf(id), () => { if (state.open === id) showFeature(id); });
}
function showFeature(id) {
  const S = shards[shardOf(id)], f = S.features[id - S.first], T = S.tokens, p = document.getElementById('right');
  p.replaceChildren(el('h2', 'Feature ' + f.id));
  p.append(el('p', 'density ' + f.density.toExponential(3) + ' · max ' + f.max.toFixed(4) + ' · mean ' + f.mean.toFixed(4) + (f.flags.length ? ' · ' + f.flags.join(', ') : '')));
  p.append(el('h3', 'Activation histogram')); p.append(histogram(f));
  p.append(el('h3', 'Top activating contexts')); f.top.forEach(c => p.append(context(c, f.max, T)));
  if (f.samples.length) { p.append(el('h3', 'Contexts from lower quantiles')); f.samples.forEach(c => p.append(context(c, f.max, T))); }
  p.append(el('h3', 'Logit effects (direct, through the unembedding)'));
  const lg = el('div', undefined, 'logits');
  for (const [name, list] of [['promoted', f.logits_pos], ['suppressed', f.logits_neg]]) {
    const col = el('div'); col.append(el('b', name));
    for (const [tid, v] of list) col.append(el('div', JSON.stringify(tokText(tid, T)) + '  ' + v.toFixed(3)));
    lg.append(col);
  }
  p.append(lg); document.body.dataset.openedMs = performance.now().toFixed(1);
}
function sortBy(k) { state.dir = state.sort === k ? (state.dir === 'asc' ? 'desc' : 'asc') : (k === 'id' ? 'asc' : 'desc'); state.sort = k; writeHash(); renderIndex(); }
document.querySelectorAll('th[data-sort]').forEach(th => th.onclick = () => sortBy(th.dataset.sort));
document.getElementById('rows').onclick = e => { const tr = e.target.closest('tr.row'); if (tr) openFeature(Number(tr.dataset.id)); };
const search = document.getElementById('search'), filter = document.getElementById('filter');
search.oninput = () => { state.q = search.value; state.n = PAGE; writeHash(); renderIndex(); };
filter.onchange = () => { state.filter = filter.value; state.n = PAGE; writeHash(); renderIndex(); };
document.getElementById('more').onclick = () => { state.n += PAGE; writeHash(); renderIndex(); };
document.getElementById('summary').textContent = D.summary_text;
readHash(); search.value = state.q; filter.value = state.filter; renderIndex();
document.body.dataset.renderedMs = performance.now().toFixed(1);
if (state.open !== null) openFeature(state.open);
"""


def render(index: dict, title: str) -> str:
    """The dashboard page for ``index`` (see :class:`DashboardWriter`), which it embeds."""
    options = "".join(
        f"<option value='{v}'>{t}</option>"
        for v, t in [
            ("all", "all features"),
            ("live", "live"),
            ("dead", "dead"),
            ("ultra-low", "ultra-low density"),
            ("token", "token features"),
        ]
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        f"<style>{_CSS}</style></head><body>"
        "<div id='left'><h2>" + html.escape(title) + "</h2><p id='summary'></p>"
        "<input id='search' placeholder='search by token or id' size='30'> "
        f"<select id='filter'>{options}</select> <span id='count'></span>"
        "<table><thead><tr><th data-sort='id'>id</th><th data-sort='density'>density</th>"
        "<th data-sort='max'>max act</th><th data-sort='mean'>mean act</th><th>top token / flags</th></tr></thead>"
        "<tbody id='rows'></tbody></table><button id='more' hidden>show more</button></div>"
        "<div id='right'><p>Click a feature.</p></div>"
        f"<script id='sfcd-index' type='application/json'>{embed_json(index)}</script>"
        f"<script>{_JS}</script></body></html>\n"
    )
