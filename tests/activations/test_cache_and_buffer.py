"""The chunk cache and plain activation files."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from sfcd.activations.cache import ChunkCache, read_activation_file
from sfcd.errors import InputError


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunk_cache_round_trip(tmp_path, dtype):
    # catches: bf16 bits stored or viewed wrong, chunks read with the wrong shape
    chunks = [torch.randn(64, 6) for _ in range(3)]
    cache = ChunkCache(tmp_path / "c", 6, 64, {"step": 4}, dtype)
    for c, x in enumerate(chunks):
        cache.write(c, x)
    again = ChunkCache(tmp_path / "c", 6, 64, {"step": 4}, dtype)
    assert again.chunks() == [0, 1, 2]
    for c, x in enumerate(chunks):
        got = again.read(c, torch.device("cpu"))
        assert got.dtype == getattr(torch, dtype)
        torch.testing.assert_close(got, x.to(getattr(torch, dtype)), atol=0, rtol=0)


def test_chunk_cache_with_other_settings_is_rebuilt(tmp_path):
    # catches: a cache of another stream (other seed) silently reused
    ChunkCache(tmp_path / "c", 6, 64, {"seed": 0}).write(0, torch.randn(64, 6))
    assert ChunkCache(tmp_path / "c", 6, 64, {"seed": 0}).has(0)
    assert not ChunkCache(tmp_path / "c", 6, 64, {"seed": 1}).has(0)


def test_chunk_cache_rejects_wrong_width(tmp_path):
    with pytest.raises(InputError, match=r"expected \[64, 6\]"):
        ChunkCache(tmp_path / "c", 6, 64, {}).write(0, torch.randn(64, 5))


def test_plain_activation_files(tmp_path):
    a = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    save_file({"activations": a}, str(tmp_path / "a.safetensors"))
    save_file({"x": a.astype(np.float16)}, str(tmp_path / "h.safetensors"))
    save_torch({"x": torch.from_numpy(a).bfloat16()}, str(tmp_path / "b.safetensors"))
    np.testing.assert_array_equal(read_activation_file(tmp_path / "a.npy"), a)
    st = read_activation_file(tmp_path / "a.safetensors")
    assert isinstance(st, np.memmap)  # mapped, not read into memory
    np.testing.assert_array_equal(st, a)
    np.testing.assert_array_equal(read_activation_file(tmp_path / "h.safetensors"), a.astype(np.float16))
    bf = read_activation_file(tmp_path / "b.safetensors")
    np.testing.assert_array_equal(bf[5:9], torch.from_numpy(a[5:9]).bfloat16().float().numpy())
    np.save(tmp_path / "rank3.npy", a.reshape(4, 10, 8))
    with pytest.raises(InputError, match=r"rank 3\); expected \[N, d\]"):
        read_activation_file(tmp_path / "rank3.npy")
    np.save(tmp_path / "ints.npy", (a * 10).astype(np.int64))
    with pytest.raises(InputError, match="dtype int64; expected a float dtype"):
        read_activation_file(tmp_path / "ints.npy")
    save_file({"a": a, "b": a}, str(tmp_path / "two.safetensors"))
    with pytest.raises(InputError, match="expected one, or one named 'activations'"):
        read_activation_file(tmp_path / "two.safetensors")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(InputError, match="expected .npy or .safetensors"):
        read_activation_file(tmp_path / "a.csv")
