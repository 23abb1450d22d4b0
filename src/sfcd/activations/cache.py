"""The on-disk activation cache, written chunk by chunk while streaming: ``<dir>/chunk_<c>.bin`` (raw [rows, d]
arrays, float32 or bfloat16) + ``stream.json``; read back through memory maps. Plain activation files
(``.npy`` or ``.safetensors``, shape [N, d]) are read as memory maps too."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sfcd.errors import ConfigError, InputError
from sfcd.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_NP_STORAGE = {"float32": np.float32, "bfloat16": np.uint16}  # bf16 is stored as its raw 16 bits


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"activation dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


class ChunkCache:
    """One site's cached stream: ``chunk_<c>.bin`` ([rows, d] in ``dtype``, each written atomically, so a chunk
    file is whole or absent) and ``stream.json`` (what determines the chunks' contents).

    A cache made with other stream settings (token file, window length, chunk size, seed, exclusions, dtype)
    holds other chunks: it is emptied with a log line and rebuilt.
    """

    def __init__(self, folder: Path, d: int, rows: int, settings: dict, dtype: str = "float32"):
        torch_dtype(dtype)
        self.folder, self.d, self.rows, self.dtype = Path(folder), d, rows, dtype
        self.settings = {**settings, "d": d, "rows": rows, "dtype": dtype}
        meta = self.folder / "stream.json"
        if meta.exists() and read_json(meta) != self.settings:
            old = read_json(meta)
            changed = sorted(k for k in self.settings if old.get(k) != self.settings[k])
            log.info("activation cache %s was made with other settings (%s); rebuilding it", self.folder, changed)
            for f in self.folder.glob("chunk_*.bin"):
                f.unlink()
        if not meta.exists() or read_json(meta) != self.settings:
            write_json(meta, self.settings)

    def path(self, c: int) -> Path:
        return self.folder / f"chunk_{c:06d}.bin"

    def has(self, c: int) -> bool:
        return self.path(c).exists()

    def read(self, c: int, device: torch.device) -> torch.Tensor:
        """Chunk ``c`` through a memory map, copied once to ``device`` (no concatenation of pieces)."""
        mm = np.memmap(self.path(c), dtype=_NP_STORAGE[self.dtype], mode="r", shape=(self.rows, self.d))
        t = torch.from_numpy(np.array(mm))
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(device)

    def write(self, c: int, chunk: torch.Tensor) -> None:
        if tuple(chunk.shape) != (self.rows, self.d):
            raise InputError(f"activation chunk of shape {tuple(chunk.shape)}; expected [{self.rows}, {self.d}]")
        t = chunk.detach().to("cpu", DTYPES[self.dtype]).contiguous()
        arr = t.view(torch.int16).numpy().view(np.uint16) if self.dtype == "bfloat16" else t.numpy()
        with atomic_path(self.path(c)) as tmp:
            arr.tofile(tmp)

    def chunks(self) -> list[int]:
        return sorted(int(f.stem.split("_")[1]) for f in self.folder.glob("chunk_*.bin"))


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
        arr = _safetensors_memmap(path)
    else:
        raise InputError(f"activation file {path} has suffix {path.suffix!r}; expected .npy or .safetensors")
    if arr.ndim != 2:
        raise InputError(f"activation file {path} has shape {tuple(arr.shape)} (rank {arr.ndim}); expected [N, d]")
    if arr.dtype.kind != "f" and not isinstance(arr, Bf16Array):
        raise InputError(f"activation file {path} has dtype {arr.dtype}; expected a float dtype (float16/32/64)")
    return arr


class Bf16Array:
    """A read-only [N, d] bfloat16 memory map that hands out float32 rows (numpy has no bfloat16)."""

    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray):
        self.raw, self.shape, self.ndim = raw, raw.shape, raw.ndim

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, idx) -> np.ndarray:
        bits = np.asarray(self.raw[idx], dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)


_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}


def _safetensors_memmap(path: Path):
    """The file's one tensor (or ``activations``) as a memory map at its offset: nothing is read into memory."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise InputError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    header.pop("__metadata__", None)
    if "activations" in header:
        key = "activations"
    elif len(header) == 1:
        key = next(iter(header))
    else:
        raise InputError(f"{path} holds tensors {sorted(header)}; expected one, or one named 'activations'")
    entry = header[key]
    if entry["dtype"] not in _ST_DTYPES:
        raise InputError(
            f"activation file {path} has dtype {entry['dtype']}; expected a float dtype (F16/BF16/F32/F64)"
        )
    start, _ = entry["data_offsets"]
    mm = np.memmap(path, dtype=_ST_DTYPES[entry["dtype"]], mode="r", offset=8 + n + start, shape=tuple(entry["shape"]))
    return Bf16Array(mm) if entry["dtype"] == "BF16" else mm
