"""Streaming activations: chunks are a function of (seed, chunk), so resume and many-vs-alone hold across chunk
boundaries; the cache replaces the forward pass; memory is one chunk; bad settings fail clearly."""

import itertools

import numpy as np
import pytest
import torch

from sfcd.activations.stream import ArraySource, HarvestSource, StreamBatches, check_buffer_fits
from sfcd.config import compose
from sfcd.data.tokens import read_tokens
from sfcd.errors import ConfigError, InputError
from sfcd.models.loading import load_model
from sfcd.models.sites import parse_site, run_with_cache, site_dim
from sfcd.paths import RunDir
from sfcd.sae.train import SAEModule, make_specs, train_module

from ..crash import Crash, CrashAt

ROWS = 1024  # one chunk: 4 steps of 256, so a 24-step run crosses 5 chunk boundaries


@pytest.fixture(scope="module")
def micro(test_run):
    model = load_model(test_run.run_dir)
    tokens = read_tokens(RunDir(test_run.run_dir).tokens("train"))
    return model, tokens


def source(micro, names, cache_dir=None, dtype="float32", seed=0):
    model, tokens = micro
    sites = [parse_site(n, model) for n in names]
    dims = {s.name: site_dim(model, s) for s in sites}
    return HarvestSource(model, tokens, sites, dims, 16, ROWS, seed, {0}, 8, dtype, cache_dir, {"t": 1})


def fit(micro, names, tmp_path, callbacks=None, overrides=()):
    cfg = compose(["sae.batch_size=256", "sae.expansion=2", "sae.k=4", "sae.checkpoint_every=5", *overrides])
    model, _ = micro
    dims = {n: site_dim(model, parse_site(n, model)) for n in names}
    module = SAEModule(make_specs(cfg.sae, dims), cfg.sae, 24)
    return train_module(module, cfg.trainer, tmp_path, source(micro, names), callbacks)


def same(a, b):
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)


def test_chunks_are_whole_windows_of_the_model_without_excluded_tokens(micro):
    # catches: rows misaligned between sites, excluded tokens kept, a short chunk, chunks depending on the sites
    model, tokens = micro
    src = source(micro, ["resid.0", "mlp.1"])
    ch = src.chunk(3)
    assert ch["resid.0"].shape == (ROWS, 32) and ch["mlp.1"].shape == (ROWS, 32)
    windows = np.concatenate(list(itertools.islice(src._windows(3), 12)))
    x = torch.from_numpy(windows)
    acts = run_with_cache(model, x, [parse_site("resid.0"), parse_site("mlp.1")])
    keep = (x != 0).flatten()
    for name in ("resid.0", "mlp.1"):
        expect = acts[name].flatten(0, 1)[keep][:ROWS]
        torch.testing.assert_close(ch[name], expect)
    from sfcd.activations.harvest import harvest  # an [n, T] array is batched the same way as an iterable

    sites = [parse_site("resid.0"), parse_site("mlp.1")]
    got = list(harvest(model, windows, sites, batch_size=5, exclude_ids={0}))
    assert len(got) == 20  # 96 windows in batches of 5
    torch.testing.assert_close(torch.cat([g["mlp.1"] for g in got])[:ROWS], ch["mlp.1"])
    torch.testing.assert_close(source(micro, ["resid.0"]).chunk(3)["resid.0"], ch["resid.0"])
    assert not torch.equal(src.chunk(2)["resid.0"], ch["resid.0"])


def test_streaming_resume_equals_the_uninterrupted_run(micro, tmp_path):
    # catches: a resumed run that restarts the chunk sequence or the shuffle instead of continuing step 13
    ref = fit(micro, ["resid.0"], tmp_path / "ref")
    with pytest.raises(Crash):
        fit(micro, ["resid.0"], tmp_path / "r", [CrashAt(13)])
    resumed = fit(micro, ["resid.0"], tmp_path / "r")
    same(resumed.saes[0], ref.saes[0])


def test_many_saes_from_one_stream_equal_each_alone(micro, tmp_path):
    # catches: batches that depend on which sites share the stream (e.g. harvesting stopping at another layer)
    many = fit(micro, ["resid.0", "mlp.1"], tmp_path / "m")
    alone = fit(micro, ["mlp.1"], tmp_path / "a")
    same(many.saes[1], alone.saes[0])


def test_the_cache_replaces_the_forward_pass(micro, tmp_path):
    # catches: a cache that is written but not read, or read back different from what was harvested
    first = source(micro, ["resid.0", "mlp.1"], tmp_path / "cache")
    chunks = [first.chunk(c) for c in range(3)]
    model = micro[0]

    def boom(*a, **k):
        raise AssertionError("the model ran although the chunk was cached")

    again = source(micro, ["resid.0", "mlp.1"], tmp_path / "cache")
    original, model.forward = model.forward, boom
    try:
        for c in range(3):
            for name in ("resid.0", "mlp.1"):
                assert torch.equal(again.chunk(c)[name], chunks[c][name])
    finally:
        model.forward = original
    bf = source(micro, ["resid.0"], tmp_path / "cache16", dtype="bfloat16")
    torch.testing.assert_close(bf.chunk(1)["resid.0"].float(), chunks[1]["resid.0"], atol=0.05, rtol=0.01)
    assert (tmp_path / "cache16" / "resid.0" / "chunk_000001.bin").stat().st_size == ROWS * 32 * 2


def test_memory_is_one_chunk_whatever_the_number_of_tokens(micro):
    # catches: a stream that accumulates chunks (memory growing with n_tokens)
    src = source(micro, ["resid.0"])
    batches = StreamBatches(src, 256, seed=0)
    held = []
    for step in range(0, 40, 4):  # 10 chunks
        batches.batch(step)
        held.append(sum(t.numel() for t in batches._chunk[1].values()))
    assert set(held) == {ROWS * 32}


def test_array_source_repeats_epochs_with_new_orders():
    # catches: a file read once then silently exhausted, or every epoch in the same order
    a = np.arange(1000, dtype=np.float32)[:, None].repeat(2, 1)
    src = ArraySource({"x": a}, 300, seed=0)  # 3 blocks an epoch, 100 rows of tail
    seen = [src.chunk(c)["x"][:, 0] for c in range(6)]
    epoch1, epoch2 = torch.cat(seen[:3]), torch.cat(seen[3:])
    assert len(set(epoch1.tolist())) == 900 and len(set(epoch2.tolist())) == 900
    assert not torch.equal(epoch1, epoch2)


def test_bad_buffers_fail_clearly(micro):
    with pytest.raises(InputError, match="lower sae.buffer_tokens"):
        check_buffer_fits(10**12, {"resid.0": 512, "mlp.0": 512}, torch.float32, torch.device("cpu"))
    from sfcd.sae.train import buffer_rows

    with pytest.raises(ConfigError, match="less than one batch"):
        buffer_rows(compose(["sae.buffer_tokens=100", "sae.batch_size=256"]).sae, 10)


def test_fresh_samples_are_new_rows_outside_the_training_order_and_never_cached(micro, tmp_path):
    # the sample a resampling criterion reads (relu_reference's density over fresh tokens). Catches: fresh rows
    # that are a training chunk (the criterion would judge features on what they trained on), the same rows at
    # every draw, a draw that differs between calls (ranks would resample differently), rows written to or read
    # from the cache, a sample longer or shorter than asked
    cached = source(micro, ["resid.0"], cache_dir=tmp_path)
    train = [cached.chunk(c)["resid.0"] for c in range(3)]
    files = sorted(p.name for p in (tmp_path / "resid.0").iterdir())
    n = ROWS + 300  # two blocks, the second one short
    a = torch.cat([b["resid.0"] for b in cached.fresh(n, draw=1)])
    assert a.shape == (n, 32)
    assert sorted(p.name for p in (tmp_path / "resid.0").iterdir()) == files
    plain = source(micro, ["resid.0"])
    torch.testing.assert_close(torch.cat([b["resid.0"] for b in plain.fresh(n, draw=1)]), a)
    b = torch.cat([b["resid.0"] for b in plain.fresh(n, draw=2)])
    rows = lambda t: {tuple(r) for r in t.round(decimals=4).tolist()}  # noqa: E731
    seen = set().union(*(rows(t) for t in train))
    assert len(rows(a) & rows(b)) < 0.2 * n  # another draw, other windows (some repeat: a small file)
    assert len(rows(a) & seen) < 0.5 * n
    torch.testing.assert_close(cached.chunk(1)["resid.0"], train[1])  # the training order is untouched
