"""The paper's agreement files, tried as a new user would: files in the Sparse Feature Circuits format (JSON lines,
``.json``) and vocabulary, generated here with an unrelated seed (independently of the corpus and of the run's
own task files), loaded with ``load_task`` and scored on a run's checkpoints with the train log's metric.
Also scores the held-out subjects of rc_heldout against the same form with seen subjects.

    python benchmarks/paper_tasks.py runs/demo              # every checkpoint of the run
    python benchmarks/paper_tasks.py runs/demo --steps 1500
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sfcd.data import grammar
from sfcd.data.corpus import corpus_tokenizer
from sfcd.data.tasks import load_task
from sfcd.io import write_jsonl
from sfcd.models import evaluate
from sfcd.models.loading import load_model
from sfcd.paths import RunDir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, nargs="*", help="default: every checkpoint")
    ap.add_argument("--pairs", type=int, default=400, help="pairs generated per task")
    ap.add_argument("--seed", type=int, default=20240318, help="an unrelated seed (not the corpus's)")
    args = ap.parse_args(argv)
    run = RunDir(args.run_dir)
    tok = corpus_tokenizer(run)
    folder = Path(tempfile.mkdtemp(prefix="sfcd-paper-tasks-"))
    tasks = {}
    for name in (*grammar.PAPER_TASKS, "rc_heldout"):
        path = folder / f"{name}.json"  # the paper's files are JSON lines with a .json suffix
        write_jsonl(path, grammar.task_pairs(name, args.pairs, args.seed))
        tasks[name] = load_task(path, tok, name)
    for step in args.steps or run.model_steps():
        model = load_model(run.root, step=step)
        row = {"step": step}
        for name, task in tasks.items():
            s = evaluate.agreement(model, task)
            row[name] = round(s.accuracy, 3)
            row[f"{name}_pairs"] = len(task.pairs)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
