"""The crosscoder stage's memory plan: what training crosscoders at some sites over K checkpoints holds on the
device at once, part by part, against what the device has free.

Training holds, per group of sites trained together (``dims``: each site's per-checkpoint width ``d``):

- ``models``: the K checkpoints' weights (measured by the caller; they stay on the device for the whole stage);
- ``model_chunk``: one checkpoint's stream chunk for the group's sites (``rows x sum(d)``, buffer dtype): the K
  checkpoints' chunks are made one after another and each is freed once copied into the joined chunk
  (:class:`sfcd.activations.stream.ConcatSource`), so one is alive at a time;
- ``joined``: the joined chunk ``rows x K x sum(d)`` (buffer dtype); it *is* the shuffled buffer the batches are
  drawn from (through ``shuffle_index``, a permutation of its rows: 8 bytes a row), never copied again;
- ``weights``: ``W_enc`` [K d, m], ``W_dec`` [m, K d], ``b_enc`` [m], ``b_dec`` [K d] per site (param dtype),
  with the module's buffers (input scale, block means, firing counters);
- ``grads``: one per parameter (param dtype);
- ``adam``: ``adam_states`` (2: first and second moments) per parameter (param dtype);
- ``save_snapshot``: a training-state save's copy of the weights, buffers and Adam's moments, which Lightning's
  ``AsyncCheckpointIO`` takes on their device and keeps until written (one save at a time);
- ``autocast``: under bf16-mixed, autocast's half-precision copies of ``W_enc`` and ``W_dec`` (``W_dec``'s cached for
  the whole training step, every site's; ``W_enc``'s, cast from its transposed view, which autocast does not
  cache, lives through the encoder's matmul only: counted as kept, an upper bound);
- ``batch``: one batch of every site's ``K d`` inputs (float32), plus the largest site's working tensors of one
  step (an estimate: the scaled input, the reconstruction and its error, ``[B, K d]`` each; the pre-activations,
  the selection score and AuxK's masked copy, ``[B, m]`` each).

A stage trains every site together when that fits, else in groups of as many sites as fit, one group after another
(each site still sees the batches it would see with the others: the stream is a function of the step), and stops
before training, with one line naming settings that would fit, when not even one site fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from sfcd.errors import InputError

GIB = 2**30
#: the share of the device's free memory a plan may use (allocator fragmentation, the CUDA context, the harvest's
#: forward activations and the evaluation's small tensors take the rest)
HEADROOM = 0.8


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def memory_plan(
    K: int,
    dims: list[int],
    d_sae: list[int],
    rows: int,
    buffer_dtype: torch.dtype = torch.float32,
    batch_size: int = 4096,
    param_dtype: torch.dtype = torch.float32,
    adam_states: int = 2,
    autocast_dtype: torch.dtype | None = None,
    model_bytes: int = 0,
) -> dict[str, int]:
    """Bytes of each part of training crosscoders over ``K`` checkpoints at sites of per-checkpoint widths
    ``dims`` (trained together) with ``d_sae`` latents each, from a stream chunk of ``rows`` tokens."""
    if len(dims) != len(d_sae):
        raise ValueError(f"{len(dims)} widths for {len(d_sae)} latent counts")
    buf, par = itemsize(buffer_dtype), itemsize(param_dtype)
    n_params = sum(2 * K * d * m + m + K * d for d, m in zip(dims, d_sae, strict=True))
    # input scale and block means (K d each), counters
    module_buffers = sum(2 * 4 * K * d + 8 * m + 4 for d, m in zip(dims, d_sae, strict=True))
    work = max((3 * K * d + 3 * m for d, m in zip(dims, d_sae, strict=True)), default=0)
    return {
        "models": int(model_bytes),
        "model_chunk": rows * sum(dims) * buf,
        "joined": rows * K * sum(dims) * buf,
        "shuffle_index": rows * 8,
        "weights": n_params * par + module_buffers,
        "grads": n_params * par,
        "adam": adam_states * n_params * par,
        # (the block means are not part of the saved state: persistent=False)
        "save_snapshot": (1 + adam_states) * n_params * par + module_buffers - sum(4 * K * d for d in dims),
        "autocast": 0
        if autocast_dtype is None
        else 2 * K * sum(d * m for d, m in zip(dims, d_sae, strict=True)) * itemsize(autocast_dtype),
        "batch": 4 * batch_size * (K * sum(dims) + work),
    }


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def describe(parts: dict[str, int]) -> str:
    shown = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items() if v)
    return f"{fmt_bytes(sum(parts.values()))} ({shown})"


@dataclass(frozen=True)
class PlanInputs:
    """What a plan depends on besides the sites' widths."""

    K: int
    expansion: int
    rows: int
    batch_size: int
    buffer_dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype = torch.float32
    adam_states: int = 2
    autocast_dtype: torch.dtype | None = None
    model_bytes_each: int = 0  # one checkpoint's model on the device

    def parts(self, dims: list[int]) -> dict[str, int]:
        return memory_plan(
            self.K,
            dims,
            [self.expansion * d for d in dims],
            self.rows,
            self.buffer_dtype,
            self.batch_size,
            self.param_dtype,
            self.adam_states,
            self.autocast_dtype,
            self.K * self.model_bytes_each,
        )


@dataclass
class Schedule:
    """The groups of sites trained together, one group after another, and each group's plan."""

    groups: list[list[str]]
    plans: list[dict[str, int]]
    limit: int

    @property
    def together(self) -> bool:
        return len(self.groups) <= 1


def schedule_sites(sites: dict[str, int], inputs: PlanInputs, limit: int, where: str = "") -> Schedule:
    """Groups of ``sites`` (name -> per-checkpoint width), in order, each as large as fits in ``limit`` bytes:
    every site at once when that fits, else one group after another. When not even one site fits: an
    :class:`InputError` of one line naming settings under which it would (``where`` says where ``limit`` came
    from)."""

    def total(dims: list[int], p: PlanInputs = inputs) -> int:
        return sum(p.parts(dims).values())

    names = list(sites)
    if total([sites[n] for n in names]) <= limit:
        return Schedule([names], [inputs.parts([sites[n] for n in names])], limit)
    widest = max(names, key=lambda n: sites[n])
    if total([sites[widest]]) > limit:
        raise InputError(refusal(widest, sites[widest], inputs, limit, where))
    groups: list[list[str]] = []
    cur: list[str] = []
    for n in names:
        if cur and total([sites[s] for s in [*cur, n]]) > limit:
            groups.append(cur)
            cur = []
        cur.append(n)
    groups.append(cur)
    return Schedule(groups, [inputs.parts([sites[s] for s in g]) for g in groups], limit)


def refusal(site: str, d: int, p: PlanInputs, limit: int, where: str = "") -> str:
    """One line: what the crosscoder of ``site`` alone needs, against ``limit``, and each single setting change
    under which it would fit (the largest buffer, width, number of checkpoints; a bfloat16 buffer)."""

    def fits(q: PlanInputs) -> bool:
        return sum(q.parts([d]).values()) <= limit

    fixes = []
    b = largest_fitting(lambda n: fits(replace(p, rows=n * p.batch_size)), 1, max(1, p.rows // p.batch_size - 1))
    if b is not None:
        fixes.append(f"crosscoder.buffer_tokens={b * p.batch_size}")
    e = largest_fitting(lambda x: fits(replace(p, expansion=x)), 1, max(1, p.expansion - 1))
    if e is not None and e < p.expansion:
        fixes.append(f"crosscoder.expansion={e}")
    if itemsize(p.buffer_dtype) > 2 and fits(replace(p, buffer_dtype=torch.bfloat16)):
        fixes.append("sae.buffer_dtype=bfloat16")
    k = largest_fitting(lambda x: fits(replace(p, K=x)), 2, max(2, p.K - 1))
    if k is not None and k < p.K:
        fixes.append(f"at most {k} checkpoints in crosscoder.steps")
    fix = ("would fit with " + ", or ".join(fixes)) if fixes else "no single change of buffer, width or K fits"
    return (
        f"the crosscoder of {site} over K={p.K} checkpoints ({p.expansion * d} latents, a buffer of {p.rows:,} "
        f"tokens) needs {describe(p.parts([d]))}, more than the {fmt_bytes(limit)}{' ' + where if where else ''}; "
        f"{fix}"
    )


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest ``v`` in ``[lo, hi]`` with ``fits(v)`` (``fits`` monotone: true up to some value), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
