"""The device of the work: every stage puts its model, dictionaries and tensors where ``cfg.trainer`` says.

``trainer.accelerator`` is Lightning's (``cpu``, ``gpu``/``cuda``, ``auto``); under DDP each process works on
``cuda:<LOCAL_RANK>``, the device Lightning gives that rank. Asking for a GPU where none is visible is a
one-line error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import os

import torch

from sfcd.errors import ConfigError

GPU_NAMES = ("gpu", "cuda")


def work_device(trainer_cfg=None) -> torch.device:
    """The device a stage runs on, from ``trainer.accelerator`` (None or ``cpu``: the CPU)."""
    acc = str(getattr(trainer_cfg, "accelerator", None) or "cpu").lower()
    if acc == "cpu":
        return torch.device("cpu")
    if acc == "auto":
        acc = "cuda" if torch.cuda.is_available() else "cpu"
        if acc == "cpu":
            return torch.device("cpu")
    if acc in GPU_NAMES:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={acc} asks for a GPU but torch sees none (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use trainer=cpu, or run where a GPU is visible"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if acc == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator=mps but MPS is not available; use trainer=cpu")
        return torch.device("mps")
    raise ConfigError(f"trainer.accelerator={acc!r}; expected cpu, gpu, cuda, mps or auto")


def check_accelerator(trainer_cfg) -> None:
    """Fail early, before Lightning does with a traceback, when the configured accelerator is not here."""
    work_device(trainer_cfg)


def available_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device`` (CUDA: free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA's peak allocation on ``device``, else this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
