"""The on-disk activation cache: ``<dir>/shard_<i>.bin`` (float memmaps, [rows, d]) + ``manifest.json``.

The manifest (model, step, site, dtype, count, d, shards) is written last, so a cache without one is
incomplete and is rebuilt. Plain activation files (``.npy`` or ``.safetensors``, shape [N, d]) are read too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from sfcd.errors import InputError, MissingArtifactError
from sfcd.io import atomic_path, read_json, write_json

DTYPES = {"float32": np.float32, "float16": np.float16}


class CacheWriter:
    """Append [n, d] chunks; shards of ``shard_rows`` rows; ``close()`` writes the manifest."""

    def __init__(self, folder: Path, d: int, meta: dict, dtype: str = "float32", shard_rows: int = 1 << 18):
        if dtype not in DTYPES:
            raise InputError(f"activation cache dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        self.folder, self.d, self.meta, self.dtype, self.shard_rows = Path(folder), d, meta, dtype, shard_rows
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "manifest.json").unlink(missing_ok=True)
        self.shards: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._buf_rows = 0
        self.count = 0

    def append(self, chunk: torch.Tensor) -> None:
        arr = chunk.detach().cpu().numpy().astype(DTYPES[self.dtype], copy=False)
        if arr.ndim != 2 or arr.shape[1] != self.d:
            raise InputError(f"activation chunk of shape {tuple(arr.shape)}; expected [n, {self.d}]")
        self._buf.append(arr)
        self._buf_rows += len(arr)
        while self._buf_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        data = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        head, tail = data[:rows], data[rows:]
        name = f"shard_{len(self.shards):05d}.bin"
        with atomic_path(self.folder / name) as tmp:
            head.tofile(tmp)
        self.shards.append({"file": name, "rows": len(head)})
        self.count += len(head)
        self._buf, self._buf_rows = ([tail] if len(tail) else []), len(tail)

    def close(self) -> dict:
        if self._buf_rows:
            self._flush(self._buf_rows)
        manifest = {**self.meta, "dtype": self.dtype, "count": self.count, "d": self.d, "shards": self.shards}
        write_json(self.folder / "manifest.json", manifest)
        return manifest


def write_cache(folder: Path, chunks: Iterable[torch.Tensor], d: int, meta: dict, dtype: str = "float32") -> dict:
    w = CacheWriter(folder, d, meta, dtype)
    for c in chunks:
        w.append(c)
    return w.close()


def cache_complete(folder: Path) -> bool:
    return (Path(folder) / "manifest.json").exists()


def read_cache(folder: Path) -> np.ndarray:
    """The whole cache as one [count, d] array (shards memory-mapped, concatenated in memory when several)."""
    folder = Path(folder)
    if not cache_complete(folder):
        raise MissingArtifactError(f"no complete activation cache in {folder} (manifest.json missing)")
    m = read_json(folder / "manifest.json")
    parts = [
        np.memmap(folder / s["file"], dtype=DTYPES[m["dtype"]], mode="r", shape=(s["rows"], m["d"]))
        for s in m["shards"]
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_activation_file(path: str | Path) -> np.ndarray:
    """A plain activation file: ``.npy`` or ``.safetensors`` (one tensor, or key ``activations``), [N, d] float."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"activation file {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise InputError(f"{path} is not a plain .npy array ({e})") from None
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise InputError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        if "activations" in tensors:
            arr = tensors["activations"]
        elif len(tensors) == 1:
            arr = next(iter(tensors.values()))
        else:
            raise InputError(f"{path} holds tensors {sorted(tensors)}; expected one, or one named 'activations'")
    else:
        raise InputError(f"activation file {path} has suffix {path.suffix!r}; expected .npy or .safetensors")
    if arr.ndim != 2:
        raise InputError(f"activation file {path} has shape {tuple(arr.shape)} (rank {arr.ndim}); expected [N, d]")
    if arr.dtype.kind != "f":
        raise InputError(f"activation file {path} has dtype {arr.dtype}; expected a float dtype (float16/32/64)")
    return arr
