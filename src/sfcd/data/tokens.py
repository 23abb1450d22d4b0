"""Token files: a flat numpy memmap (``<split>.tokens``) with a JSON sidecar giving its dtype and length."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sfcd.errors import InputError, MissingArtifactError
from sfcd.io import atomic_path, read_json, write_json


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_tokens(path: Path, chunks: Iterable[list[int]], vocab_size: int, limit: int) -> int:
    """Write up to ``limit`` tokens from ``chunks`` to ``path`` (atomically); returns the count written."""
    dtype = token_dtype(vocab_size)
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for ids in chunks:
            arr = np.asarray(ids[: limit - n], dtype=dtype)
            f.write(arr.tobytes())
            n += len(arr)
            if n >= limit:
                break
    if n == 0:
        path.unlink(missing_ok=True)
        raise InputError(f"the corpus for {path.name} is empty: no tokens came from its source")
    write_json(path.with_suffix(".json"), {"dtype": dtype.name, "n_tokens": n, "vocab_size": vocab_size})
    return n


def read_tokens(path: Path) -> np.ndarray:
    """The token file at ``path`` as a read-only memmap."""
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise MissingArtifactError(f"token file {path} does not exist; run `sfcd corpus` first")
    meta = read_json(meta_path)
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))
