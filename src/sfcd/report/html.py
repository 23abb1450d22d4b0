"""report.html: one self-contained page (plots embedded as data URIs, every text escaped) with tables and
links to the dashboards and circuit pictures."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from sfcd.io import write_text


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _link(path: Path, root: Path, text: str) -> str:
    return f'<a href="{html.escape(os.path.relpath(path, root))}">{html.escape(text)}</a>'


def _steps_section(root: Path, meta: dict) -> list[str]:
    """Why the studied checkpoints are these: named in study.steps, or chosen from the train log."""
    link = _link(root / "development" / "study_steps.json", root, "study_steps.json")
    if meta.get("source") == "study.steps":
        return [f"<p>Studied checkpoints {html.escape(str(meta['steps']))}, named in study.steps ({link}).</p>"]
    rows = [{"step": s, "why": "; ".join(meta["reasons"][str(s)])} for s in meta["steps"]]
    rows += [{"step": f"{s} (left out)", "why": "; ".join(r)} for s, r in meta.get("left_out", {}).items()]
    return [
        f"<p>Studied checkpoints chosen from the train log: where each task's accuracy first reaches "
        f"{html.escape(str(meta['thresholds']))}, before any is learned, and the last ({link}).</p>",
        _table(rows, ["step", "why"]),
    ]


def render(root: Path, title: str, plots: dict[str, Path], dev: dict, links: dict[str, list[Path]]) -> Path:
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font:14px system-ui,sans-serif;max-width:1200px;margin:20px auto}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    sections = [
        ("Training", "training"),
        ("SAE quality per checkpoint and site", "fve"),
        ("", "ce"),
        ("Shared features with the last checkpoint (against the seed baseline)", "shared"),
        ("Lineage of the last checkpoint's features", "lineage"),
        ("Circuits through training", "circuits"),
    ]
    for heading, key in sections:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        if key in plots:
            parts.append(_img(plots[key], key))
            name = {
                "fve": "sae_development.csv",
                "ce": "sae_development.csv",
                "shared": "sae_development.csv",
                "circuits": "circuit_development.csv",
            }.get(key, "development.json")
            parts.append(f"<p>numbers: {_link(root / 'development' / name, root, name)}</p>")
        if key == "training" and dev.get("study_steps"):
            parts += _steps_section(root, dev["study_steps"])
    parts.append("<h2>SAE metrics</h2>")
    parts.append(
        _table(
            dev["sae_rows"],
            [
                "site",
                "step",
                "fve",
                "l0",
                "ce_loss_score",
                "dead_fraction",
                "shared_with_final",
                "seed_baseline",
                "births",
                "deaths",
                "splits",
                "merges",
            ],
        )
    )
    if dev["circuits"]:
        parts.append("<h2>Circuit metrics</h2>")
        rows = [{"task": t, **r} for t, rs in dev["circuits"].items() for r in rs]
        parts.append(
            _table(
                rows,
                [
                    "task",
                    "step",
                    "n_nodes",
                    "faithfulness",
                    "F_M",
                    "jaccard_prev",
                    "weighted_jaccard_prev",
                    "jaccard_final",
                    "weighted_jaccard_final",
                ],
            )
        )
    if dev.get("crosscoder"):
        parts += _crosscoder_section(root, plots, dev["crosscoder"])
    pictures = sorted(root.glob(f"circuits/*/step{dev['steps'][-1]}/circuit.png")) if dev["circuits"] else []
    if pictures:
        parts.append(f"<h2>Circuits at step {dev['steps'][-1]}</h2>")
        for p in pictures:
            page = p.parent / "circuit.html"
            view = f"<p>{_link(page, root, 'interactive view (thresholds, feature contexts, dashboards)')}</p>"
            parts.append(
                f"<h3>{html.escape(p.parent.parent.name)}</h3>{view if page.exists() else ''}"
                f"{_img(p, p.parent.parent.name)}"
            )
    for heading, paths in links.items():
        parts.append(f"<h2>{html.escape(heading)}</h2><ul>")
        parts += [f"<li>{_link(p, root, str(p.relative_to(root)))}</li>" for p in paths]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return write_text(root / "report.html", "".join(parts))


def _crosscoder_section(root: Path, plots: dict[str, Path], cc: dict) -> list[str]:
    """Crosscoders across checkpoints: per site the emergence histogram and RelDec distributions with the
    per-checkpoint numbers, then the circuits' latents over training beside the matching method."""
    parts = [
        "<h2>Crosscoders across checkpoints</h2>",
        "<p>One dictionary over the checkpoints "
        + html.escape(", ".join(str(s) for s in cc["steps"]))
        + ": a latent is the same feature at every checkpoint. Present: decoder norm at least "
        "presence x its largest; emerged: present from that checkpoint to the last. Absent but scaled: absent "
        "by norm, yet Latent Scaling finds it in that checkpoint's activations (it only looks exclusive).</p>",
    ]
    for site, lat in cc["sites"].items():
        parts.append(f"<h3>{html.escape(site)}</h3>")
        key = f"crosscoder_latents:{site}"
        if key in plots:
            parts.append(_img(plots[key], key))
        parts.append(
            f"<p>{lat['n_live']} live latents; shared by every checkpoint {lat['shared_by_all']:.3f}, "
            f"persist to the last {lat['persist']:.3f}, die {lat['die']:.3f}, flagged by Latent Scaling "
            f"{lat['flagged_by_latent_scaling']:.3f}. "
            + _link(root / "crosscoders" / site / "latents.json", root, "latents.json")
            + "</p>"
        )
        parts.append(
            _table(
                lat["per_checkpoint"],
                [
                    "step",
                    "fve",
                    "fve_alone",
                    "ce_loss_score",
                    "present",
                    "exclusive",
                    "emerged_here",
                    "died_here",
                    "absent_but_scaled",
                ],
            )
        )
    if cc["circuits"]:
        parts.append("<h3>The last circuits' latents through training</h3>")
        if "crosscoder_circuits" in plots:
            parts.append(_img(plots["crosscoder_circuits"], "crosscoder circuits"))
        parts.append(
            "<p>What share of the last circuit exists at earlier checkpoints, by both methods: share_present "
            "(the crosscoder circuit's latents present there) and share_matched_saes (the last SAE circuit's "
            "features at the same sites matched there by independent SAEs, decoder cosine above the threshold).</p>"
        )
        rows = [{"task": t, **r} for t, v in cc["circuits"].items() for r in v["rows"]]
        parts.append(
            _table(
                rows,
                [
                    "task",
                    "step",
                    "latents",
                    "share_present",
                    "share_emerged_by_now",
                    "share_matched_saes",
                    "mean_rel_ie",
                    "final_circuit_faithfulness",
                ],
            )
        )
        pages = sorted(root.glob("crosscoders/circuits/*/step*/circuit.html"))
        if pages:
            parts.append(
                "<p>Circuit pages: "
                + ", ".join(_link(p, root, f"{p.parent.parent.name} @ {p.parent.name}") for p in pages)
                + "</p>"
            )
    return parts
