"""``model/train_log.csv``: one row per checkpoint, and its plot over steps (log x axis)."""

from __future__ import annotations

import math
from pathlib import Path

from sfcd.io import atomic_path, read_csv, write_csv

BASE_FIELDS = ["step", "tokens", "train_loss", "heldout_loss", "induction_score"]
TASK_FIELDS = ["accuracy", "logit_diff"]


def fields(tasks: list[str]) -> list[str]:
    return BASE_FIELDS + [f"{t}_{f}" for t in tasks for f in TASK_FIELDS]


def update(path: Path, row: dict, tasks: list[str]) -> list[dict]:
    """Rewrite the log with ``row`` replacing any rows at or after its step (a resumed run redoes those)."""
    rows = [r for r in (read_csv(path) if path.exists() else []) if int(r["step"]) < row["step"]]
    rows.append({k: row.get(k, "") for k in fields(tasks)})
    write_csv(path, rows, fields(tasks))
    return rows


def plot(path: Path, png: Path, tasks: list[str]) -> Path:
    """Losses, agreement accuracy per task and induction score over steps, checkpoints marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(path)
    step = [max(int(r["step"]), 0.5) for r in rows]  # step 0 drawn at 0.5 on the log axis

    def col(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(step, col("train_loss"), "o-", label="train")
    axes[0].plot(step, col("heldout_loss"), "s-", label="held-out")
    axes[0].set_ylabel("loss (nats)")
    for t in tasks:
        axes[1].plot(step, col(f"{t}_accuracy"), "o-", label=t)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[1].set_ylabel("agreement accuracy")
    axes[1].set_ylim(0, 1.02)
    axes[2].plot(step, col("induction_score"), "o-", color="C3")
    axes[2].axhline(0, color="grey", lw=0.8, ls=":")
    axes[2].set_ylabel("induction score (2nd - 1st copy loss)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("step (step 0 at 0.5)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png
