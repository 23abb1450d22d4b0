"""The report's plots (PNG files in development/, their numbers in the CSV/JSON beside them)."""

from __future__ import annotations

import re
from pathlib import Path

from sfcd.data.grammar import PAPER_TASKS
from sfcd.io import atomic_path, read_csv
from sfcd.models.train_log import tasks_of


def _fig(rows=1, cols=1, size=(6, 3.6)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(rows, cols, figsize=size)


def _save(plt, fig, path: Path, steps_axes=()) -> Path:
    for ax in steps_axes:  # panels over training steps: log x, grid, legend
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _x(step: int) -> float:
    return max(step, 0.5)


def training_curves(train_log: Path, marks: list[int], path: Path) -> Path:
    rows = read_csv(train_log)
    tasks = tasks_of(rows)
    plt, fig, axes = _fig(1, 3, (15, 3.8))
    x = [_x(int(r["step"])) for r in rows]
    axes[0].plot(x, [float(r["heldout_loss"]) for r in rows], "o-", label="held-out loss")
    axes[0].plot(x, [float(r["train_loss"]) for r in rows], "s-", label="train loss", alpha=0.6)
    for t in tasks:  # the paper's four solid, sfcd's own and the harder tasks dashed
        style = "o-" if t in PAPER_TASKS else "s--"
        axes[1].plot(x, [float(r[f"{t}_accuracy"]) for r in rows], style, ms=3, label=t)
    axes[2].plot(x, [float(r["induction_score"]) for r in rows], "o-", color="C3", label="induction score")
    for ax in axes:
        for m in marks:
            ax.axvline(_x(m), color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("step (dashed: studied checkpoints)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1.02)
    return _save(plt, fig, path)


_SITE = re.compile(r"^(?:(embed)|(attn|mlp_in|mlp_act|mlp|resid)\.(\d+))(?:@.*)?$")
# as sfcd.models.sites.Site.order
_KIND_ORDER = {"embed": 0, "attn": 1, "mlp_in": 2, "mlp_act": 3, "mlp": 4, "resid": 5}


def layer_order(sites) -> list[str]:
    """Site names in forward order (embed, then per layer attn, mlp_in, mlp_act, mlp, resid; a suffix such as
    ``@k=16`` keeps its site's place); names that are not sites go last, alphabetically. The same order as
    :attr:`sfcd.models.sites.Site.order`, without importing torch."""

    def key(name: str):
        m = _SITE.match(name)
        if not m:
            return (1, 0, 0, name)
        return (0, -1, 0, name) if m.group(1) else (0, int(m.group(3)), _KIND_ORDER[m.group(2)], name)

    return sorted(dict.fromkeys(sites), key=key)


def by_site(rows: list[dict], key: str, path: Path, ylabel: str, baseline_key: str | None = None) -> Path:
    """A site x checkpoint heatmap of ``key`` (sites in layer order, one row each; the values written in the
    cells while they fit), with the seed baseline as a last column when ``baseline_key`` is given."""
    import numpy as np

    sites = layer_order(r["site"] for r in rows)
    steps = sorted({int(r["step"]) for r in rows})
    cols = [str(s) for s in steps] + (["seed"] if baseline_key else [])
    grid = np.full((len(sites), len(cols)), np.nan)
    for r in rows:
        i, v = sites.index(r["site"]), r[key]
        grid[i, steps.index(int(r["step"]))] = np.nan if v is None else float(v)
        if baseline_key and r.get(baseline_key) is not None:
            grid[i, -1] = float(r[baseline_key])
    plt, fig, ax = _fig(size=(max(4.5, 1.6 + 0.55 * len(cols)), max(2.2, 0.8 + 0.26 * len(sites))))
    finite = grid[np.isfinite(grid)]
    lo, hi = (min(0.0, float(finite.min())), max(1.0, float(finite.max()))) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
    if len(cols) <= 24 and len(sites) <= 40:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = (v - lo) / (hi - lo or 1) < 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45 if len(cols) > 8 else 0, fontsize=7)
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_xlabel("step" + (" (seed: the seed baseline)" if baseline_key else ""))
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label(ylabel, fontsize=8)
    return _save(plt, fig, path)


def lineage_plot(sites: dict, path: Path) -> Path:
    """Where the last step's features first appear, per site in layer order (stacked by first step, a sequential
    colour per step so that any number of checkpoints stays readable)."""
    import matplotlib

    names = layer_order(sites)
    steps = sites[names[0]]["steps"]
    plt, fig, ax = _fig(size=(max(7, 1.5 + 0.45 * len(names)), 3.8))
    cmap = matplotlib.colormaps["viridis"]
    bottom = [0] * len(names)
    for j, s in enumerate(steps):
        vals = [sites[n]["first_step_counts"].get(s, sites[n]["first_step_counts"].get(str(s), 0)) for n in names]
        color = cmap(j / max(1, len(steps) - 1))
        ax.bar(names, vals, bottom=bottom, label=f"step {s}", color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("last-step features\nby first appearance")
    ax.tick_params(axis="x", labelrotation=45 if len(names) > 8 else 0, labelsize=7)
    ax.legend(fontsize=6, ncol=1 + len(steps) // 12, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(plt, fig, path)


def circuits_plot(circuits: dict, path: Path) -> Path:
    plt, fig, axes = _fig(1, 3, (16, 3.8))
    for i, (task, rows) in enumerate(circuits.items()):
        axes[2].plot(
            [_x(r["step"]) for r in rows],
            [r.get("final_circuit_faithfulness") for r in rows],
            "o-",
            color=f"C{i}",
            label=task,
        )
        x = [_x(r["step"]) for r in rows]
        axes[0].plot(x, [r["n_nodes"] for r in rows], "o-", color=f"C{i}", label=task)
        axes[1].plot(x, [r["jaccard_final"] for r in rows], "o-", color=f"C{i}", label=f"{task}: nodes")
        axes[1].plot(
            x, [r["weighted_jaccard_final"] for r in rows], "s--", color=f"C{i}", alpha=0.6, label=f"{task}: weighted"
        )
    axes[0].set_ylabel("circuit size (nodes)")
    axes[1].set_ylabel("Jaccard with the last circuit")
    axes[2].set_ylabel("faithfulness of the last circuit, carried back")
    return _save(plt, fig, path, steps_axes=axes)


def crosscoder_latents_plot(latents: dict, stats: dict, live, path: Path) -> Path:
    """One crosscoder: live latents emerging at each checkpoint, and the RelDec distribution per checkpoint."""
    import numpy as np

    steps = latents["steps"]
    plt, fig, axes = _fig(1, 2, (11, 3.4))
    labels = [str(s) for s in steps]
    axes[0].bar(range(len(labels)), [latents["emerged_at"][s] for s in labels], color="C0", tick_label=labels)
    axes[0].tick_params(axis="x", labelrotation=45 if len(labels) > 6 else 0, labelsize=7)
    axes[0].set_xlabel("checkpoint (step) where the latent emerges and stays")
    axes[0].set_ylabel("live latents")
    rel = stats["rel"][live].numpy()
    bins = np.linspace(0, 1, 41)
    cmap = plt.get_cmap("viridis")  # one sequential colour per checkpoint: any K stays distinguishable
    for k, s in enumerate(steps):
        color = cmap(k / max(1, len(steps) - 1))
        axes[1].hist(rel[:, k], bins=bins, histtype="step", color=color, label=f"step {s}")
    axes[1].set_xlabel("relative decoder norm at the checkpoint")
    axes[1].set_ylabel("live latents")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=6, ncol=1 + len(steps) // 8)
    fig.suptitle(f"crosscoder at {latents['site']}", fontsize=10)
    return _save(plt, fig, path)


def crosscoder_circuits_plot(circuits: dict, path: Path) -> Path:
    """Per task, over the crosscoder's checkpoints: the share of the last circuit's latents present (crosscoder)
    beside the share of the last SAE circuit's features matched (independent SAEs), the last circuit's faithfulness
    with the same latent ids, and its latents' mean relative indirect effect."""
    plt, fig, axes = _fig(1, 3, (16, 3.8))
    for i, (task, v) in enumerate(circuits.items()):
        rows = v["rows"]
        x = [_x(r["step"]) for r in rows]
        axes[0].plot(x, [r["share_present"] for r in rows], "o-", color=f"C{i}", label=f"{task}: crosscoder")
        if any(r.get("share_matched_saes") is not None for r in rows):
            axes[0].plot(
                x, [r.get("share_matched_saes") for r in rows], "s--", color=f"C{i}", alpha=0.6, label=f"{task}: SAEs"
            )
        axes[1].plot(x, [r["final_circuit_faithfulness"] for r in rows], "o-", color=f"C{i}", label=task)
        axes[2].plot(x, [r["mean_rel_ie"] for r in rows], "o-", color=f"C{i}", label=task)
    axes[0].set_ylabel("share of the last circuit present")
    axes[1].set_ylabel("faithfulness, same latent ids")
    axes[2].set_ylabel("mean RelIE of the last circuit's latents")
    return _save(plt, fig, path, steps_axes=axes)
