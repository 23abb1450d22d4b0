"""The ``model`` stage: train a GPT-NeoX model from a size preset with Lightning, checkpointing on a
Pythia-like schedule; each checkpoint is a ``save_pretrained`` folder and a row of ``train_log.csv``.

Resumable: Lightning's state is saved at every checkpoint (``model/last.ckpt``), and the batch of each step is
a function of (seed, step), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from sfcd.data import planted
from sfcd.data.corpus import BEFORE_SPLIT, build_corpus, corpus_tokenizer, planted_on
from sfcd.data.grammar import TASKS
from sfcd.data.tasks import load_task
from sfcd.data.tokens import read_tokens
from sfcd.errors import ConfigError, SfcdError
from sfcd.io import atomic_dir, read_json, read_jsonl, write_json
from sfcd.models import evaluate, train_log
from sfcd.models.presets import neox_config
from sfcd.models.schedule import checkpoint_steps, lr_factor
from sfcd.paths import RunDir
from sfcd.training import make_trainer, save_state

log = logging.getLogger(__name__)


class StepBatches(IterableDataset):
    """The batches of optimizer steps ``start, start + 1, ...`` (endless; the trainer stops at max_steps).

    The batch of a step is drawn from a generator seeded by (seed, step), so a resumed run sees exactly
    the batches an uninterrupted one would (an endless stream also keeps Lightning's epoch bookkeeping out).

    With ``before=(path, S)`` (a planted construction, sfcd/data/planted.py) the steps before S read ``path``
    (the corpus without the construction) and the steps from S on ``tokens_path``: the switch is exact.
    """

    def __init__(
        self,
        tokens_path: Path,
        seq_len: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        before: tuple[Path, int] | None = None,
    ):
        self.tokens_path, self.seq_len, self.batch_size = tokens_path, seq_len, batch_size
        self.seed, self.start, self.before = seed, start, before
        self._tokens: dict[Path, np.ndarray] = {}

    def path(self, step: int) -> Path:
        """The token file step ``step`` reads."""
        return self.before[0] if self.before is not None and step < self.before[1] else self.tokens_path

    def batch(self, step: int) -> torch.Tensor:
        path = self.path(step)
        if path not in self._tokens:
            self._tokens[path] = read_tokens(path)
        tokens = self._tokens[path]
        n = len(tokens) - self.seq_len - 1
        if n <= 0:
            raise ConfigError(
                f"{path} holds {len(tokens)} tokens, fewer than one training "
                f"window of {self.seq_len + 1}; raise corpus.n_tokens or lower model.seq_len"
            )
        starts = np.random.default_rng([self.seed, step]).integers(0, n, self.batch_size)
        return torch.from_numpy(tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return map(self.batch, itertools.count(self.start))


def step_batches(cfg: DictConfig, run: RunDir, start: int = 0) -> StepBatches:
    """The model stage's batches from step ``start`` on (with the planted schedule when the corpus plants one)."""
    before = None
    if planted_on(cfg):
        before = (run.tokens(BEFORE_SPLIT), int(cfg.corpus.planted.step))
    return StepBatches(run.tokens("train"), cfg.model.seq_len, cfg.train.batch_size, cfg.train.seed, start, before)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


class CausalLM(L.LightningModule):
    """A ``GPTNeoXForCausalLM`` with Pythia's optimizer: AdamW, warmup + cosine, no decay on biases and norms."""

    def __init__(self, hf_config, cfg: DictConfig, run: RunDir):
        super().__init__()
        from transformers import GPTNeoXForCausalLM

        self.model = GPTNeoXForCausalLM(hf_config)
        self.cfg = cfg
        self.run = run

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = lm_loss(self.model, batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        t = self.cfg.train
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=tuple(t.betas),
        )
        warmup = max(1, int(t.warmup_frac * t.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.steps, warmup, t.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step  # restored before the dataloader is built, so a resume continues
        ds = step_batches(self.cfg, self.run, start)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)


class Evaluator:
    """The checkpoint metrics of ``train_log.csv``, on the corpus's test tasks and held-out tokens."""

    def __init__(self, cfg: DictConfig, run: RunDir, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.val = read_tokens(run.tokens("val"))
        names = (*TASKS, *planted.TASKS)  # the planted constructions' tasks exist when the corpus plants one
        self.tasks = {t: load_task(run.task_file(t), tokenizer, t) for t in names if run.task_file(t).exists()}
        ind = run.task_file("induction")
        self.induction = read_jsonl(ind) if ind.exists() else []

    def __call__(self, model) -> dict[str, float]:
        t = self.cfg.train
        was_training = model.training
        model.eval()
        row = {
            "heldout_loss": evaluate.heldout_loss(
                model, self.val, self.cfg.model.seq_len, t.eval_batches, t.batch_size
            ),
            "induction_score": evaluate.induction_score(model, self.tokenizer, self.induction, t.eval_pairs),
        }
        for name, task in self.tasks.items():
            s = evaluate.agreement(model, task, t.eval_pairs)
            row[f"{name}_accuracy"], row[f"{name}_logit_diff"] = s.accuracy, s.logit_diff
        model.train(was_training)
        return row


class CheckpointAndEvaluate(L.Callback):
    """At each scheduled step: a ``save_pretrained`` folder, a ``train_log.csv`` row, Lightning's state."""

    def __init__(self, cfg: DictConfig, run: RunDir, tokenizer, steps: list[int]):
        self.cfg, self.run, self.tokenizer, self.steps = cfg, run, tokenizer, set(steps)
        self.evaluator = Evaluator(cfg, run, tokenizer)
        self.task_names = list(self.evaluator.tasks)
        self._loss_sum, self._loss_n = 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0 and 0 in self.steps:
            batch = step_batches(self.cfg, self.run).batch(0)
            with torch.no_grad():
                loss = lm_loss(pl_module.model, batch.to(pl_module.device)).item()
            self._checkpoint(trainer, pl_module, 0, loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._loss_sum += float(outputs["loss"])
        self._loss_n += 1
        step = trainer.global_step
        if step in self.steps:
            self._checkpoint(trainer, pl_module, step, self._loss_sum / self._loss_n)
            self._loss_sum, self._loss_n = 0.0, 0

    def _checkpoint(self, trainer, pl_module, step: int, train_loss: float) -> None:
        if not trainer.is_global_zero:
            if step > 0:
                save_state(trainer, self.run.train_state)  # every rank joins the save (it ends in a barrier)
            return
        model = pl_module.model
        with atomic_dir(self.run.model_step(step)) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        row = {
            "step": step,
            "tokens": step * self.cfg.train.batch_size * self.cfg.model.seq_len,
            "train_loss": train_loss,
            **self.evaluator(model),
        }
        train_log.update(self.run.train_log, row, self.task_names)
        acc = " ".join(f"{t}={row[f'{t}_accuracy']:.2f}" for t in self.task_names)
        log.info(
            "step %d: held-out loss %.3f, induction %.3f, agreement %s",
            step,
            row["heldout_loss"],
            row["induction_score"],
            acc,
        )
        if step > 0:
            save_state(trainer, self.run.train_state)


def train_settings(cfg: DictConfig) -> dict:
    """What determines the trained model; a run directory holds one model."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "train")}


def train_model(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> RunDir:
    """Train (or resume, or skip when complete) the built-in model of ``cfg.run_dir``.

    ``callbacks`` are extra Lightning callbacks (e.g. early stopping, or a test's simulated crash).
    """
    if cfg.model.source:
        raise ConfigError(
            f"model.source={cfg.model.source} is a model to load, not to train; "
            "`sfcd model` trains the built-in presets (model=tiny|1l|micro)"
        )
    run = build_corpus(cfg)
    settings_path = run.model / "settings.json"
    settings = train_settings(cfg)
    if settings_path.exists() and read_json(settings_path) != settings:
        raise ConfigError(
            f"{run.model} holds a model trained with other settings; use another run_dir, "
            f"or delete {run.model} to retrain"
        )
    if run.train_done.exists():
        log.info("model in %s is complete (steps %s); skipping", run.model, run.model_steps())
        return run
    write_json(settings_path, settings)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    tokenizer = corpus_tokenizer(run)
    t = cfg.train
    steps = checkpoint_steps(t.steps, t.checkpoints.log_until, t.checkpoints.every, tuple(t.checkpoints.extra))
    L.seed_everything(t.seed, workers=True, verbose=False)
    hf_config = neox_config(cfg.model, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    module = CausalLM(hf_config, cfg, run)
    callback = CheckpointAndEvaluate(cfg, run, tokenizer, steps)
    trainer = make_trainer(
        cfg.trainer, t.steps, run.model, [callback, *(callbacks or [])], gradient_clip_val=t.grad_clip
    )
    resume = run.train_state if run.train_state.exists() else None
    if resume:
        log.info("resuming model training from %s", resume)
    trainer.fit(module, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.interrupted or trainer.global_step < t.steps:
        raise SfcdError(
            f"model training stopped at step {trainer.global_step} of {t.steps}; "
            "run the same command again to resume from the last checkpoint"
        )
    train_log.plot(run.train_log, run.model / "train_log.png", callback.task_names)
    write_json(run.train_done, {"steps": run.model_steps()})
    return run
