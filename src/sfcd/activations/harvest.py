"""Harvest a model's activations at several sites over token windows, one forward pass per batch, on the device
where the model is."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from sfcd.errors import ConfigError
from sfcd.models.sites import Site, run_with_cache


def token_windows(tokens: np.ndarray, seq_len: int, n_seqs: int, offset: int = 0) -> np.ndarray:
    """``n_seqs`` consecutive non-overlapping windows of ``seq_len`` tokens starting at ``offset``."""
    n_avail = (len(tokens) - offset) // seq_len
    n = min(n_seqs, n_avail)
    return np.asarray(tokens[offset : offset + n * seq_len], dtype=np.int64).reshape(n, seq_len)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


#: values of ``sae.harvest_autocast``
HARVEST_AUTOCAST = ("auto", "none", "bfloat16", "float16")


def harvest_autocast(setting, model) -> torch.dtype | None:
    """``sae.harvest_autocast`` for ``model`` where it is: the dtype the training harvest's forward passes run in
    under ``torch.autocast`` (None: the model's own, ``model.dtype``).

    ``auto``: on a GPU, with the model in float32, the dtype its checkpoint is stored in when that is 16-bit
    (Pythia's hub checkpoints: float16, the precision Pythia was trained and saved in, so its activations stay in
    float16's range), else bfloat16 where the GPU has it, else float16. On the CPU, or with a model loaded in 16
    bits already, none: autocast there gains nothing."""
    value = "none" if setting is None or setting is False else str(setting).lower()
    if value not in HARVEST_AUTOCAST:
        raise ConfigError(f"sae.harvest_autocast={setting!r}; expected one of {list(HARVEST_AUTOCAST)}")
    if value == "none":
        return None
    if value != "auto":
        return getattr(torch, value)
    param = next(model.parameters())
    if param.device.type != "cuda" or param.dtype != torch.float32:
        return None
    stored = (getattr(model, "sfcd_source", None) or {}).get("stored_dtype")
    if stored in ("float16", "bfloat16"):
        return getattr(torch, stored)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def harvest(
    model,
    windows: Iterable[np.ndarray] | np.ndarray,
    sites: list[Site],
    batch_size: int = 32,
    exclude_ids: set[int] | frozenset[int] = frozenset(),
    autocast: torch.dtype | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per batch of windows, ``{site: [n_tokens, d]}`` float32 activations (token rows in order) on the
    model's device. ``windows`` is an ``[n, seq_len]`` array or an iterable of such batches.

    Positions whose token is in ``exclude_ids`` (e.g. BOS/EOS) are left out at every site alike. With
    ``autocast``, the forward passes run under ``torch.autocast`` in that dtype (:func:`harvest_autocast`).
    """
    device = model_device(model)
    excl = torch.tensor(sorted(exclude_ids), dtype=torch.long, device=device)
    if isinstance(windows, np.ndarray):
        arr = windows
        batches: Iterable[np.ndarray] = (arr[b : b + batch_size] for b in range(0, len(arr), batch_size))
    else:
        batches = windows
    with torch.no_grad():
        for w in batches:
            x = torch.from_numpy(np.ascontiguousarray(w, dtype=np.int64)).to(device, non_blocking=True)
            # without ``autocast``, in the model's own dtype also where the caller runs under autocast (a resampling
            # criterion's fresh rows are made inside Lightning's bf16-mixed training step)
            fast = (
                torch.autocast(device.type, dtype=autocast) if autocast else torch.autocast(device.type, enabled=False)
            )
            with fast:
                acts = run_with_cache(model, x, sites)
            keep = ~torch.isin(x, excl).flatten() if len(excl) else None
            out = {}
            for s in sites:
                a = acts[s.name].flatten(0, 1).float()
                out[s.name] = a[keep] if keep is not None else a
            yield out


def harvest_rows(
    model,
    windows: Iterable[np.ndarray],
    sites: list[Site],
    dims: dict[str, int],
    n_rows: int,
    exclude_ids: set[int] | frozenset[int] = frozenset(),
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Exactly ``n_rows`` activations per site (fewer only when ``windows`` runs out), written into buffers
    allocated once on the model's device: memory is ``n_rows x sum(d)``, never a list of pieces."""
    device = model_device(model)
    bufs = {s.name: torch.empty(n_rows, dims[s.name], dtype=dtype, device=device) for s in sites}
    filled = 0
    for out in harvest(model, windows, sites, exclude_ids=exclude_ids, autocast=autocast):
        n = min(len(next(iter(out.values()))), n_rows - filled)
        for name, a in out.items():
            bufs[name][filled : filled + n] = a[:n]
        filled += n
        if filled >= n_rows:
            break
    return {k: v[:filled] for k, v in bufs.items()}
