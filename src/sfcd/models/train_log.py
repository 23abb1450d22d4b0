"""``model/train_log.csv``: one row per checkpoint, and its plot over steps (log x axis)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from sfcd.data.grammar import PAPER_TASKS
from sfcd.io import atomic_path, read_csv, write_csv

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sfcd.paths import RunDir

log = logging.getLogger(__name__)

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


def tasks_of(rows: list[dict]) -> list[str]:
    """The tasks a train log scores (its ``<task>_accuracy`` columns), in column order."""
    return [k[: -len("_accuracy")] for k in (rows[0] if rows else {}) if k.endswith("_accuracy")]


def crossings(
    rows: list[dict], tasks: list[str], thresholds: list[float], margin: float | None = None
) -> dict[str, dict[str, int | None]]:
    """Per task and threshold, the first checkpoint whose accuracy is at least the threshold (None: never).

    With ``margin``: the first checkpoint whose accuracy is at least the threshold and *stays* at least
    threshold - margin at every later checkpoint, so that a spike above the threshold, followed by a fall, is
    not a crossing, and a dip within the margin after it does not undo one."""
    out = {}
    for t in tasks:
        acc = [(int(r["step"]), float(r[f"{t}_accuracy"])) for r in rows if r.get(f"{t}_accuracy") not in (None, "")]
        by = {}
        for th in thresholds:
            if margin is None:
                by[str(th)] = next((s for s, a in acc if a >= th), None)
                continue
            found = None  # scan from the end: the earliest step from which the rest stays >= th - margin
            for s, a in reversed(acc):
                if a < th - margin:
                    break
                if a >= th:
                    found = s
            by[str(th)] = found
        out[t] = by
    return out


def _close(a: int, b: int, ratio: float) -> bool:
    """Two steps closer than ``ratio`` on the log axis (step 0 is close only to itself)."""
    lo, hi = min(a, b), max(a, b)
    return lo == hi or (lo > 0 and hi / lo < ratio)


def choose_steps(
    rows: list[dict],
    tasks: list[str],
    thresholds: list[float],
    max_steps: int,
    min_ratio: float = 1.0,
    margin: float | None = None,
) -> dict:
    """The checkpoints where the model's agreement develops, from its train log.

    Crossings are :func:`crossings` with ``margin`` (the first checkpoint from which a task's accuracy stays
    within ``margin`` below the threshold for the rest of the log). Candidates: each task's crossing of each
    threshold; "before": the last checkpoint at most (the earliest crossing of the lowest threshold) /
    ``min_ratio`` (the first checkpoint if a task starts above it); and the last checkpoint. No two chosen
    steps are closer than ``min_ratio`` on the log axis: a crossing within that factor of a chosen step counts
    as covered by it (250 and 256 are one moment at ratio 1.5), so noise that moves a crossing from one of two
    near checkpoints to the other does not change the choice. "Before" and the last stay; the other places go,
    one at a time, to the candidate where the most tasks not yet covered reach the highest threshold
    (learned), then where the most (task, threshold) crossings not yet covered fall, then the earlier step; so
    a task learned alone, late, keeps its step beside the crowded early ones. Returns the steps, why each was
    chosen (with the crossings each covers at nearby steps), the crossings and what was left out."""
    if not rows:
        raise ValueError("the train log has no rows")
    missing = [t for t in tasks if f"{t}_accuracy" not in rows[0]]
    if missing:
        raise ValueError(f"tasks {missing} are not in the train log; it scores {tasks_of(rows)}")
    if max_steps < 2:
        raise ValueError(f"max_steps={max_steps}: at least 2 (before learning and the last checkpoint)")
    if min_ratio < 1:
        raise ValueError(f"min_step_ratio={min_ratio}: at least 1 (1: no spacing)")
    steps = [int(r["step"]) for r in rows]
    cross = crossings(rows, tasks, thresholds, margin)
    reasons: dict[int, list[str]] = {}
    for t, by in cross.items():
        for th, s in by.items():
            if s is not None:
                reasons.setdefault(s, []).append(f"{t} >= {th}")
    low = str(min(thresholds))
    learned = [by[low] for by in cross.values() if by[low] is not None]
    before = steps[0]
    if learned:
        first = min(learned)
        before = max([s for s in steps if s < first and (s == 0 or s * min_ratio <= first)], default=steps[0])
    keep = {before: ["before any task is learned"], steps[-1]: ["last checkpoint"]}
    top = str(max(thresholds))
    events = {(s, e) for s, rs in reasons.items() for e in rs}  # (step, "task >= threshold")

    # a crossing at s is stood for by a close checkpoint at or after it, or before it where the task already is
    # within the margin of the threshold (and stays there): never by one where it is not yet learned
    near_by: dict[str, int | None] = {}
    if margin:
        below = crossings(rows, tasks, [th - margin for th in thresholds], margin)
        for t in tasks:
            for th in thresholds:
                near_by[f"{t} >= {th}"] = below[t][str(th - margin)]

    def stands_for(c: int, s: int, e: str) -> bool:
        if not _close(s, c, min_ratio):
            return False
        return s <= c or (near_by.get(e) is not None and near_by[e] <= c)

    def covers(c: int) -> set:
        return {(s, e) for s, e in events if stands_for(c, s, e)}

    covered = set().union(*(covers(s) for s in keep))

    def gain(s: int) -> tuple[int, int, int]:
        new = covers(s) - covered
        return (-sum(e.endswith(f">= {top}") for _, e in new), -len(new), s)

    pool = [s for s in sorted(reasons) if not any(_close(s, k, min_ratio) for k in keep)]
    while pool and len(keep) < max_steps:
        best = min(pool, key=gain)
        if gain(best)[1] == 0:  # nothing left that a chosen step does not already cover
            break
        keep[best] = []
        covered |= covers(best)
        pool = [s for s in pool if not _close(s, best, min_ratio)]
    chosen = sorted(keep)
    why = {}
    for s in chosen:
        near = sorted((e_s, e) for e_s, e in covers(s) if e_s != s)
        why[str(s)] = keep[s] + reasons.get(s, []) + [f"{e} (at step {e_s})" for e_s, e in near]
    taken = set().union(*(covers(s) for s in chosen))
    return {
        "steps": chosen,
        "reasons": why,
        "crossings": cross,
        "thresholds": list(thresholds),
        "tasks": list(tasks),
        "min_step_ratio": min_ratio,
        "margin": margin,
        "left_out": {  # crossings no chosen step covers
            str(s): rest
            for s in sorted(reasons)
            if s not in keep and (rest := [e for e in reasons[s] if (s, e) not in taken])
        },
    }


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
    for t in tasks:  # the paper's four solid, sfcd's own and the harder tasks dashed
        axes[1].plot(step, col(f"{t}_accuracy"), "o-" if t in PAPER_TASKS else "s--", ms=3, label=t)
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


def study_steps(cfg: DictConfig, run: RunDir) -> dict:
    """``study.steps`` when given, else the steps :func:`~sfcd.models.train_log.choose_steps` picks from the
    train log; either way written, with the reasons, to ``development/study_steps.json``."""
    from sfcd.errors import ConfigError, MissingArtifactError
    from sfcd.io import read_csv, write_json

    s = cfg.study
    if list(s.steps):
        meta = {"steps": sorted(s.steps), "source": "study.steps"}
    else:
        if not run.train_log.exists():
            raise MissingArtifactError(
                f"no train log at {run.train_log} to choose the studied steps from; train the model (`sfcd model`) "
                "or name the checkpoints, e.g. study.steps=[64,128,1500]"
            )
        rows = read_csv(run.train_log)
        tasks = list(s.step_tasks) or tasks_of(rows)
        try:
            chosen = choose_steps(rows, tasks, list(s.step_thresholds), s.max_steps, s.min_step_ratio, s.step_margin)
            meta = {**chosen, "source": str(run.train_log)}
        except ValueError as e:
            raise ConfigError(f"study.step_tasks / step_thresholds / max_steps / min_step_ratio: {e}") from None
        log.info("studied steps from the train log: %s", meta["reasons"])
    write_json(run.root / "development" / "study_steps.json", meta)
    return meta
