"""Activation arrays for SAE training: harvested from a checkpoint (optionally cached on disk) or read from a
plain file; and the step-indexed batches that make training resumable and identical for one or many SAEs."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from sfcd.activations.cache import cache_complete, read_cache, write_cache
from sfcd.activations.harvest import harvest, token_windows
from sfcd.errors import InputError
from sfcd.models.sites import Site

log = logging.getLogger(__name__)


def harvest_arrays(
    model,
    tokens: np.ndarray,
    sites: list[Site],
    n_tokens: int,
    seq_len: int,
    batch: int,
    exclude_ids: set[int],
    offset: int = 0,
) -> dict[str, np.ndarray]:
    """About ``n_tokens`` activations per site (after exclusions), all sites from the same forward passes."""
    n_seqs = -(-n_tokens // seq_len) + max(1, n_tokens // seq_len // 16)  # a margin for excluded tokens
    windows = token_windows(tokens, seq_len, n_seqs, offset)
    chunks: dict[str, list[np.ndarray]] = {s.name: [] for s in sites}
    got = 0
    for out in harvest(model, windows, sites, batch, exclude_ids):
        for name, a in out.items():
            chunks[name].append(a.numpy())
        got += len(next(iter(out.values())))
        if got >= n_tokens:
            break
    arrays = {name: np.concatenate(c)[:n_tokens] for name, c in chunks.items()}
    if got < n_tokens:
        log.warning(
            "harvested %d activations per site, fewer than the %d asked (the token file is short)", got, n_tokens
        )
    return arrays


def cached_or_harvest(
    folder: Path,
    model,
    tokens,
    sites: list[Site],
    n_tokens: int,
    seq_len: int,
    batch: int,
    exclude_ids: set[int],
    meta: dict,
    use_cache: bool,
) -> dict[str, np.ndarray]:
    """Activations per site, from ``folder/<site>/`` caches when complete and large enough, else harvested
    (all missing sites in one pass) and, with ``use_cache``, written there."""
    arrays: dict[str, np.ndarray] = {}
    missing = []
    for s in sites:
        f = folder / s.name
        if use_cache and cache_complete(f):
            arr = read_cache(f)
            if len(arr) >= n_tokens:
                arrays[s.name] = arr[:n_tokens]
                continue
        missing.append(s)
    if missing:
        log.info("harvesting %d activations at %s", n_tokens, ", ".join(s.name for s in missing))
        new = harvest_arrays(model, tokens, missing, n_tokens, seq_len, batch, exclude_ids)
        for s in missing:
            if use_cache:
                write_cache(
                    folder / s.name, [torch.from_numpy(new[s.name])], new[s.name].shape[1], {**meta, "site": s.name}
                )
            arrays[s.name] = new[s.name]
    return arrays


class StepBatches(IterableDataset):
    """For optimizer steps ``start, start + 1, ...``: ``{site: [batch, d]}`` with the same rows at every site.

    Step s takes rows ``perm_e[j*B:(j+1)*B]`` of epoch ``e = s // steps_per_epoch`` (``j = s % ...``), with
    ``perm_e`` a permutation seeded by (seed, e): a function of the step alone, so resumed or many-SAE runs
    see the batches a single uninterrupted run sees. Under DDP each rank takes its slice of the batch.
    """

    def __init__(
        self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1
    ):
        self.arrays, self.batch_size, self.seed, self.start, self.rank, self.world = (
            arrays,
            batch_size,
            seed,
            start,
            rank,
            world,
        )
        self.n = len(next(iter(arrays.values())))
        if self.n < batch_size:
            raise InputError(f"{self.n} activations are fewer than one batch of {batch_size}; lower sae.batch_size")
        self.steps_per_epoch = self.n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, step: int) -> np.ndarray:
        e, j = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, np.random.default_rng([self.seed, e]).permutation(self.n))
        rows = self._perm[1][j * self.batch_size : (j + 1) * self.batch_size]
        return np.sort(np.array_split(rows, self.world)[self.rank])

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        r = self.rows(step)
        return {site: torch.from_numpy(np.ascontiguousarray(a[r], dtype=np.float32)) for site, a in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return map(self.batch, itertools.count(self.start))
