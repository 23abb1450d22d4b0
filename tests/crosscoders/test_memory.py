"""Crosscoders at the real shape: the memory plan against measured tensors and hand-computed numbers, the
stage's decision (together / one group after another / refused), the joined stream's peak, k_aux from one
checkpoint's width, and the streamed evaluation against the all-at-once one, at K >= 10 on small widths."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from sfcd.activations.stream import ArraySource, ChunkSource, ConcatSource
from sfcd.crosscoders.memory import PlanInputs, fmt_bytes, memory_plan, refusal, schedule_sites
from sfcd.crosscoders.model import BatchTopKCrosscoder
from sfcd.crosscoders.reading import Accumulator
from sfcd.errors import InputError


def _bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def test_plan_equals_the_measured_tensors_of_a_crosscoder_its_adam_state_and_its_stream_at_k10():
    """Independent count: the bytes of a real K = 10 crosscoder's parameters and buffers, its gradients and the
    Adam state after one step of the stage's own optimizer, and the chunks of the stage's joined stream. Bugs
    caught: weights counted at d instead of K x d, Adam's two moments or the gradients left out, the joined
    copy counted once per checkpoint or not at all."""
    from sfcd.config import compose
    from sfcd.crosscoders.stage import CrosscoderSpec, _loop_cfg
    from sfcd.sae.train import SAEModule

    K, d, m, rows, B = 10, 8, 48, 512, 128
    cfg = compose(["experiment=test", "crosscoder.batch_size=128"])
    spec = CrosscoderSpec("s", "s", "batchtopk", K * d, m, 1e-3, 0, {"n_blocks": K, "k": 4, "dead_tokens": 0})
    module = SAEModule([spec], _loop_cfg(cfg), 10)
    opt = module.configure_optimizers()["optimizer"]
    cc = module.saes[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, K * d, generator=g)
    cc.training_loss(x, 0.5)["loss"].backward()
    opt.step()
    states = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    arrays = [np.random.default_rng(j).standard_normal((rows * 2, d)).astype(np.float32) for j in range(K)]
    sources = [ArraySource({"s": a}, rows, seed=0, dtype="bfloat16") for a in arrays]
    joined = ConcatSource(sources).chunk(0)["s"]

    plan = memory_plan(K, [d], [m], rows, torch.bfloat16, B)
    assert plan["weights"] == _bytes([*cc.parameters(), *cc.buffers()])
    assert plan["grads"] == _bytes(p.grad for p in cc.parameters())
    assert len(states) == 8 and plan["adam"] == _bytes(states)
    # what Lightning's AsyncCheckpointIO copies at a save: the module's state and the optimizer's moments
    from lightning.pytorch.plugins.io.async_plugin import _clone_tensor
    from lightning_utilities.core.apply_func import apply_to_collection

    snap = apply_to_collection({"m": module.state_dict(), "o": states}, torch.Tensor, _clone_tensor)
    assert plan["save_snapshot"] == _bytes([*snap["m"].values(), *snap["o"]])
    assert plan["joined"] == _bytes([joined])
    assert plan["model_chunk"] == _bytes([sources[0].chunk(0)["s"]])


def test_plan_of_two_sites_by_hand():
    """Hand-computed: K = 3, sites of d = 4 and 6, 2 latents per input dim (m = 8, 12), 16 buffer rows in
    bfloat16, batch 4, float32 parameters, Adam, bf16 autocast, 1,000 bytes of model per checkpoint."""
    p = memory_plan(3, [4, 6], [8, 12], 16, torch.bfloat16, 4, torch.float32, 2, torch.bfloat16, 3000)
    # params: site 1: 2*12*8 + 8 + 12 = 212; site 2: 2*18*12 + 12 + 18 = 462 -> 674 x 4 bytes = 2696
    # buffers: scale and block means 2*4*12 + counters 8*8 + threshold 4 = 164; 2*4*18 + 8*12 + 4 = 244 -> 408
    assert p == {
        "models": 3000,
        "model_chunk": 16 * 10 * 2,  # one checkpoint: 16 rows x (4 + 6) dims x 2 bytes
        "joined": 16 * 30 * 2,
        "shuffle_index": 16 * 8,
        "weights": 2696 + 408,
        "grads": 2696,
        "adam": 2 * 2696,
        "save_snapshot": 2696 + 408 - 4 * 3 * (4 + 6) + 2 * 2696,  # the block means are not saved
        "autocast": (2 * 12 * 8 + 2 * 18 * 12) * 2,
        "batch": 4 * 4 * (3 * 10 + max(3 * 12 + 3 * 8, 3 * 18 + 3 * 12)),  # inputs + the larger site's work
    }


def _inputs(**kw) -> PlanInputs:
    base = {"K": 12, "expansion": 4, "rows": 4096, "batch_size": 256, "buffer_dtype": torch.float32}
    return PlanInputs(**{**base, **kw})


def _need(p: PlanInputs, dims) -> int:
    return sum(p.parts(dims).values())


def test_schedule_together_one_after_another_or_refused():
    """The decision on a fake free memory: all sites at once when they fit, groups of as many as fit when not
    (in order, each group within the limit), and a one-line refusal when one site alone does not fit. Bugs
    caught: a limit compared with one site's plan for the whole group, or groups that overflow."""
    sites = {"resid.0": 16, "resid.1": 16, "resid.2": 16}
    p = _inputs()
    one, two, three = _need(p, [16]), _need(p, [16, 16]), _need(p, [16, 16, 16])
    assert one < two < three
    s = schedule_sites(sites, p, three)
    assert s.groups == [list(sites)] and s.together
    s = schedule_sites(sites, p, two)
    assert s.groups == [["resid.0", "resid.1"], ["resid.2"]] and not s.together
    s = schedule_sites(sites, p, one)
    assert s.groups == [["resid.0"], ["resid.1"], ["resid.2"]]
    assert all(sum(plan.values()) <= one for plan in s.plans)
    with pytest.raises(InputError) as e:
        schedule_sites(sites, p, one - 1, "crosscoder.memory_limit allows")
    msg = str(e.value)
    assert "\n" not in msg and "resid.0" in msg and "K=12" in msg and "crosscoder.memory_limit allows" in msg


def test_refusal_names_settings_that_fit_and_are_the_largest_that_do():
    """Each change the line proposes, applied alone, fits; one step further does not (so it is the best single
    change). Bug caught: a suggestion computed against another limit, or off by one step."""
    import re

    p = _inputs(expansion=32, model_bytes_each=10_000)
    limit = _need(p, [16]) * 9 // 10
    msg = refusal("resid.3", 16, p, limit)
    rows = int(re.search(r"crosscoder.buffer_tokens=(\d+)", msg)[1])
    exp = int(re.search(r"crosscoder.expansion=(\d+)", msg)[1])
    k = int(re.search(r"at most (\d+) checkpoints", msg)[1])
    from dataclasses import replace

    assert _need(replace(p, rows=rows), [16]) <= limit < _need(replace(p, rows=rows + p.batch_size), [16])
    assert _need(replace(p, expansion=exp), [16]) <= limit < _need(replace(p, expansion=exp + 1), [16])
    assert _need(replace(p, K=k), [16]) <= limit < _need(replace(p, K=k + 1), [16])
    assert ("sae.buffer_dtype=bfloat16" in msg) == (_need(replace(p, buffer_dtype=torch.bfloat16), [16]) <= limit)
    assert f"more than the {fmt_bytes(limit)}" in msg


class _Counted(ChunkSource):
    """A source whose chunks are counted while alive (to see how many the joined stream holds at once)."""

    alive = 0
    peak = 0

    def __init__(self, j: int, rows: int, d: int):
        self.j, self.chunk_rows, self.names, self.dims = j, rows, ["s"], {"s": d}
        self.device = torch.device("cpu")

    def chunk(self, c: int) -> dict[str, torch.Tensor]:
        t = torch.full((self.chunk_rows, self.dims["s"]), float(100 * c + self.j))
        _Counted.alive += 1
        _Counted.peak = max(_Counted.peak, _Counted.alive)
        weakref.finalize(t, lambda: setattr(_Counted, "alive", _Counted.alive - 1))
        return {"s": t}


def test_joined_stream_holds_one_checkpoint_chunk_at_a_time():
    """Bug caught: all K checkpoints' chunks alive while they are joined (the K-chunks-plus-joined-copy peak the
    plan does not count); the joined chunk is still every checkpoint's block in order."""
    K, rows, d = 10, 64, 3
    _Counted.alive = _Counted.peak = 0
    out = ConcatSource([_Counted(j, rows, d) for j in range(K)]).chunk(2)["s"]
    assert _Counted.peak == 1
    want = torch.cat([torch.full((rows, d), float(200 + j)) for j in range(K)], dim=1)
    assert torch.equal(out, want)


def test_k_aux_is_half_of_one_checkpoints_width():
    """Bug caught: AuxK with k_aux = K x d / 2 (the SAE default on the joined input). Every latent dead, the aux
    loss by hand with the top d/2 dead latents: with K x d / 2 of them it would differ."""
    K, d, m, B = 10, 6, 64, 32
    cc = BatchTopKCrosscoder(K * d, m, seed=0, n_blocks=K, k=2, dead_tokens=0)
    assert cc.hparams["k_aux"] == d // 2
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(K * d, m, generator=g) * 0.3)
        cc.tokens_since_fired.fill_(10)
    x = torch.randn(B, K * d, generator=g)
    x_hat = torch.randn(B, K * d, generator=g)  # any main reconstruction: AuxK fits its error
    pre = x @ cc.W_enc + cc.b_enc
    got = cc.aux_loss(x, x, x_hat, pre, sparse=True)
    with torch.no_grad():
        idx = pre.topk(d // 2, dim=-1).indices  # 64 dead >= k_aux: the scale min(n_dead / k_aux, 1) is 1
        e_hat = torch.zeros(B, m).scatter(1, idx, torch.relu(pre.gather(1, idx))) @ cc.W_dec
        want = (e_hat - (x - x_hat)).pow(2).sum(-1).mean()
    assert torch.allclose(got, want, rtol=1e-4)


def test_streamed_evaluation_equals_the_all_at_once_one_at_k12():
    """FVE per checkpoint, each block alone, Latent Scaling and densities summed over uneven chunks equal the
    computation over all tokens at once (the block alone through the SAE evaluation of the saved per-checkpoint
    SAE; Latent Scaling by least squares in numpy). Bugs caught: a sum reset per chunk, a mean of per-chunk FVEs,
    the alone FVE reading another block."""
    from sfcd.crosscoders.io import checkpoint_sae
    from sfcd.sae import evaluate as E

    K, d, m, n = 12, 5, 24, 3000
    g = torch.Generator().manual_seed(0)
    cc = BatchTopKCrosscoder(K * d, m, seed=0, n_blocks=K, k=3).double()
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(K * d, m, generator=g, dtype=torch.float64) * 0.3)
        cc.W_dec.view(m, K, d).mul_(torch.rand(m, K, 1, generator=g, dtype=torch.float64) * 3)
        cc.b_enc.copy_(torch.randn(m, generator=g, dtype=torch.float64) * 0.2 - 0.3)
        cc.b_dec.copy_(torch.randn(K * d, generator=g, dtype=torch.float64) * 0.1)
        cc.scale.copy_((torch.rand(K, generator=g, dtype=torch.float64) + 0.5).repeat_interleave(d))
        cc.threshold.fill_(0.2)
    cc = cc.float()
    x = torch.randn(n, K * d, generator=g) + torch.randn(K * d, generator=g)
    with torch.no_grad():  # the checkpoint-alone views' means (any values: the same ones on both sides)
        cc.block_mean.copy_(x.mean(0) + 0.1)
    acc = Accumulator(cc)
    for piece in torch.split(x, [1, 999, 700, 1300]):
        acc.add(piece)
    assert acc.n == n
    cc.requires_grad_(False)  # all at once
    xs = (x * cc.scale).double()
    f = cc.activation(x * cc.scale @ cc.W_enc + cc.b_enc).double()
    err = (xs - (f @ cc.W_dec.double() + cc.b_dec.double())).view(n, K, d)
    xb = xs.view(n, K, d)
    total = (xb - xb.mean(0)).pow(2).sum((0, 2))
    assert np.allclose(acc.fve(), (1 - err.pow(2).sum((0, 2)) / total).numpy(), atol=1e-5)
    for k in range(K):
        solo, fired = E.reconstruction_metrics(checkpoint_sae(cc, k), x[:, k * d : (k + 1) * d])
        assert acc.fve_alone()[k] == pytest.approx(solo["fve"], abs=1e-4)
    assert torch.equal(acc.fired, (f > 0).sum(0))
    beta = acc.latent_scaling()["beta"]
    W = cc.W_dec.double().view(m, K, d)
    fired_any = (f > 0).any(0)
    assert fired_any.sum() > m // 2
    for i in torch.nonzero(fired_any).flatten().tolist():
        di = W[i, W[i].norm(dim=1).argmax()]
        for k in range(K):
            target = (err[:, k] + f[:, i : i + 1] * W[i, k]).numpy().ravel()
            design = (f[:, i : i + 1] * di).numpy().ravel()
            want = np.linalg.lstsq(design[:, None], target, rcond=None)[0][0]
            assert beta[i, k].item() == pytest.approx(want, rel=1e-3, abs=1e-4)
    assert torch.isnan(beta[~fired_any]).all()


def test_eval_blocks_are_the_k_checkpoints_on_the_same_tokens_in_bounded_blocks(test_run):
    """The streamed evaluation input equals the all-at-once harvest of each checkpoint concatenated (the former
    ``[eval_tokens, K x d]`` tensor), in blocks of one harvest batch, ``n`` rows in all."""
    from sfcd.activations.harvest import harvest_rows, token_windows
    from sfcd.crosscoders.stage import _eval_blocks
    from sfcd.data.tokens import read_tokens
    from sfcd.models.loading import load_model
    from sfcd.models.sites import parse_site
    from sfcd.paths import RunDir

    run = RunDir(test_run.run_dir)
    models = [load_model(test_run.run_dir, s) for s in (8, 16, 24)]
    site = parse_site("resid.1")
    d = models[0].config.hidden_size
    windows = token_windows(read_tokens(run.tokens("val")), 32, 20)
    n, batch = 450, 4  # not a sum of whole blocks: the last one is cut
    blocks = list(_eval_blocks(models, site, windows, n, {0}, batch))
    assert max(len(b) for b in blocks) <= batch * 32 and sum(len(b) for b in blocks) == n
    whole = torch.cat(
        [
            harvest_rows(
                m, (windows[b : b + batch] for b in range(0, len(windows), batch)), [site], {site.name: d}, n, {0}
            )[site.name]
            for m in models
        ],
        dim=1,
    )
    assert torch.equal(torch.cat(blocks), whole)


def test_crosscoder_that_cannot_fit_is_refused_in_one_line_before_anything_changes(own_run):
    """Bad input: a memory limit below what one site needs. One line naming what would fit; the run's earlier
    crosscoder circuits and training state are untouched, no training state is made."""
    from pathlib import Path

    from sfcd.config import compose
    from sfcd.crosscoders.stage import train_crosscoders

    root = Path(own_run.run_dir) / "crosscoders"
    keep = root / "circuits" / "keep.txt"
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("earlier circuits")
    had_train = (root / ".train").exists()
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={own_run.run_dir}",
            "crosscoder.sites=[resid.0,resid.1]",
            "crosscoder.steps=[8,16,24]",
            "crosscoder.memory_limit=0.0072",  # ~7.4 MiB: one site needs ~8 MiB,
        ]
    )
    try:
        with pytest.raises(
            InputError, match="needs .* more than the .* crosscoder.memory_limit allows; would fit with "
        ) as e:
            train_crosscoders(cfg)
        assert "\n" not in str(e.value) and "memory_limit" in str(e.value)
        assert keep.read_text() == "earlier circuits"
        assert (root / ".train").exists() == had_train
    finally:
        keep.unlink(missing_ok=True)


def _stage_cfg(run_dir, *extra):
    from sfcd.config import compose

    return compose(
        [
            "experiment=test",
            f"run_dir={run_dir}",
            "crosscoder.sites=[resid.0,resid.1]",
            "crosscoder.steps=[8,16,24]",
            "crosscoder.n_tokens=2048",
            "crosscoder.buffer_tokens=2048",
            "crosscoder.eval_tokens=256",
            "crosscoder.ce_tokens=64",
            *extra,
        ]
    )


def test_stage_decides_together_or_one_after_another_from_the_memory_limit(test_run):
    """With the K models of the test run: a limit above both sites' plan trains them together, one between one
    site's and both sites' plans one after another. The limit is what crosscoder.memory_limit says, in GiB."""
    from sfcd.crosscoders.stage import plan_training
    from sfcd.models.loading import load_model

    models = [load_model(test_run.run_dir, s) for s in (8, 16, 24)]
    d = models[0].config.hidden_size
    dims = {"resid.0": d, "resid.1": d}
    probe = plan_training(_stage_cfg(test_run.run_dir, "crosscoder.memory_limit=1000"), 2048, 3, dims, models, "cpu")
    both = sum(probe.plans[0].values())
    model_bytes = sum(p.numel() * p.element_size() for m in models for p in (*m.parameters(), *m.buffers()))
    assert probe.plans[0]["models"] == model_bytes  # the K models, measured
    per_site = ("weights", "grads", "adam", "save_snapshot", "model_chunk", "joined")
    one = both - sum(probe.plans[0][k] for k in per_site) // 2
    for limit, groups in ((both, [["resid.0", "resid.1"]]), (one, [["resid.0"], ["resid.1"]])):
        cfg = _stage_cfg(test_run.run_dir, f"crosscoder.memory_limit={limit / 2**30!r}")
        assert plan_training(cfg, 2048, 3, dims, models, "cpu").groups == groups


def test_sites_that_do_not_fit_together_train_one_after_another(test_run, tmp_path, caplog):
    """End to end in a copy of the test run: a limit that holds one site's crosscoder but not two trains resid.0,
    then resid.1, each complete and loadable, and leaves no training state."""
    import shutil
    from pathlib import Path

    from sfcd.crosscoders.io import load_crosscoder
    from sfcd.crosscoders.stage import plan_training, train_crosscoders
    from sfcd.models.loading import load_model

    run = tmp_path / "run"
    for part in ("corpus", "model"):
        shutil.copytree(Path(test_run.run_dir) / part, run / part)
    models = [load_model(run, s) for s in (8, 16, 24)]
    d = models[0].config.hidden_size
    probe = plan_training(_stage_cfg(run, "crosscoder.memory_limit=1000"), 2048, 3, {"resid.0": d}, models, "cpu")
    one = sum(probe.plans[0].values())
    with caplog.at_level("INFO", logger="sfcd.crosscoders.stage"):
        train_crosscoders(_stage_cfg(run, f"crosscoder.memory_limit={one * 1.2 / 2**30!r}"))
    assert "training them in 2 groups, one after another" in caplog.text
    for site in ("resid.0", "resid.1"):
        cc = load_crosscoder(run / "crosscoders" / site)
        assert cc.cfg["site"] == site and cc.n_blocks == 3
        assert (run / "crosscoders" / site / "metrics.json").exists()
    assert not (run / "crosscoders" / ".train").exists()
