"""A mixing buffer: shuffle a stream of activation chunks so that batches mix many contexts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def mixing_buffer(
    chunks: Iterable[torch.Tensor], buffer_size: int, batch_size: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Yield shuffled ``[batch_size, d]`` batches from a stream of ``[n, d]`` chunks.

    The buffer fills to ``buffer_size`` rows, is shuffled, and its first half is served while the rest stays
    to mix with new rows (as SAELens's mixing buffer). At the end of the stream the remainder is served
    shuffled; a last partial batch is dropped.
    """
    if buffer_size < 2 * batch_size:
        raise ValueError(f"buffer_size {buffer_size} must be at least twice batch_size {batch_size}")
    g = torch.Generator().manual_seed(seed)
    buf: torch.Tensor | None = None
    for chunk in chunks:
        buf = chunk if buf is None else torch.cat([buf, chunk])
        if len(buf) >= buffer_size:
            buf = buf[torch.randperm(len(buf), generator=g)]
            n_out = (len(buf) // 2) // batch_size * batch_size
            yield from buf[:n_out].split(batch_size)
            buf = buf[n_out:]
    if buf is not None and len(buf):
        buf = buf[torch.randperm(len(buf), generator=g)]
        for b in buf.split(batch_size):
            if len(b) == batch_size:
                yield b
