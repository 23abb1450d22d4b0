import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sfcd.activations.buffer import mixing_buffer
from sfcd.activations.cache import cache_complete, read_activation_file, read_cache, write_cache
from sfcd.errors import InputError


def test_cache_round_trip_across_shards(tmp_path):
    chunks = [torch.randn(n, 6) for n in (100, 37, 250)]
    from sfcd.activations.cache import CacheWriter

    w = CacheWriter(tmp_path / "c", 6, {"site": "resid.0", "step": 4}, shard_rows=128)
    for c in chunks:
        w.append(c)
    assert not cache_complete(tmp_path / "c")  # no manifest until closed
    m = w.close()
    assert m["count"] == 387 and m["d"] == 6 and m["site"] == "resid.0" and len(m["shards"]) == 4
    np.testing.assert_array_equal(read_cache(tmp_path / "c"), torch.cat(chunks).numpy())


def test_cache_writer_rejects_wrong_width(tmp_path):
    with pytest.raises(InputError, match=r"expected \[n, 6\]"):
        write_cache(tmp_path / "c", [torch.randn(3, 5)], 6, {})


def test_mixing_buffer_serves_every_row_once_mixed():
    chunks = [torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None].repeat(1, 3) for i in range(10)]
    batches = list(mixing_buffer(chunks, buffer_size=300, batch_size=50, seed=0))
    rows = torch.cat(batches)[:, 0]
    assert len(batches) == 20 and sorted(rows.tolist()) == list(range(1000))
    # the first batch mixes rows from several chunks and is not in order
    first = batches[0][:, 0]
    assert len({int(v) // 100 for v in first}) >= 2 and not torch.equal(first, first.sort().values)
    assert [b.tolist() for b in mixing_buffer(chunks, 300, 50, seed=0)] == [b.tolist() for b in batches]


def test_plain_activation_files(tmp_path):
    a = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    save_file({"activations": a}, str(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(read_activation_file(tmp_path / "a.npy"), a)
    np.testing.assert_array_equal(read_activation_file(tmp_path / "a.safetensors"), a)
    np.save(tmp_path / "rank3.npy", a.reshape(4, 10, 8))
    with pytest.raises(InputError, match=r"rank 3\); expected \[N, d\]"):
        read_activation_file(tmp_path / "rank3.npy")
    np.save(tmp_path / "ints.npy", (a * 10).astype(np.int64))
    with pytest.raises(InputError, match="dtype int64; expected a float dtype"):
        read_activation_file(tmp_path / "ints.npy")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(InputError, match="expected .npy or .safetensors"):
        read_activation_file(tmp_path / "a.csv")
