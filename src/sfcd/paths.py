"""The run directory layout, in one place. Every stage reads and writes through :class:`RunDir`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sfcd.errors import MissingArtifactError

_STEP = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class RunDir:
    """``runs/<name>/``: corpus/, model/step<N>/, ... (see the README's run directory layout)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # corpus/
    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    def tokens(self, split: str = "train") -> Path:
        return self.corpus / f"{split}.tokens"

    @property
    def corpus_meta(self) -> Path:
        """Written last by the corpus stage: its presence means the corpus is complete."""
        return self.corpus / "meta.json"

    @property
    def tokenizer(self) -> Path:
        return self.corpus / "tokenizer"

    @property
    def tasks(self) -> Path:
        return self.corpus / "tasks"

    def task_file(self, task: str, split: str = "test") -> Path:
        return self.tasks / f"{task}_{split}.jsonl"

    # model/
    @property
    def model(self) -> Path:
        return self.root / "model"

    def model_step(self, step: int) -> Path:
        return self.model / f"step{step}"

    def transcoders(self, step: int) -> Path:
        """``transcoders/step<N>/``: one folder per MLP (``mlp.<l>/``), in sparsify's transcode layout."""
        return self.root / "transcoders" / f"step{step}"

    @property
    def train_log(self) -> Path:
        return self.model / "train_log.csv"

    @property
    def train_state(self) -> Path:
        """Lightning's resumable state at the last checkpoint."""
        return self.model / "last.ckpt"

    @property
    def train_done(self) -> Path:
        return self.model / "done.json"

    def model_steps(self) -> list[int]:
        """The complete model checkpoints, in order."""
        return steps_in(self.model)

    def resolve_step(self, step: int | None) -> int:
        """``step``, checked to exist, or the last checkpoint when ``None``."""
        steps = self.model_steps()
        if not steps:
            raise MissingArtifactError(
                f"no model checkpoints in {self.model}; run `sfcd model run_dir={self.root}` first"
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise MissingArtifactError(f"no checkpoint step {step} in {self.model}; the steps there are {steps}")
        return step

    def exists(self) -> bool:
        """A run directory that some stage has written to (Hydra's ``logs/`` alone does not count)."""
        return any((self.root / d).is_dir() for d in ("corpus", "model"))

    def require(self) -> RunDir:
        """Fail clearly when no stage has run here, listing the run directories beside it."""
        if not self.exists():
            parent = self.root.parent
            runs = sorted(p.name for p in parent.iterdir() if RunDir(p).exists()) if parent.is_dir() else []
            raise MissingArtifactError(
                f"run directory {self.root} does not exist or holds no artifacts; "
                f"runs in {parent}: {runs or 'none'} (set run_dir=, or run `sfcd model` to start one)"
            )
        return self


def steps_in(folder: Path) -> list[int]:
    """The ``step<N>`` subfolders of ``folder`` that hold a ``config.json`` or ``cfg.json`` (complete ones)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and ((p / "config.json").exists() or (p / "cfg.json").exists()):
            found.append(int(m.group(1)))
    return sorted(found)
