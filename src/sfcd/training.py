"""Pieces shared by sfcd's Lightning trainings: the Trainer from ``cfg.trainer`` and atomic state saves."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from omegaconf import DictConfig


def make_trainer(trainer_cfg: DictConfig, max_steps: int, log_dir: Path, callbacks: list, **kwargs) -> L.Trainer:
    """A Lightning Trainer on ``trainer_cfg`` (accelerator, devices, strategy, precision) with a CSV logger
    and, when tensorboard is installed, a TensorBoard logger beside it."""
    loggers = [L.pytorch.loggers.CSVLogger(str(log_dir), name="lightning_logs", version=0)]
    try:
        import tensorboard  # noqa: F401

        loggers.append(L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="tensorboard", version=0))
    except ImportError:
        pass
    return L.Trainer(
        max_steps=max_steps,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        callbacks=callbacks,
        logger=loggers,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        **kwargs,
    )


def save_state(trainer: L.Trainer, path: Path) -> None:
    """Lightning's full training state (weights, optimizer, loops), written atomically.

    Every rank must call this: ``Trainer.save_checkpoint`` gathers the state, writes on rank 0 and ends in a
    barrier (under DDP, a call on rank 0 alone waits forever). All ranks name the same temp file; rank 0, the
    only writer, renames it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(str(tmp), weights_only=False)
    if trainer.is_global_zero:
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    trainer.strategy.barrier("sfcd.save_state")


class SaveEvery(L.Callback):
    """Save the training state every ``every`` optimizer steps, atomically, for a resume (on every rank)."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and trainer.global_step % self.every == 0:
            save_state(trainer, self.path)
