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


def _made_where(src):
    """Wraps ``src.chunk`` to record (chunk, thread name) of every chunk made."""
    import threading

    made, inner = [], src.chunk

    def chunk(c):
        made.append((c, threading.current_thread().name))
        return inner(c)

    src.chunk = chunk
    return made


def test_prefetch_gives_the_same_batches_made_ahead_on_another_thread_and_holds_two_chunks(micro):
    # catches: a prefetched chunk that is not the next one (or is made again in place), a prefetch past the
    # run's last step, a resume (start mid-chunk) that reads another chunk than the plain stream, a stream that
    # keeps more than the current and the next chunk
    plain = StreamBatches(source(micro, ["resid.0"]), 256, seed=0, start=6)
    src = source(micro, ["resid.0"])
    made = _made_where(src)
    ahead = StreamBatches(src, 256, seed=0, start=6, prefetch=True, stop=20)
    held = []
    try:
        for step in range(6, 20):
            a, b = plain.batch(step), ahead.batch(step)
            assert torch.equal(a["resid.0"], b["resid.0"]), step
            pending = ahead._next[1].result()[0] if ahead._next else {}
            held.append(sum(t.numel() for d in (ahead._chunk[1], pending) for t in d.values()))
    finally:
        ahead.close()
    # chunk 1 (step 6) is made in place, then each next one ahead on the prefetch thread, and none past step 19
    assert [c for c, _ in made] == [1, 2, 3, 4]
    assert made[0][1] == "MainThread" and all(t.startswith("sfcd-prefetch") for _, t in made[1:])
    assert max(held) == 2 * ROWS * 32 and held[-1] == ROWS * 32  # the last chunk prefetches nothing


def test_a_prefetch_error_is_raised_at_the_step_that_needs_its_chunk(micro):
    # catches: an error on the prefetch thread that is lost (training would hang or read a missing chunk) or
    # raised before its chunk is needed
    src = source(micro, ["resid.0"])
    inner = src.chunk

    def chunk(c):
        if c == 2:
            raise InputError("chunk 2 is unreadable")
        return inner(c)

    src.chunk = chunk
    batches = StreamBatches(src, 256, seed=0, prefetch=True)
    try:
        for step in range(8):  # chunks 0 and 1 (chunk 2 fails meanwhile on the prefetch thread)
            batches.batch(step)
        with pytest.raises(InputError, match="chunk 2 is unreadable"):
            batches.batch(8)
    finally:
        batches.close()


def test_a_prefetch_and_fresh_rows_never_run_the_model_at_the_same_time(micro):
    # catches: a source without its lock: the prefetch thread's forward and a resampling criterion's fresh rows
    # on the training thread would run the model at once, each one's hooks catching the other's activations
    import threading
    import time

    model = micro[0]
    spans, block = [], model.gpt_neox.layers[0]

    def slow(module, args):
        start = time.monotonic()
        if threading.current_thread().name.startswith("sfcd-prefetch"):
            time.sleep(0.05)  # the prefetch is mid-forward when the training thread asks for fresh rows
        spans.append((start, time.monotonic()))

    handle = block.register_forward_pre_hook(slow)
    try:
        src = source(micro, ["resid.0"])
        batches = StreamBatches(src, 256, seed=0, prefetch=True)
        batches.batch(0)  # chunk 0 here, chunk 1 starts on the prefetch thread
        fresh = torch.cat([b["resid.0"] for b in src.fresh(300, draw=1)])
        batches.close()
    finally:
        handle.remove()
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    expect = torch.cat([b["resid.0"] for b in source(micro, ["resid.0"]).fresh(300, draw=1)])
    assert torch.equal(fresh, expect)


def test_training_with_prefetch_resumes_to_the_run_without_it(micro, tmp_path):
    # catches: sae.prefetch not reaching the stream, or a prefetching run whose batches differ from the plain
    # one's (across chunk boundaries and a resume mid-chunk)
    ref = fit(micro, ["resid.0"], tmp_path / "ref", overrides=["sae.prefetch=false"])
    assert not ref.stream.prefetch
    with pytest.raises(Crash):
        fit(micro, ["resid.0"], tmp_path / "r", [CrashAt(13)], overrides=["sae.prefetch=true"])
    resumed = fit(micro, ["resid.0"], tmp_path / "r", overrides=["sae.prefetch=true"])
    # closed after training: no thread, and no chunk kept (Lightning keeps the loader through evaluation)
    assert resumed.stream.prefetch and resumed.stream._pool is None and resumed.stream._chunk is None
    same(resumed.saes[0], ref.saes[0])


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_run_makes_no_chunk_past_its_last_step(micro, tmp_path, prefetch):
    # catches: the stream still yielding after the last step (Lightning's loader fetches one batch ahead, so a
    # run ending on a chunk boundary harvested a whole chunk it never used), or a prefetch past the end
    cfg = compose(["sae.batch_size=256", "sae.expansion=2", "sae.k=4", f"sae.prefetch={str(prefetch).lower()}"])
    module = SAEModule(make_specs(cfg.sae, {"resid.0": 32}), cfg.sae, 24)  # 6 chunks of 4 steps
    src = source(micro, ["resid.0"])
    made = _made_where(src)
    train_module(module, cfg.trainer, tmp_path, src)
    assert sorted(c for c, _ in made) == [0, 1, 2, 3, 4, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prefetch_on_a_gpu_gives_the_plain_streams_batches(micro):
    # catches (on a GPU): a chunk read before its stream's event, a device without an index, memory freed early
    model, tokens = micro
    model.to("cuda")
    try:
        plain = StreamBatches(source(micro, ["resid.0"]), 256, seed=0)
        ahead = StreamBatches(source(micro, ["resid.0"]).to(torch.device("cuda")), 256, seed=0, prefetch=True)
        plain.source.to(torch.device("cuda"))
        for step in range(20):
            torch.testing.assert_close(ahead.batch(step)["resid.0"], plain.batch(step)["resid.0"], rtol=0, atol=0)
        ahead.close()
    finally:
        model.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_chunks_permutation_reaches_the_gpu_without_a_host_sync():
    # catches (on a GPU): the permutation copied from pageable memory (torch's copy then waits for the device's
    # queue, which its sync debug mode reports), once per chunk inside training
    from sfcd.activations.stream import to_device_async

    perm = torch.randperm(1 << 18, generator=torch.Generator().manual_seed(0))
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = to_device_async(perm, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), perm)


def test_prefetch_settings_and_their_memory(micro):
    # catches: auto prefetching on the CPU (the harvest would take the SAE steps' cores), a typo accepted, and
    # a buffer check that counts one chunk where prefetch holds two
    from sfcd.activations.stream import prefetch_on
    from sfcd.devices import available_bytes

    assert not prefetch_on("auto", torch.device("cpu")) and prefetch_on("auto", torch.device("cuda"))
    assert prefetch_on(True, torch.device("cpu")) and not prefetch_on("false", torch.device("cuda"))
    with pytest.raises(InputError, match="sae.prefetch='sometimes'"):
        prefetch_on("sometimes", torch.device("cpu"))
    rows = int(0.5 * available_bytes(torch.device("cpu")) / (512 * 4))  # one chunk: half of what is free
    check_buffer_fits(rows, {"resid.0": 512}, torch.float32, torch.device("cpu"))
    with pytest.raises(InputError, match="sae.prefetch=false"):
        check_buffer_fits(rows, {"resid.0": 512}, torch.float32, torch.device("cpu"), chunks=2)


def test_harvest_autocast_runs_the_forward_in_the_fast_dtype(micro, monkeypatch):
    # catches: the setting not reaching the forward (bf16 chunks equal to float32 ones), autocast's output left
    # unconverted (a bf16 buffer where float32 was asked), auto choosing autocast on the CPU or ignoring the
    # checkpoint's stored dtype on a GPU, a typo accepted
    from sfcd.activations.harvest import harvest_autocast

    model, tokens = micro
    sites = [parse_site("mlp.1", model)]
    plain = source(micro, ["mlp.1"]).chunk(1)["mlp.1"]
    fast = HarvestSource(model, tokens, sites, {"mlp.1": 32}, 16, ROWS, 0, {0}, 8, autocast=torch.bfloat16)
    got = fast.chunk(1)["mlp.1"]
    assert got.dtype == torch.float32 and not torch.equal(got, plain)
    # bf16 rounds each matmul's inputs (8 bits of mantissa): within a few percent of the float32 activations
    assert (got - plain).norm() / plain.norm() < 0.03
    assert harvest_autocast("auto", model) is None  # the CPU
    assert harvest_autocast("none", model) is None and harvest_autocast("float16", model) is torch.float16
    with pytest.raises(ConfigError, match="sae.harvest_autocast='fp8'"):
        harvest_autocast("fp8", model)

    class OnGPU(torch.nn.Module):  # a float32 model as it sits on a GPU, loaded from a float16 checkpoint
        def __init__(self, stored, dtype=torch.float32):
            super().__init__()
            self.sfcd_source = {"stored_dtype": stored}
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

        def parameters(self, recurse=True):
            p = self.w
            yield type("P", (), {"device": torch.device("cuda"), "dtype": p.dtype})()

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert harvest_autocast("auto", OnGPU("float16")) is torch.float16
    assert harvest_autocast("auto", OnGPU("float32")) is torch.bfloat16
    assert harvest_autocast("auto", OnGPU("float16", torch.bfloat16)) is None  # already 16-bit
    # none: the model's own dtype also where the caller runs under autocast (fresh rows, made inside Lightning's
    # bf16-mixed training step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = source(micro, ["mlp.1"]).chunk(1)["mlp.1"]
    assert torch.equal(inside, plain)
