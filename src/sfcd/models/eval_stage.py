"""The ``eval`` stage: score one checkpoint (built-in or hub) on task files: agreement and induction."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from sfcd.data.tasks import load_task
from sfcd.devices import work_device
from sfcd.errors import ConfigError, MissingArtifactError
from sfcd.io import read_jsonl, write_json
from sfcd.models import evaluate
from sfcd.models.loading import checkpoint, provenance
from sfcd.paths import RunDir

log = logging.getLogger(__name__)


def task_path(run: RunDir, name: str, split: str = "test") -> Path:
    """A task given by name (the run's ``corpus/tasks/<name>_<split>.jsonl``) or by a file path."""
    p = Path(name)
    if p.suffix in (".json", ".jsonl") or p.exists():
        return p
    found = run.task_file(name, split)
    if not found.exists():
        have = sorted({f.stem.rsplit("_", 1)[0] for f in run.tasks.glob("*.jsonl")}) if run.tasks.is_dir() else []
        raise MissingArtifactError(
            f"no task {name!r} in {run.tasks}; the tasks there are {have or 'none'} "
            "(or give a path to a JSON-lines task file)"
        )
    return found


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Metrics of ``cfg.step`` of the run's model (or of ``cfg.model.source`` at revision step<N>)."""
    run = RunDir(cfg.run_dir)
    if not cfg.tasks:
        raise ConfigError("tasks is empty; name at least one task, e.g. tasks=[simple,nounpp]")
    model, tokenizer, step = checkpoint(cfg, cfg.step, "eval")
    model.to(work_device(cfg.trainer))
    out: dict = {"model": cfg.model.source or str(run.root), "step": step, "sfcd_model": provenance(model)}
    for name in cfg.tasks:
        path = task_path(run, name)
        if Path(name).stem.startswith("induction") or name == "induction":
            out["induction_score"] = evaluate.induction_score(model, tokenizer, read_jsonl(path))
            continue
        task = load_task(path, tokenizer, Path(name).stem)
        if not task.pairs:
            raise ConfigError(f"{task.summary()}: no usable pairs left in {path}")
        s = evaluate.agreement(model, task)
        out[task.name] = {
            "accuracy": s.accuracy,
            "logit_diff": s.logit_diff,
            "pairs": len(task.pairs),
            "dropped": dict(task.dropped),
        }
    name = f"step{step}" if step is not None else Path(cfg.model.source).name  # a lone folder, no step given
    write_json(run.root / "eval" / f"{name}.json", out)
    return out
