"""Checkpoint schedules and the learning-rate schedule."""

from __future__ import annotations

import math

#: Pythia's 154 revisions: step0, log-spaced 1..512, then every 1000 up to 143000.
PYTHIA_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), *range(1000, 143001, 1000))


def checkpoint_steps(max_step: int, log_until: int = 512, every: int = 1000, extra: tuple[int, ...] = ()) -> list[int]:
    """Step 0, powers of two up to ``log_until``, every ``every`` steps after, ``extra``, and ``max_step``."""
    steps = {0, max_step, *extra}
    p = 1
    while p <= min(log_until, max_step):
        steps.add(p)
        p *= 2
    if every > 0:
        steps.update(range(every, max_step + 1, every))
    return sorted(s for s in steps if 0 <= s <= max_step)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` (Pythia's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
