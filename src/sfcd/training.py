"""Pieces shared by sfcd's Lightning trainings: the Trainer from ``cfg.trainer`` and atomic state saves, written
on a background thread (Lightning's ``AsyncCheckpointIO``) so that training does not stall while they are."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from omegaconf import DictConfig, ListConfig

from sfcd.devices import work_device
from sfcd.errors import ConfigError


@torch.no_grad()
def clip_grad_norms_(groups: list[list[torch.nn.Parameter]], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(group, max_norm)`` for each group of parameters (each SAE's own clip),
    with every gradient's norm taken in one ``_foreach_norm`` and each group's total by one scatter-add: the
    host work of one clip, not one per group (19 at the pythia preset's sites), and no host read. The result is
    torch's: the same norms, coefficient ``max_norm / (total + 1e-6)`` clamped at 1, and product."""
    grads = [[p.grad for p in group if p.grad is not None] for group in groups]
    flat = [g for gs in grads for g in gs]
    if not flat:
        return
    device = flat[0].device
    counts = (device, tuple(len(gs) for gs in grads))
    which = _GROUP_OF.get(counts)
    if which is None:  # made once per layout: a tensor from host memory is a copy the host waits for
        which = _GROUP_OF[counts] = torch.tensor([i for i, gs in enumerate(grads) for _ in gs], device=device)
    norms = torch.stack(torch._foreach_norm(flat))  # every SAE on one device, as they train
    totals = torch.zeros(len(groups), dtype=norms.dtype, device=device).index_add_(0, which, norms.square()).sqrt()
    for gs, coef in zip(grads, (max_norm / (totals + 1e-6)).clamp(max=1.0).unbind(), strict=True):
        if gs:
            torch._foreach_mul_(gs, coef)


#: for :func:`clip_grad_norms_`: each gradient's group, by (device, gradients per group)
_GROUP_OF: dict[tuple, torch.Tensor] = {}


def trainer_device(trainer_cfg: DictConfig) -> torch.device:
    """The device Lightning trains this process on, for the data and models a stage puts beside it:
    :func:`sfcd.devices.work_device`'s, except that a GPU list ``trainer.devices=[i, ...]`` maps the process's
    local rank to GPU ``i`` (``trainer.devices=[${sae.shard}]`` pins each site-parallel shard job to its GPU)."""
    device = work_device(trainer_cfg)
    devices = trainer_cfg.get("devices")
    if device.type != "cuda" or not isinstance(devices, (list, tuple, ListConfig)):
        return device
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if rank >= len(devices):
        raise ConfigError(f"trainer.devices={list(devices)} has no entry for local rank {rank}; list one GPU per rank")
    index = int(devices[rank])
    if not 0 <= index < torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={list(devices)} names GPU {index} but {torch.cuda.device_count()} are visible; "
            "name GPUs 0 to the count minus one"
        )
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # this job's CUDA context on its own GPU only
    return device


def _plain(value):
    """A config list as a plain list of its resolved values (``[${sae.shard}]`` -> ``[2]``), for Lightning."""
    return [int(v) for v in value] if isinstance(value, (ListConfig, list, tuple)) else value


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` straight into a temp file beside the target, then renamed over it: a reader (a resume) finds
    the previous state or the new one whole, never a part. (Lightning's own writes through an in-memory copy of
    the whole file first, a second 7.6 GB at the pythia preset's 19 sites.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes local files and takes no storage_options")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the previous state
        os.replace(tmp, path)


class OneSaveAtATime(AsyncCheckpointIO):
    """Lightning's ``AsyncCheckpointIO`` with at most one save in flight: a save first waits for the previous
    one's write (raising its error, if it failed), so snapshots never pile up on the device when saves come
    faster than the disk takes them (each is a copy of the whole state: 7.6 GB at the pythia preset)."""

    def save_checkpoint(self, *args, **kwargs) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # the previous write; a new executor is made for this one
            self._executor = None
            if self._error:
                raise self._error
        super().save_checkpoint(*args, **kwargs)


def make_trainer(trainer_cfg: DictConfig, max_steps: int, log_dir: Path, callbacks: list, **kwargs) -> L.Trainer:
    """A Lightning Trainer on ``trainer_cfg`` (accelerator, devices, strategy, precision) with a CSV logger
    and, when tensorboard is installed, a TensorBoard logger beside it. State saves are atomic and written on a
    background thread: ``AsyncCheckpointIO`` snapshots every tensor (a copy on its device, kept until written)
    and returns, at most one save is in flight (:class:`OneSaveAtATime`), and the Trainer's teardown waits for
    the last write, so a run that ends or fails leaves its last state whole. On a GPU the writer's copy of the
    snapshot to the host runs on the default stream, between the training's kernels (not yet measured on a
    GPU)."""
    log_every = int(trainer_cfg.get("log_every_n_steps", 10))
    if log_every < 1:
        raise ConfigError(f"trainer.log_every_n_steps must be at least 1 (steps between logged metrics): {log_every}")
    loggers = [L.pytorch.loggers.CSVLogger(str(log_dir), name="lightning_logs", version=0)]
    try:
        import tensorboard  # noqa: F401

        loggers.append(L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="tensorboard", version=0))
    except ImportError:
        pass
    return L.Trainer(
        max_steps=max_steps,
        accelerator=trainer_cfg.accelerator,
        devices=_plain(trainer_cfg.devices),
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        callbacks=callbacks,
        logger=loggers,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=log_every,
        num_sanity_val_steps=0,
        plugins=[OneSaveAtATime(AtomicCheckpointIO())],
        **kwargs,
    )


def save_state(trainer: L.Trainer, path: Path) -> None:
    """Lightning's full training state (weights, optimizer, loops), written atomically on a background thread
    (:class:`AtomicCheckpointIO` under ``AsyncCheckpointIO``): the call returns once the state is snapshotted.

    Every rank must call this: ``Trainer.save_checkpoint`` gathers the state, writes on rank 0 and ends in a
    barrier (under DDP, a call on rank 0 alone waits forever)."""
    trainer.save_checkpoint(str(path), weights_only=False)


class SaveEvery(L.Callback):
    """Save the training state every ``every`` optimizer steps, atomically, for a resume (on every rank).

    With ``minutes`` > 0, every that many minutes of training instead: a save is collective, so every rank must
    agree on when, and a per-step clock check would need a collective every step; so the interval in steps is
    fixed once, from rank 0's mean step time over ``probe`` steps after the first (its warm-up left out),
    broadcast to every rank, and re-measured after a resume. No save happens before the interval is known."""

    def __init__(self, path: Path, every: int, minutes: float = 0.0, probe: int = 20):
        self.path, self.every, self.minutes, self.probe = path, every, float(minutes), probe
        self.interval: int | None = None if self.minutes > 0 else every
        self._mark: tuple[int, float] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.interval is None:
            if self._mark is None:
                self._mark = (step, time.monotonic())
            elif step - self._mark[0] >= self.probe:
                per_step = (time.monotonic() - self._mark[1]) / (step - self._mark[0])
                self.interval = int(trainer.strategy.broadcast(max(1, round(self.minutes * 60 / per_step))))
        if self.interval and self.interval > 0 and step % self.interval == 0:
            save_state(trainer, self.path)
