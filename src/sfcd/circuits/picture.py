"""The circuit picture (one row per site, the metric on top) and the faithfulness curve, with matplotlib."""

from __future__ import annotations

from pathlib import Path

from sfcd.io import atomic_path


def _save(fig, stem: Path) -> list[Path]:
    out = []
    for ext in ("svg", "png"):
        path = stem.with_suffix("." + ext)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight")
        out.append(path)
    return out


def _text(token: str) -> str:
    """A token as plain text on a plot: escapes shown (newlines, tabs), no mathtext."""
    return repr(token)[1:-1].replace("$", r"\$")


def draw_circuit(circuit: dict, stem: Path, edge_threshold: float) -> list[Path]:
    """Nodes filled by sign (blue +, red -) and size of their effect; error nodes as triangles; edges coloured
    by sign with width by size; one row per site in forward order; the metric ``y`` on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = circuit["sites"]
    rows = {s: i for i, s in enumerate(sites)}
    rows["y"] = len(sites)
    by_site: dict[str, list[dict]] = {s: [] for s in sites}
    for n in circuit["nodes"]:
        by_site[n["site"]].append(n)
    tokens = circuit["metadata"].get("positions")
    pos = {"y": (0.0, rows["y"])}
    if tokens:  # per position: one column per token, the nodes of a (site, position) side by side in it
        cells: dict[tuple[str, int], list[dict]] = {}
        for n in circuit["nodes"]:
            cells.setdefault((n["site"], n["position"]), []).append(n)
        col = 0.8 * max([len(v) for v in cells.values()] + [1]) + 0.6
        for (s, t), nodes in cells.items():
            nodes.sort(key=lambda n: -abs(n["effect"]))
            for i, n in enumerate(nodes):
                pos[n["id"]] = (t * col + 0.8 * (i - (len(nodes) - 1) / 2), rows[s])
        pos["y"] = ((len(tokens) - 1) * col, rows["y"])
        width = len(tokens) * col
        xlim = (-col / 2 - 0.4, width - col / 2 + 0.4)
    else:
        for s, nodes in by_site.items():
            nodes.sort(key=lambda n: -abs(n["effect"]))
            for i, n in enumerate(nodes):
                pos[n["id"]] = (i - (len(nodes) - 1) / 2, rows[s])
        width = max([len(v) for v in by_site.values()] + [4])
        xlim = (-width / 2 - 0.8, width / 2 + 0.8)
    fig, ax = plt.subplots(figsize=(min(2 + 0.9 * width, 30), 1.2 * len(rows) + 1))
    emax = max([abs(n["effect"]) for n in circuit["nodes"]] + [1e-9])
    wmax = max([abs(e["weight"]) for e in circuit["edges"]] + [1e-9])
    for e in circuit["edges"]:
        if abs(e["weight"]) < edge_threshold or e["from"] not in pos or e["to"] not in pos:
            continue
        (x0, y0), (x1, y1) = pos[e["from"]], pos[e["to"]]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color="tab:blue" if e["weight"] > 0 else "tab:red",
            lw=0.5 + 3 * abs(e["weight"]) / wmax,
            alpha=0.6,
            zorder=1,
        )
    for n in circuit["nodes"]:
        x, y = pos[n["id"]]
        a = 0.15 + 0.85 * abs(n["effect"]) / emax
        color = (0.12, 0.47, 0.71, a) if n["effect"] > 0 else (0.84, 0.15, 0.16, a)
        marker = "^" if n["feature"] is None else "o"
        ax.scatter([x], [y], s=500, marker=marker, color=color, edgecolors="black", linewidths=0.6, zorder=2)
        label = "ε" if n["feature"] is None else str(n["feature"])
        ax.annotate(label, (x, y), ha="center", va="center", fontsize=7, zorder=3)
        if n.get("label"):
            ax.annotate(_text(n["label"]), (x, y - 0.32), ha="center", va="top", fontsize=6, color="dimgray", zorder=3)
    ax.scatter([pos["y"][0]], [rows["y"]], s=700, marker="s", color="lightgray", edgecolors="black", zorder=2)
    ax.annotate("y", pos["y"], ha="center", va="center", fontsize=9, zorder=3)
    ax.set_yticks(range(len(rows)), [*sites, "metric"])
    if tokens:
        ax.set_xticks([t * col for t in range(len(tokens))], [_text(tok) for tok in tokens], fontsize=8)
    else:
        ax.set_xticks([])
    ax.set_xlim(*xlim)
    ax.set_title(
        f"{circuit['metadata']['task']} @ step {circuit['metadata']['step']}: "
        f"{len(circuit['nodes'])} nodes, faithfulness {_faith(circuit['metadata'].get('faithfulness'))}",
        fontsize=10,
    )
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    out = _save(fig, stem)
    plt.close(fig)
    return out


def _faith(v) -> str:
    return "unresolvable" if v is None or v != v else f"{v:.2f}"


def draw_curve(curves: dict[str, list[dict]], stem: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for name, pts in curves.items():
        pts = [p for p in pts if p["n_nodes"] > 0 and p["faithfulness"] is not None]  # None: unresolvable
        drawn += len(pts)
        ax.plot([p["n_nodes"] for p in pts], [p["faithfulness"] for p in pts], "o-", label=name, ms=3)
    ax.axhline(1, color="gray", lw=0.8, ls=":")
    if drawn:  # a log axis needs a positive node count; a circuit empty at every threshold has none
        ax.set_xscale("log")
    else:
        unresolvable = any(p["faithfulness"] is None for pts in curves.values() for p in pts)
        why = (
            "faithfulness unresolvable: F(M) - F(empty) is within its noise"
            if unresolvable
            else "no nodes at any threshold"
        )
        ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("nodes in the circuit")
    ax.set_ylabel("faithfulness")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    out = _save(fig, stem)
    plt.close(fig)
    return out
