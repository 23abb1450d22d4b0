"""report.html: one self-contained page that stays readable and light at the real target's shape (19 sites x K
checkpoints, several tasks, crosscoders at every resid site).

At the top a summary: what was studied, then figures that summarise across sites: site x checkpoint heatmaps
drawn as HTML tables (CE loss score, FVE, shared features, births, deaths; the numbers are the cells, and the
same numbers are in the CSV/JSON each links to) and the lineage plot. Then training, circuits, crosscoders, and
one collapsed section (``<details>``) per site in layer order with that site's numbers. Plots are embedded as
8-bit palette PNGs, large pictures shrunk (the full ones linked); no per-feature data is embedded. Every text
is escaped."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

from sfcd.io import write_text
from sfcd.report.plots import layer_order

#: widest embedded picture, in pixels (wider ones are shrunk; the full picture is linked)
MAX_WIDTH = 1400
#: circuit pictures are embedded this wide at most, in 64 colours (an overview; the SVG and the interactive
#: view are linked beside it)
THUMB_WIDTH = 640
#: a sequential palette (light to dark blue): heatmap cells fall in one of these bins
PALETTE = ["#f7fbff", "#e3eef9", "#cfe1f2", "#b5d4e9", "#93c3df", "#6daed5", "#4b97c9", "#2f7ebc", "#1764ab", "#08488e"]

_CSS = (
    "body{font:14px system-ui,sans-serif;max-width:1250px;margin:20px auto;padding:0 10px}img{max-width:100%}"
    "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}"
    "table.heat td{text-align:right;font-variant-numeric:tabular-nums;min-width:3.2em}"
    "table.heat th{background:#fafafa;position:sticky;left:0}table.heat td.na{background:#eee;color:#999}"
    "details{margin:4px 0;border:1px solid #ddd;border-radius:4px;padding:2px 8px}"
    "details>summary{cursor:pointer;padding:2px 0}details[open]>summary{border-bottom:1px solid #eee}"
    ".warn{background:#fff3cd;padding:4px 8px}tr.layer>*{border-top:2px solid #888}"
    "figure{margin:14px 0}figcaption{font-size:13px;margin:4px 0}.scroll{overflow-x:auto}"
    + "".join(f"td.h{i}{{background:{c}{';color:#fff' if i >= 6 else ''}}}" for i, c in enumerate(PALETTE))
)

SAE_COLUMNS = [
    "step",
    "fve",
    "l0",
    "ce_loss_score",
    "dead_fraction",
    "live_features",
    "shared_with_final",
    "shared_with_prev",
    "births",
    "deaths",
    "splits",
    "merges",
]
CIRCUIT_COLUMNS = [
    "task",
    "step",
    "n_nodes",
    "faithfulness",
    "F_M",
    "jaccard_prev",
    "weighted_jaccard_prev",
    "jaccard_final",
    "weighted_jaccard_final",
    "final_circuit_faithfulness",
]


def _e(x) -> str:
    return html.escape(str(x))


def _png(path: Path, max_width: int = MAX_WIDTH, colors: int = 256) -> bytes:
    """The picture's PNG bytes, at most ``max_width`` pixels wide, as a ``colors``-colour palette (plots have
    few colours); the file as it is when it fits and the palette would not make it smaller, or without Pillow."""
    raw = path.read_bytes()
    try:
        from PIL import Image
    except ImportError:  # matplotlib brings Pillow; without it, embed the file as it is
        return raw
    with Image.open(io.BytesIO(raw)) as im:
        im = im.convert("RGB")
        shrink = im.width > max_width
        if shrink:
            im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.LANCZOS)
        buf = io.BytesIO()
        im.quantize(colors, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG")
    small = buf.getvalue()
    return small if shrink or len(small) < len(raw) else raw


def _img(path: Path, alt: str, max_width: int = MAX_WIDTH, colors: int = 256) -> str:
    data = base64.b64encode(_png(path, max_width, colors)).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _cell(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    return "" if v is None else str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(_cell(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _link(path: Path, root: Path, text: str) -> str:
    return f'<a href="{_e(os.path.relpath(path, root))}">{_e(text)}</a>'


def _number(v) -> float | None:
    if v is None or isinstance(v, (bool, str)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _short(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def heatmap(
    metric: str,
    caption: str,
    rows: list[str],
    cols: list,
    values: dict[tuple[str, object], object],
    numbers: str,
    fixed: tuple[float, float] | None = None,
    row_link: str | None = None,
) -> str:
    """A rows x cols heatmap as an HTML table: each cell shows its value (3 decimals, or an integer) on a
    background binned over ``fixed`` (clipped) or from 0 (or below) to the table's largest value; a missing
    value shows as a dash.
    ``numbers`` is the HTML of the link to the file holding the same numbers."""
    nums = [x for x in (_number(v) for v in values.values()) if x is not None]
    lo, hi = fixed if fixed else ((min(0.0, min(nums)), max(nums)) if nums else (0.0, 1.0))  # counts from 0
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for r in rows:
        label = f'<a href="#{_e(row_link + r)}">{_e(r)}</a>' if row_link else _e(r)
        tds = []
        for c in cols:
            v = values.get((r, c))
            x = _number(v)
            if x is None:
                tds.append('<td class="na">–</td>')
                continue
            b = min(len(PALETTE) - 1, max(0, int((x - lo) / (hi - lo) * len(PALETTE)))) if hi > lo else 0
            text = str(int(v)) if isinstance(v, int) else f"{x:.3f}"
            tds.append(f'<td class="h{b}">{text}</td>')
        layer = ' class="layer"' if r.startswith("attn.") and r != rows[0] else ""  # a rule above each layer
        body.append(f'<tr data-row="{_e(r)}"{layer}><th>{label}</th>{"".join(tds)}</tr>')
    scale = f"colour from {_short(lo)} to {_short(hi)}" + (" (clipped)" if fixed else "")
    return (
        f'<figure id="heat-{_e(metric)}"><figcaption><b>{_e(caption)}</b> ({_e(scale)}; numbers: {numbers})'
        f'</figcaption><div class="scroll"><table class="heat" data-metric="{_e(metric)}"><thead><tr>'
        f"<th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></figure>"
    )


def _steps_section(root: Path, meta: dict) -> list[str]:
    """Why the studied checkpoints are these: named in study.steps, or chosen from the train log."""
    link = _link(root / "development" / "study_steps.json", root, "study_steps.json")
    if meta.get("source") == "study.steps":
        return [f"<p>Studied checkpoints {_e(meta['steps'])}, named in study.steps ({link}).</p>"]
    rows = [{"step": s, "why": "; ".join(meta["reasons"][str(s)])} for s in meta["steps"]]
    rows += [{"step": f"{s} (left out)", "why": "; ".join(r)} for s, r in meta.get("left_out", {}).items()]
    return [
        f"<p>Studied checkpoints chosen from the train log: where each task's accuracy first reaches "
        f"{_e(meta['thresholds'])}, before any is learned, and the last ({link}).</p>",
        _table(rows, ["step", "why"]),
    ]


def _details(summary: str, body: str, cls: str = "", ident: str = "") -> str:
    """A collapsed section; ``summary`` is HTML (escape its text first)."""
    attrs = (f' class="{_e(cls)}"' if cls else "") + (f' id="{_e(ident)}"' if ident else "")
    return f"<details{attrs}><summary>{summary}</summary>{body}</details>"


def render(root: Path, title: str, plots: dict[str, Path], dev: dict, links: dict[str, list[Path]]) -> Path:
    """Write ``root/report.html`` from the development analysis ``dev`` (as ``analyse`` returns it, with
    ``study_steps`` and, optionally, ``crosscoder``), the plots by key and lists of links by heading."""
    steps = list(dev["steps"])
    sites = layer_order(dev["sites"])
    rows = dev["sae_rows"]
    by = {(r["site"], r["step"]): r for r in rows}
    csv = _link(root / "development" / "sae_development.csv", root, "sae_development.csv")
    cc = dev.get("crosscoder") or {}
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_CSS}</style>"
        "</head><body>",
        f"<h1>{_e(title)}</h1>",
        '<a id="summary"></a><h2>Summary</h2>',
        f"<p>{len(sites)} sites x {len(steps)} checkpoints (steps {_e(', '.join(map(str, steps)))})"
        + (f"; circuits of {len(dev['circuits'])} tasks ({_e(', '.join(dev['circuits']))})" if dev["circuits"] else "")
        + (f"; crosscoders at {len(cc['sites'])} sites ({_e(', '.join(layer_order(cc['sites'])))})" if cc else "")
        + ". Sites are in layer order; a site's name leads to its section.</p>",
        *(
            f'<p class="warn"><b>Checkpoints {_e(", ".join(map(str, g)))} have identical weights</b>: what differs '
            "between them is the dictionaries' own noise, not the model's development.</p>"
            for g in dev.get("identical_checkpoints") or []
        ),
        "<p>Sections: "
        + " · ".join(
            f'<a href="#{a}">{_e(t)}</a>'
            for a, t, on in (
                ("findings", "findings", dev.get("findings")),
                ("training", "training", "training" in plots or dev.get("study_steps")),
                ("circuits", "circuits", dev["circuits"]),
                ("crosscoders", "crosscoders", cc),
                ("sites", "per site", True),
                ("files", "files", links),
            )
            if on
        )
        + "</p>",
    ]
    if dev.get("findings"):
        parts += _findings_section(root, dev)
    sae_maps = [
        ("ce_loss_score", "CE loss score (1: the SAE's reconstruction loses nothing, 0: as bad as zero ablation)"),
        ("fve", "Fraction of variance explained"),
        ("shared_with_final", "Shared with the last SAE: share of its live features matched (last column: seed)"),
        ("births", "Births: features with no match in the previous checkpoint's SAE"),
        ("deaths", "Deaths: the previous checkpoint's features with no match here"),
    ]
    for key, caption in sae_maps:
        values = {(r["site"], r["step"]): r.get(key) for r in rows}
        cols: list = list(steps)
        if key == "shared_with_final" and any(r.get("seed_baseline") is not None for r in rows):
            cols.append("seed")
            values |= {(r["site"], "seed"): r.get("seed_baseline") for r in rows}
        fixed = (0.0, 1.0) if key in ("ce_loss_score", "fve", "shared_with_final") else None
        parts.append(heatmap(key, caption, sites, cols, values, csv, fixed, row_link="site-"))
    pictures = {"fve": "sae_fve", "ce": "sae_ce_score", "shared": "shared_with_final"}
    drawn = [_link(plots[k], root, plots[k].name) for k in pictures if k in plots]
    if drawn:
        parts.append(f"<p>The same as pictures: {', '.join(drawn)}.</p>")
    if "lineage" in plots:
        parts.append(
            "<figure><figcaption><b>Lineage of the last checkpoint's features</b>: per site, by the checkpoint "
            "where they first appear (numbers: "
            + _link(root / "development" / "development.json", root, "development.json")
            + ", first_step_counts; and in each site's section)</figcaption>"
            + _img(plots["lineage"], "lineage")
            + "</figure>"
        )
    parts.append('<a id="training"></a><h2>Training</h2>')
    if "training" in plots:
        parts.append(_img(plots["training"], "training"))
    if dev.get("study_steps"):
        parts += _steps_section(root, dev["study_steps"])
    if dev["circuits"]:
        parts += _circuits_section(root, plots, dev)
    if cc:
        parts += _crosscoder_section(root, plots, cc)
    if dev.get("transcoders"):
        parts += _transcoder_section(root, dev["transcoders"])
    parts.append('<a id="sites"></a><h2>Per site</h2>')
    parts += [_site_section(root, plots, dev, site, by, cc) for site in sites]
    if links:
        parts.append('<a id="files"></a><h2>Files</h2>')
    for heading, paths in links.items():
        items = "".join(f"<li>{_link(p, root, str(p.relative_to(root)))}</li>" for p in paths)
        parts.append(_details(f"{_e(heading)} ({len(paths)})", f"<ul>{items}</ul>", "links"))
    parts.append("</body></html>\n")
    return write_text(root / "report.html", "".join(parts))


def _step_text(s) -> str:
    return "never (in the studied checkpoints)" if s is None else f"step {s}"


def _findings_section(root: Path, dev: dict) -> list[str]:
    """Per task, at the top of the page: when the behaviour appears, when its circuit appears, and which of the
    last circuit's features are new and which carried over (see :mod:`sfcd.development.findings`), each with
    links to its evidence."""
    steps = dev["steps"]
    csv = _link(root / "development" / "circuit_development.csv", root, "circuit_development.csv")
    js = _link(root / "development" / "development.json", root, "development.json (findings)")
    parts = [
        '<a id="findings"></a><h2>Findings</h2>',
        "<p>Per task: when the model does it (train log), when a faithful circuit exists (its own circuit is "
        "resolvable, F(M) - F(empty) beyond the examples' noise, and reaches faithfulness "
        f"{_e(_cell(next(iter(dev['findings'].values()))['faithful_at']))}), and which features of the last "
        "circuit are new (first found at or after that checkpoint, and found by a second SAE seed too) or carried "
        "over (matched, unbroken, to an earlier checkpoint). A feature only one seed finds may be the SAE's own "
        f"variance: it is counted apart. Numbers: {js}, {csv}.</p>",
    ]
    for task, f in dev["findings"].items():
        b = f.get("behaviour") or {}
        learned = "; ".join(f"accuracy &gt;= {_e(th)} at {_e(_step_text(s))}" for th, s in b.items()) or (
            "no train log (a loaded model)"
        )
        a = f.get("circuit_appears")
        page = root / "circuits" / task / f"step{a}" / "circuit.html"
        circuit = _e(_step_text(a)) + (
            f" ({_link(page, root, 'its circuit')})" if a is not None and page.exists() else ""
        )
        c = f.get("counts") or {}
        last_page = root / "circuits" / task / f"step{steps[-1]}" / "circuit.html"
        feats = sorted(f.get("features") or [], key=lambda x: (x["status"], x["first_step"], x["id"]))
        items = []
        for x in feats:
            dash = root / "features" / f"step{steps[-1]}" / x["site"] / "index.html"
            name = x["id"]
            ref = (
                f'<a href="{_e(os.path.relpath(dash, root))}#open={_e(name.split("/")[1])}">{_e(name)}</a>'
                if dash.exists()
                else _e(name)
            )
            items.append(
                f"<tr><td>{ref}</td><td>{_e(x['status'])}</td><td>{_e(x['first_step'])}</td>"
                f"<td>{_e(_cell(x.get('reproducible')))}</td></tr>"
            )
        table = (
            '<div class="scroll"><table><thead><tr><th>feature</th><th>status</th><th>first step</th>'
            f"<th>second seed finds it</th></tr></thead><tbody>{''.join(items)}</tbody></table></div>"
        )
        line = (
            f"<p><b>{_e(task)}</b>: {learned}. Faithful circuit: {circuit}; the last circuit "
            + (f"({_link(last_page, root, 'page')}) " if last_page.exists() else "")
            + f"is faithful, carried back, from {_e(_step_text(f.get('last_circuit_faithful_from')))}. "
            f"Its features: {_e(c.get('carried over', 0))} carried over, {_e(c.get('new', 0))} new, "
            f"{_e(c.get('not reproducible', 0))} not reproducible by a second seed; {_e(f.get('error_nodes', 0))} "
            "error nodes."
            + (
                f" Crosscoder circuit: {_e(f.get('crosscoder_latents'))} latents, emerging at "
                + _e(", ".join(f"step {k}: {v}" for k, v in (f.get("crosscoder_emerged_at") or {}).items()))
                + "."
                if f.get("crosscoder_latents")
                else ""
            )
            + "</p>"
        )
        parts.append(line)
        if items:
            parts.append(_details(f"{_e(task)}: the last circuit's {len(items)} features", table, "numbers"))
    return parts


def _site_section(root: Path, plots: dict[str, Path], dev: dict, site: str, by: dict, cc: dict) -> str:
    """One site, collapsed: its line at the last checkpoint, then its numbers at every checkpoint, the lineage
    of its last features, its dashboards and, at a crosscoder's site, the crosscoder."""
    steps, d = dev["steps"], dev["sites"][site]
    live = dict(zip(steps, d.get("live_features") or [], strict=False))
    table = [{**by.get((site, s), {"step": s}), "live_features": live.get(s)} for s in steps]
    last = table[-1]
    head = (
        f"<b>{_e(site)}</b> — at step {_e(steps[-1])}: FVE {_e(_cell(last.get('fve')))}, "
        f"CE loss score {_e(_cell(last.get('ce_loss_score')))}, L0 {_e(_cell(last.get('l0')))}, "
        f"dead {_e(_cell(last.get('dead_fraction')))}"
    )
    firsts = d.get("first_step_counts", {})
    lineage = [{"first step": "features", **{str(s): firsts.get(s, firsts.get(str(s))) for s in steps}}]
    body = [
        _table(table, SAE_COLUMNS),
        f"<p>Features matched by {_e(d.get('matched_by', 'decoder cosine'))}. "
        f"Seed baseline (the last SAE against a second seed): {_e(_cell(d.get('seed_baseline')))}; "
        f"share of the last SAE's live features that persisted through every checkpoint: "
        f"{_e(_cell(d.get('persisted_fraction')))}. The last SAE's live features by first appearance:</p>",
        _table(lineage, ["first step", *map(str, steps)]),
    ]
    pages = sorted(root.glob(f"features/step*/{site}/index.html"))
    if pages:
        body.append("<p>Dashboards: " + ", ".join(_link(p, root, p.parent.parent.name) for p in pages) + "</p>")
    if cc and site in cc["sites"]:
        lat = cc["sites"][site]
        body.append(f"<h4>Crosscoder at {_e(site)}</h4>")
        key = f"crosscoder_latents:{site}"
        if key in plots:
            body.append(_img(plots[key], key))
        body.append(_latents_line(root, site, lat))
        body.append(_table(lat["per_checkpoint"], _CC_COLUMNS))
    return _details(head, "".join(body), "site", f"site-{site}")


def _circuits_section(root: Path, plots: dict[str, Path], dev: dict) -> list[str]:
    circuits, steps = dev["circuits"], dev["steps"]
    csv = _link(root / "development" / "circuit_development.csv", root, "circuit_development.csv")
    parts = ['<a id="circuits"></a><h2>Circuits through training</h2>']
    if "circuits" in plots:
        parts.append(_img(plots["circuits"], "circuits") + f"<p>numbers: {csv}</p>")
    tasks = list(circuits)
    for key, caption, fixed in (
        ("n_nodes", "Circuit size (nodes)", None),
        ("jaccard_final", "Node Jaccard with the last circuit (through matched features)", (0.0, 1.0)),
        ("final_circuit_faithfulness", "Faithfulness of the last circuit, carried back", None),
    ):
        values = {(t, r["step"]): r.get(key) for t, rs in circuits.items() for r in rs}
        if any(_number(v) is not None for v in values.values()):
            parts.append(heatmap(f"circuit:{key}", caption, tasks, steps, values, csv, fixed))
    rows = [{"task": t, **r} for t, rs in circuits.items() for r in rs]
    parts.append(_details(f"Circuit metrics ({len(rows)} rows)", _table(rows, CIRCUIT_COLUMNS), "numbers"))
    pictures = sorted(root.glob(f"circuits/*/step{steps[-1]}/circuit.png"))
    if pictures:
        parts.append(f"<h2>Circuits at step {_e(steps[-1])}</h2>")
        for p in pictures:
            task, page, svg = p.parent.parent.name, p.parent / "circuit.html", p.parent / "circuit.svg"
            view = [_link(page, root, "interactive view (thresholds, feature contexts, dashboards)")] * page.exists()
            view += [_link(svg, root, "full picture (SVG)")] * svg.exists()
            thumb = _img(p, task, THUMB_WIDTH, 64)
            parts.append(_details(_e(task), f"<p>{' · '.join(view)}</p>{thumb}", "circuit"))
    return parts


_CC_COLUMNS = [
    "step",
    "fve",
    "fve_alone",
    "ce_loss_score",
    "present",
    "exclusive",
    "emerged_here",
    "died_here",
    "absent_but_scaled",
]


def _latents_line(root: Path, site: str, lat: dict) -> str:
    return (
        f"<p>{_e(lat['n_live'])} live latents; shared by every checkpoint {_e(_cell(lat['shared_by_all']))}, "
        f"persist to the last {_e(_cell(lat['persist']))}, die {_e(_cell(lat['die']))}, flagged by Latent "
        f"Scaling {_e(_cell(lat['flagged_by_latent_scaling']))}. "
        + _link(root / "crosscoders" / site / "latents.json", root, "latents.json")
        + "</p>"
    )


def _crosscoder_section(root: Path, plots: dict[str, Path], cc: dict) -> list[str]:
    """Crosscoders across checkpoints: site x checkpoint heatmaps (their numbers in each site's latents.json),
    one line per site, then the circuits' latents over training beside the matching method. Each site's
    emergence histogram and RelDec distributions are in its section."""
    sites, steps = layer_order(cc["sites"]), cc["steps"]
    parts = [
        '<a id="crosscoders"></a><h2>Crosscoders across checkpoints</h2>',
        "<p>One dictionary over the checkpoints "
        + _e(", ".join(str(s) for s in steps))
        + ": a latent is the same feature at every checkpoint. Present: decoder norm at least "
        "presence x its largest; emerged: present from that checkpoint to the last. Absent but scaled: absent "
        "by norm, yet Latent Scaling finds it in that checkpoint's activations (it only looks exclusive). "
        "Each site's histograms are in its section below.</p>",
    ]
    files = ", ".join(_link(root / "crosscoders" / s / "latents.json", root, f"{s}/latents.json") for s in sites)
    for key, caption in (
        ("present", "Share of live latents present"),
        ("fve", "FVE of the crosscoder at each checkpoint"),
        ("ce_loss_score", "CE loss score of the crosscoder at each checkpoint"),
    ):
        values = {(s, r["step"]): r.get(key) for s in sites for r in cc["sites"][s]["per_checkpoint"]}
        parts.append(heatmap(f"crosscoder:{key}", caption, sites, steps, values, files, (0.0, 1.0), "site-"))
    summary = [
        {"site": s, **{k: cc["sites"][s].get(k) for k in ("n_live", "shared_by_all", "persist", "die")}}
        | {"flagged_by_latent_scaling": cc["sites"][s].get("flagged_by_latent_scaling")}
        for s in sites
    ]
    parts.append(_table(summary, ["site", "n_live", "shared_by_all", "persist", "die", "flagged_by_latent_scaling"]))
    if cc["circuits"]:
        parts.append("<h3>The last circuits' latents through training</h3>")
        if "crosscoder_circuits" in plots:
            parts.append(_img(plots["crosscoder_circuits"], "crosscoder circuits"))
        parts.append(
            "<p>What share of the last circuit exists at earlier checkpoints, by both methods: share_present "
            "(the crosscoder circuit's latents present there) and share_matched_saes (the last SAE circuit's "
            "features at the same sites matched there by independent SAEs, by the study's matching above the "
            "threshold); "
            "numbers: "
            + _link(root / "crosscoders" / "circuit_development.csv", root, "circuit_development.csv")
            + ".</p>"
        )
        rows = [{"task": t, **r} for t, v in cc["circuits"].items() for r in v["rows"]]
        cols = [
            "task",
            "step",
            "latents",
            "share_present",
            "share_emerged_by_now",
            "share_matched_saes",
            "mean_rel_ie",
            "final_circuit_faithfulness",
        ]
        parts.append(_details(f"Crosscoder circuit metrics ({len(rows)} rows)", _table(rows, cols), "numbers"))
        pages = sorted(root.glob("crosscoders/circuits/*/step*/circuit.html"))
        if pages:
            links = ", ".join(_link(p, root, f"{p.parent.parent.name} @ {p.parent.name}") for p in pages)
            parts.append(_details(f"Circuit pages ({len(pages)})", f"<p>{links}</p>", "links"))
    return parts


def _transcoder_section(root: Path, tc: dict) -> list[str]:
    """Transcoders at every MLP beside the SAEs of the MLP outputs, their latents through training, and the
    agreement prompt's attribution graph read back through the steps (numbers: development.json, transcoders)."""
    sites, steps = layer_order(list(tc["sites"])), tc["steps"]
    parts = [
        '<a id="transcoders"></a><h2>Transcoders and attribution graphs</h2>',
        "<p>A TopK skip transcoder replaces each MLP (input: the MLP's input after its layer norm; output: the MLP's "
        "output), trained from the SAEs' stream. Beside each, the SAE of the same MLP's output. Latents are matched "
        "to the last step's by the mean of encoder and decoder cosines; numbers: "
        + _link(root / "development" / "transcoders.csv", root, "transcoders.csv")
        + ".</p>",
    ]
    csv = _link(root / "development" / "transcoders.csv", root, "transcoders.csv")
    for key, caption in (
        ("fve", "Transcoder FVE of the MLP output"),
        ("sae_fve", "SAE FVE of the MLP output"),
        ("ce_loss_score", "Transcoder CE loss score (spliced in place of the MLP)"),
        ("sae_ce_loss_score", "SAE CE loss score (spliced at the MLP output)"),
        ("shared_with_final", "Share of the last transcoder's live latents present"),
    ):
        values = {(r["site"], r["step"]): r.get(key) for r in tc["rows"]}
        parts.append(heatmap(f"transcoder:{key}", caption, sites, steps, values, csv, (0.0, 1.0), "site-"))
    g = tc.get("graph")
    if not g:
        return parts
    pair = g["pair"]
    parts.append(
        "<h3>The attribution graph of an agreement prompt through training</h3><p>"
        + _e(f"Prompt ({pair['task']}): {pair['clean']!r}, answer {pair['answer']!r}; its number-flipped twin: ")
        + _e(repr(pair["patch"]))
        + ". A node carries the subject's number when its activation changes by more than half on the twin. "
        "Onset: the first studied step from which its feature is present at every later one; in graph at: the "
        "steps whose graph keeps its matched feature at the same position.</p>"
    )
    rows = [
        {
            "step": r["step"],
            "feature nodes": r["nodes"],
            "number nodes": len(r["number_nodes"]),
            "answer probability": r["answer_probability"],
            "replacement score": r["replacement_score"],
            "completeness score": r["completeness_score"],
        }
        for r in g["per_step"]
    ]
    parts.append(_table(rows, list(rows[0])))
    nodes = [
        {
            "node": n["id"],
            "site": n["site"],
            "token": n["position"],
            "activation": n["activation"],
            "on the twin": n["flipped"],
            "onset": n["onset"],
            "in graph at": ", ".join(str(s) for s in n["in_graph_at"]),
        }
        for n in g["number_nodes"]
    ]
    if nodes:
        parts.append("<p>The last step's nodes that carry the subject's number:</p>" + _table(nodes, list(nodes[0])))
    if g["paths"]:
        items = "".join(f"<li>{_e(' -> '.join(p['path']))} ({_e(_short(p['score']))})</li>" for p in g["paths"])
        parts.append(f"<p>The strongest paths from the subject through them to the answer:</p><ul>{items}</ul>")
    elif nodes:
        parts.append(
            "<p>No path from the subject's token through them to the answer's logit survives the pruning: their "
            "dependence on the subject is not a direct (frozen-attention) effect of its embedding.</p>"
        )
    pages = sorted(root.glob(f"graphs/{g['name']}/step*/graph.html"))
    if pages:
        links = ", ".join(_link(p, root, p.parent.name) for p in pages)
        parts.append(_details(f"Graph pages ({len(pages)})", f"<p>{links}</p>", "links"))
    return parts
