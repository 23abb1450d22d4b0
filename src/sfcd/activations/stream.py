"""Streaming activations in bounded memory: chunks of token windows -> every needed site in one forward pass on
the device of the work -> a shuffled chunk buffer -> the batches of optimizer steps.

Memory is one chunk per site (``chunk_rows x d``, the buffer size ``sae.buffer_tokens``; two with prefetch),
whatever the number of training tokens. Everything is a function of the step, so a resumed run sees the batches
an uninterrupted one sees, and many SAEs trained from one stream see the batches each would see alone:

- step ``s`` reads chunk ``c = s // steps_per_chunk``, rows ``perm_c[j*B:(j+1)*B]`` (``j = s % steps_per_chunk``)
  with ``perm_c`` a permutation seeded by (seed, c): the shuffle within the buffer;
- a harvested chunk ``c`` is the activations of windows ``c*W, c*W + 1, ...`` of a global window order (each
  pass over the token file is a permutation seeded by (seed, epoch)), so a chunk mixes contexts from the whole
  file; excluded positions (BOS/EOS) are dropped and windows are read until the chunk is full;
- a chunk of an array source (a plain activation file) is a contiguous block of rows, blocks in an order seeded
  by (seed, epoch); ``n_tokens`` beyond the file's length repeats epochs (logged).

With a cache (``sae.cache=true``) each harvested chunk is written per site as it is made (float32 or bfloat16) and
read back through a memory map next time, so another sweep at the same checkpoint runs no forward pass.

With prefetch (``sae.prefetch``, on by default on a GPU) chunk ``c + 1`` is made on a background thread (on its
own CUDA stream) while training reads chunk ``c``: the harvest's forward passes overlap the SAE steps. The chunks
are the same ones, so every property above holds; memory is two chunks instead of one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from sfcd.activations.cache import ChunkCache, torch_dtype
from sfcd.activations.harvest import harvest_rows, model_device
from sfcd.devices import available_bytes
from sfcd.errors import InputError
from sfcd.models.sites import Site

log = logging.getLogger(__name__)

#: rng streams: window order, within-chunk shuffle, block order of array sources
_WINDOWS, _SHUFFLE, _BLOCKS = 0, 1, 2
#: harvest this many more windows than ``chunk_rows / seq_len`` per chunk (excluded positions leave gaps)
_WINDOW_MARGIN = 1.0625
#: chunk indices from here on are "fresh" samples (resampling criteria), never part of a training run
FRESH = 1 << 40


def check_buffer_fits(
    rows: int, dims: dict[str, int], dtype: torch.dtype, device: torch.device, chunks: int = 1
) -> int:
    """The buffer's bytes (``chunks`` chunks held at once: 2 with prefetch); a clear error when it cannot fit in
    what ``device`` has free."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = chunks * rows * sum(dims.values()) * itemsize
    free = available_bytes(device)
    if need > 0.8 * free:
        held = f"two chunks (prefetch) of {rows:,} tokens" if chunks == 2 else f"{rows:,} tokens"
        raise InputError(
            f"the activation buffer of {held} x {len(dims)} sites ({sum(dims.values())} dims in all, "
            f"{itemsize}-byte values) needs {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
            f"{device} allows; lower sae.buffer_tokens (or set sae.buffer_dtype=bfloat16"
            + (", or sae.prefetch=false)" if chunks == 2 else ")")
        )
    return need


def prefetch_on(setting, device: torch.device) -> bool:
    """``sae.prefetch`` (auto | true | false) for a stream on ``device``: auto prefetches on a GPU only (on the
    CPU the harvest's forward would take the cores the SAE steps use)."""
    value = str(setting).lower()
    if value not in ("auto", "true", "false"):
        raise InputError(f"sae.prefetch={setting!r}; expected auto, true or false")
    return torch.device(device).type == "cuda" if value == "auto" else value == "true"


class ChunkSource:
    """Where chunks come from: ``chunk(c)`` gives ``{name: [chunk_rows, d]}`` on ``device``."""

    names: list[str]
    dims: dict[str, int]
    chunk_rows: int
    device: torch.device

    def chunk(self, c: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to(self, device: torch.device) -> ChunkSource:
        self.device = torch.device(device)
        return self

    @property
    def lock(self) -> threading.RLock:
        """Held while the source makes rows: a prefetching thread and the training thread (a resampling
        criterion's fresh rows) never run its model, hooks and window order at the same time."""
        return self.__dict__.setdefault("_lock", threading.RLock())

    def __getstate__(self) -> dict:
        """Pickled (to spawned DDP processes) without its lock; each process makes its own."""
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` rows of chunk 0 as float32 on the CPU (for input scales and b_dec initialisation).
        Chunk 0 is kept until training asks for it, so it is made once."""
        with self.lock:
            first = self.chunk(0)
        self._first = first
        return {k: v[:n].float().cpu() for k, v in first.items()}

    def fresh(self, n: int, draw: int) -> Iterator[dict[str, torch.Tensor]]:
        """``n`` rows outside the training order, block by block (at most ``chunk_rows`` each): the chunks
        ``FRESH + draw * blocks + k`` of the same global order, far past any training chunk, so each ``draw``
        reads its own rows of the data (re-drawn from the whole file, as a random sample would be), the same
        on every rank and on a rerun. Never read from or written to the cache."""
        blocks = math.ceil(n / self.chunk_rows)
        for k in range(blocks):
            with self.lock:
                rows = self.uncached_rows(FRESH + draw * blocks + k, min(self.chunk_rows, n - k * self.chunk_rows))
            yield rows

    def uncached_rows(self, c: int, rows: int) -> dict[str, torch.Tensor]:
        """The first ``rows`` rows of chunk ``c``, bypassing any cache."""
        return {name: v[:rows] for name, v in self.chunk(c).items()}

    def take_first(self, c: int) -> dict[str, torch.Tensor] | None:
        first, self._first = getattr(self, "_first", None), None
        if first is not None and c == 0 and all(v.device == self.device for v in first.values()):
            return first
        return None


class ArraySource(ChunkSource):
    """Arrays already in memory or memory-mapped (``.npy``/``.safetensors`` files), all with the same rows."""

    def __init__(self, arrays: dict[str, np.ndarray], chunk_rows: int, seed: int, device="cpu", dtype="float32"):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise InputError(f"activation arrays of different lengths {sorted(lengths)}; expected one length")
        self.arrays, self.n = arrays, lengths.pop()
        self.names, self.dims = list(arrays), {k: a.shape[1] for k, a in arrays.items()}
        self.chunk_rows, self.seed, self.dtype = min(chunk_rows, self.n), seed, torch_dtype(dtype)
        self.device = torch.device(device)
        self.blocks = self.n // self.chunk_rows
        self._epoch_logged = 0
        self._whole: dict[str, torch.Tensor] | None = None  # when one chunk is the whole array: read it once

    def chunk(self, c: int) -> dict[str, torch.Tensor]:
        if self.chunk_rows == self.n:  # every epoch is this one block (in a new shuffle): no copy per epoch
            if self._whole is None or any(v.device != self.device for v in self._whole.values()):
                self._whole = self._read(0)
            return self._whole
        e, i = divmod(c, self.blocks)
        if e > self._epoch_logged and c < FRESH:
            log.info("the activations are read again: epoch %d of %d rows", e + 1, self.n)
            self._epoch_logged = e
        rng = np.random.default_rng([self.seed, _BLOCKS, e])
        shift = int(rng.integers(0, self.n - self.blocks * self.chunk_rows + 1))  # each epoch its own tail
        start = shift + int(rng.permutation(self.blocks)[i]) * self.chunk_rows
        return self._read(start)

    def _read(self, start: int) -> dict[str, torch.Tensor]:
        return {
            k: torch.from_numpy(np.array(a[start : start + self.chunk_rows], dtype=np.float32)).to(
                self.device, self.dtype
            )
            for k, a in self.arrays.items()
        }


class HarvestSource(ChunkSource):
    """Activations of ``sites`` harvested from ``model`` over windows of a token file, chunk by chunk."""

    def __init__(
        self,
        model,
        tokens: np.ndarray,
        sites: list[Site],
        dims: dict[str, int],
        seq_len: int,
        chunk_rows: int,
        seed: int,
        exclude_ids: set[int] | frozenset[int] = frozenset(),
        harvest_batch: int = 32,
        dtype: str = "float32",
        cache_dir: Path | None = None,
        cache_meta: dict | None = None,
        autocast: torch.dtype | None = None,
    ):
        self.model, self.tokens, self.sites, self.autocast = model, tokens, sites, autocast
        self.names, self.dims = [s.name for s in sites], {s.name: dims[s.name] for s in sites}
        self.seq_len, self.chunk_rows, self.seed = seq_len, chunk_rows, seed
        self.exclude_ids, self.harvest_batch, self.dtype = set(exclude_ids), harvest_batch, torch_dtype(dtype)
        self.n_windows = len(tokens) // seq_len
        if self.n_windows == 0:
            raise InputError(f"the token file holds {len(tokens)} tokens, fewer than one window of {seq_len}")
        self.windows_per_chunk = math.ceil(chunk_rows * _WINDOW_MARGIN / seq_len)
        self.device = model_device(model)
        self._perm: tuple[int, np.ndarray] | None = None
        self.caches: dict[str, ChunkCache] = {}
        if cache_dir is not None:
            settings = {
                **(cache_meta or {}),
                # (only when set: a cache of the model's own dtype is the one made before this setting existed)
                **({"harvest_autocast": str(autocast).removeprefix("torch.")} if autocast else {}),
                "seq_len": seq_len,
                "seed": seed,
                "windows_per_chunk": self.windows_per_chunk,
                "exclude_ids": sorted(self.exclude_ids),
                "n_tokens_in_file": len(tokens),
            }
            self.caches = {
                s.name: ChunkCache(Path(cache_dir) / s.name, self.dims[s.name], chunk_rows, settings, dtype)
                for s in sites
            }

    def to(self, device: torch.device) -> HarvestSource:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def window(self, i: int) -> np.ndarray:
        """Window ``i`` of the global order: pass ``i // n_windows`` over the file, in a seeded order."""
        e, j = divmod(i, self.n_windows)
        if self._perm is None or self._perm[0] != e:
            if e > 0 and i < FRESH and (self._perm is None or self._perm[0] < e):
                log.info("the stream passes over the token file again (epoch %d of %d windows)", e + 1, self.n_windows)
            self._perm = (e, np.random.default_rng([self.seed, _WINDOWS, e]).permutation(self.n_windows))
        start = int(self._perm[1][j]) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64)

    def _windows(self, c: int) -> Iterator[np.ndarray]:
        i = c * self.windows_per_chunk
        while True:  # past the chunk's own windows only when exclusions left it short
            yield np.stack([self.window(i + b) for b in range(self.harvest_batch)])
            i += self.harvest_batch

    def chunk(self, c: int) -> dict[str, torch.Tensor]:
        out = {n: cache.read(c, self.device) for n, cache in self.caches.items() if cache.has(c)}
        missing = [s for s in self.sites if s.name not in out]
        if missing:
            got = harvest_rows(
                self.model,
                self._windows(c),
                missing,
                self.dims,
                self.chunk_rows,
                self.exclude_ids,
                self.dtype,
                self.autocast,
            )
            for s in missing:
                if s.name in self.caches:
                    self.caches[s.name].write(c, got[s.name])
            out |= got
        return {n: out[n] for n in self.names}

    def uncached_rows(self, c: int, rows: int) -> dict[str, torch.Tensor]:
        return harvest_rows(
            self.model, self._windows(c), self.sites, self.dims, rows, self.exclude_ids, self.dtype, self.autocast
        )


class ConcatSource(ChunkSource):
    """Several sources over the same rows (e.g. K checkpoints harvested over the same windows with the same seed
    and exclusions) joined per name: chunk ``c`` is ``{name: cat([src_1.chunk(c)[name], ...], dim=1)}``, so one
    row holds every source's activations of one token (a crosscoder's ``K x d``). Memory is one chunk of ``K x d``
    per name; the sources' own chunks are freed as they are joined."""

    def __init__(self, sources: list[ChunkSource]):
        if not sources:
            raise InputError("no sources to join")
        first = sources[0]
        for s in sources[1:]:
            if s.names != first.names or s.chunk_rows != first.chunk_rows:
                raise InputError("sources joined per row must have the same names and chunk rows")
        self.sources, self.names, self.chunk_rows = sources, list(first.names), first.chunk_rows
        self.dims = {n: sum(s.dims[n] for s in sources) for n in self.names}
        self.device = first.device

    def to(self, device: torch.device) -> ConcatSource:
        for s in self.sources:
            s.to(device)
        self.device = torch.device(device)
        return self

    def _join(self, make) -> dict[str, torch.Tensor]:
        """``make(source)`` for each source in turn, copied into the joined chunk as soon as it is made and then
        freed: at most one source's chunk is alive beside the joined one (the memory plan counts on this)."""
        out: dict[str, torch.Tensor] = {}
        rows: set[int] = set()
        offsets = dict.fromkeys(self.names, 0)
        for src in self.sources:
            part = make(src)
            rows |= {len(part[n]) for n in self.names}
            if len(rows) != 1:  # a harvest that ran out of windows at one source and not at another
                raise InputError(f"the joined sources gave different numbers of rows {sorted(rows)}; cannot align them")
            for n in self.names:
                a = part[n]
                if n not in out:
                    out[n] = torch.empty(len(a), self.dims[n], dtype=a.dtype, device=a.device)
                out[n][:, offsets[n] : offsets[n] + a.shape[1]] = a
                offsets[n] += a.shape[1]
            del part, a
        return out

    def chunk(self, c: int) -> dict[str, torch.Tensor]:
        return self._join(lambda s: s.chunk(c))

    def uncached_rows(self, c: int, rows: int) -> dict[str, torch.Tensor]:
        return self._join(lambda s: s.uncached_rows(c, rows))


class StreamBatches(IterableDataset):
    """For optimizer steps ``start, start + 1, ...``: ``{name: [batch, d]}`` float32 with the same rows at every
    name, on the source's device. Under DDP each rank takes its slice of the global batch (every rank builds
    the same chunk, so the global batch is the one-device batch).

    With ``prefetch``, entering chunk ``c`` starts making chunk ``c + 1`` on a background thread (unless step
    ``stop`` lies before it); call :meth:`close` when done with the stream."""

    def __init__(
        self,
        source: ChunkSource,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        prefetch: bool = False,
        stop: int | None = None,
    ):
        if source.chunk_rows < batch_size:
            raise InputError(
                f"{source.chunk_rows} activations are fewer than one batch of {batch_size}; lower sae.batch_size"
            )
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.start, self.rank, self.world = start, rank, world
        self.steps_per_chunk = source.chunk_rows // batch_size
        self.prefetch, self.stop = prefetch, stop
        self._chunk: tuple[int, dict[str, torch.Tensor], torch.Tensor] | None = None
        self._next: tuple[int, Future] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._side: torch.cuda.Stream | None = None  # the prefetch's CUDA stream: one for every chunk it makes

    def rows(self, step: int) -> torch.Tensor:
        c, j = divmod(step, self.steps_per_chunk)
        if self._chunk is None or self._chunk[0] != c:
            self._chunk = None  # free the old chunk before the new one is made (or taken from the prefetch)
            data = self._load(c)
            perm = np.random.default_rng([self.seed, _SHUFFLE, c]).permutation(self.source.chunk_rows)
            self._chunk = (c, data, to_device_async(torch.from_numpy(perm), self.source.device))
        rows = self._chunk[2][j * self.batch_size : (j + 1) * self.batch_size]
        return rows.tensor_split(self.world)[self.rank].sort().values

    def _load(self, c: int) -> dict[str, torch.Tensor]:
        """Chunk ``c``: the prefetched one when it is (waiting for it; its error, if making it failed, is raised
        here, where making it in place would have raised it), else made now; then the next one's prefetch."""
        if self._next is not None and self._next[0] == c:
            data, done = self._next[1].result()
            self._next = None
            if done is not None:  # made on the thread's CUDA stream: this stream waits for it, and owns it
                here = torch.cuda.current_stream(self.source.device)
                here.wait_event(done)
                for t in data.values():
                    t.record_stream(here)
        else:
            self._drop_next()
            with self.source.lock:
                data = self.source.take_first(c) or self.source.chunk(c)
        if self.prefetch and (self.stop is None or (c + 1) * self.steps_per_chunk < self.stop):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfcd-prefetch")
            device = torch.device(self.source.device)
            if device.type == "cuda" and self._side is None:
                # one stream for every chunk (the allocator reuses a freed chunk's memory on the stream it was
                # made on), on the source's GPU (a device named without an index: the current one)
                self._side = torch.cuda.Stream(device if device.index is not None else torch.cuda.current_device())
            self._next = (c + 1, self._pool.submit(_made_aside, self.source, c + 1, self._side))
        return data

    def _drop_next(self) -> None:
        """Forget a prefetch that will not be used (a jump in steps), once its thread is done with the source."""
        if self._next is not None:
            with contextlib.suppress(Exception):
                self._next[1].result()
            self._next = None

    def close(self) -> None:
        """Wait for a prefetch in flight (so nothing else runs the model after this), stop the thread, and free
        the chunk (Lightning keeps the data loader, and so this stream, after training: the chunk would stay
        on the device through evaluation)."""
        self._drop_next()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._chunk = None
        self.source.take_first(0)  # chunk 0 kept for training and not taken (a run resumed past it)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        r = self.rows(step)
        return {name: a[r].float() for name, a in self._chunk[1].items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of steps ``start`` to ``stop - 1`` (endless without ``stop``): a loader that fetches one
        batch ahead (Lightning's) would otherwise make a chunk past the last step."""
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.batch(step)
            step += 1


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the host) on ``device``; to a GPU through pinned memory, asynchronously: a copy from pageable
    memory first waits for the device's queue to drain (a host sync, here once a chunk). The pinned block is not
    reused before the copy is done (torch's caching host allocator records the copy's event on it)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _made_aside(
    source: ChunkSource, c: int, stream: torch.cuda.Stream | None
) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Chunk ``c`` made on a prefetching thread; on a GPU on ``stream``, so the harvest's kernels run beside the
    training's, with the event that marks them done."""
    if stream is None:
        with source.lock:
            return source.chunk(c), None
    torch.cuda.set_device(stream.device)
    with torch.cuda.stream(stream), source.lock:
        data = source.chunk(c)
    done = torch.cuda.Event()
    done.record(stream)
    return data, done
