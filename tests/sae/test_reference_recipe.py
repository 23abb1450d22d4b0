"""`relu_reference` against the one-layer reference's published code (neelnanda-io/1L-Sparse-Autoencoder,
`utils.py` and `train.py`), property by property. The reference's formulas are written out here, in its own
terms (global RNG, `kaiming_uniform_` on whole matrices, its training loop), independently of sfcd's code."""

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from sfcd.activations.stream import ArraySource, StreamBatches
from sfcd.config import compose
from sfcd.sae.relu import ReferenceReLUSAE
from sfcd.sae.train import SAEModule, buffer_rows, make_specs, train_module

from .synthetic import make_data

L1, LR, BETAS = 3e-4, 1e-4, (0.9, 0.99)


def reference_init(d_in, d_sae, seed):
    """The reference's `AutoEncoder.__init__`: `torch.manual_seed(seed)`, W_enc then W_dec by
    `kaiming_uniform_`, decoder rows normalised, biases zero."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        w_enc = torch.nn.init.kaiming_uniform_(torch.empty(d_in, d_sae))
        w_dec = torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_in))
    return {
        "W_enc": w_enc,
        "W_dec": w_dec / w_dec.norm(dim=-1, keepdim=True),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }


def reference_loss(p, x):
    """The reference's `forward`: loss = batch mean of the summed squared error + l1 x sum |acts|."""
    acts = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    x_rec = acts @ p["W_dec"] + p["b_dec"]
    f = torch.promote_types(x.dtype, torch.float32)  # its .float(), kept float64 for the finite differences
    return (x_rec.to(f) - x.to(f)).pow(2).sum(-1).mean(0) + L1 * acts.to(f).abs().sum(), acts


def config(**sae):
    cfg = compose(["experiment=one_layer_reference", *(f"sae.{k}={v}" for k, v in sae.items())]).sae
    cfg.sweep = {}  # one SAE, seed sae.seed
    return cfg


def module_for(cfg, d_in, source=None, steps=10):
    return SAEModule(make_specs(cfg, {"x": d_in}), cfg, steps, source)


def test_initial_weights_are_the_reference_draws_and_distributions():
    # catches: sfcd's own Gaussian init kept, W_enc drawn as W_dec^T, the two draws swapped or given the wrong
    # fan-in (W_enc [d_in, d_sae] has fan-in d_sae), decoder rows not normalised, b_dec at the geometric median
    d_in, d_sae, seed = 64, 512, 49
    cfg = config(seed=seed)
    module = module_for(cfg, d_in)
    x = torch.randn(4096, d_in) * 3 + 5  # a mean far from 0: a median-initialised b_dec would be ~5
    module.initialise({"x": x.numpy()})
    sae = module.saes[0]
    ref = reference_init(d_in, d_sae, seed)
    for k, v in ref.items():
        assert torch.equal(getattr(sae, k).detach(), v), k
    assert float(sae.scale) == 1.0  # raw inputs, as the reference
    bound = math.sqrt(6 / d_sae)  # kaiming_uniform_, leaky_relu gain sqrt(2), fan_in = d_sae
    w = sae.W_enc.detach().flatten().numpy()
    assert np.abs(w).max() <= bound
    assert stats.kstest(w, stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 0.01
    col = sae.W_enc.detach().norm(dim=0)
    assert col.mean().item() == pytest.approx(math.sqrt(2 * d_in / d_sae), rel=0.02)  # 0.5 at 8x
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(d_sae), atol=1e-6)
    # a different seed gives a different start
    assert not torch.equal(ReferenceReLUSAE(d_in, d_sae, seed=seed + 1, l1_coeff=L1).W_enc, sae.W_enc)


def test_training_equals_the_reference_loop_step_by_step(tmp_path):
    # the reference's train.py on the same batches: loss.backward(); project the decoder gradient and renormalise
    # the decoder; Adam step. Catches: renormalising after the step instead of before, the L1 as a batch mean,
    # a warmup or clip left on, the inputs scaled, b_dec moved at the start, Adam's betas.
    d_in, steps, batch = 32, 12, 256
    data, _ = make_data(n=4096, d=d_in, seed=3)
    data = np.abs(data)  # non-negative, like post-GELU activations mostly are
    cfg = config(seed=7, d_sae=128, batch_size=batch, n_tokens=steps * batch, checkpoint_every=100)
    module = module_for(cfg, d_in, steps=steps)
    train_module(module, compose(["trainer.threads=1"]).trainer, tmp_path, {"x": data})
    ours = module.saes[0]

    p = {k: v.clone().requires_grad_(True) for k, v in reference_init(d_in, 128, 7).items()}
    opt = torch.optim.Adam(p.values(), lr=LR, betas=BETAS)
    source = ArraySource({"x": data}, buffer_rows(cfg, steps), 7, dtype=cfg.buffer_dtype)  # as train_module
    batches = StreamBatches(source, batch, 7)
    losses = []
    for step in range(steps):
        x = batches.batch(step)["x"]
        loss, _ = reference_loss(p, x)
        loss.backward()
        with torch.no_grad():  # make_decoder_weights_and_grad_unit_norm
            normed = p["W_dec"] / p["W_dec"].norm(dim=-1, keepdim=True)
            p["W_dec"].grad -= (p["W_dec"].grad * normed).sum(-1, keepdim=True) * normed
            p["W_dec"].data = normed
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(ours, k).detach(), p[k].detach(), rtol=1e-4, atol=1e-6, msg=k)
    # the decoder the reference leaves after a step is off unit norm (renormalised before the next step only)
    assert (p["W_dec"].detach().norm(dim=1) - 1).abs().max() > 1e-6
    assert losses[-1] < losses[0]


def test_one_step_loss_and_gradient_equal_the_formulas():
    # the loss sfcd optimises and its gradient (after the decoder projection) against the formula, differentiated
    # here by central finite differences in float64 at a few coordinates of each parameter
    torch.manual_seed(0)
    sae = ReferenceReLUSAE(16, 48, seed=3, l1_coeff=L1).double()
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.uniform_(-0.1, 0.1)
    x = torch.rand(64, 16, dtype=torch.float64) * 2
    out = sae.training_loss(x, 0.0)
    p = {k: getattr(sae, k).detach().contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    assert out["loss"].item() == pytest.approx(reference_loss(p, x)[0].item(), rel=1e-12)
    out["loss"].backward()
    grads = {k: sae.grad_of(k).contiguous() for k in p}
    g = torch.Generator().manual_seed(1)
    for k, v in p.items():
        for flat in torch.randint(0, v.numel(), (6,), generator=g).tolist():
            h = 1e-6
            plus, minus = {**p, k: v.clone()}, {**p, k: v.clone()}  # contiguous clones
            plus[k].view(-1)[flat] += h
            minus[k].view(-1)[flat] -= h
            fd = (reference_loss(plus, x)[0] - reference_loss(minus, x)[0]).item() / (2 * h)
            assert grads[k].view(-1)[flat].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (k, flat)
    sae.before_step()
    w = p["W_dec"] / p["W_dec"].norm(dim=1, keepdim=True)
    projected = grads["W_dec"] - (grads["W_dec"] * w).sum(1, keepdim=True) * w
    torch.testing.assert_close(sae.W_dec.grad, projected)
    assert (sae.W_dec.grad * w).sum(1).abs().max() < 1e-12  # nothing left along the rows


def planted(n_rows=1_000_000, d=16, seed=0):
    """Rows of small noise where coordinate j is 5 in exactly counts[j] rows; feature j (< d) reads coordinate j
    with b_enc -1, so it fires exactly counts[j] times; features >= d never fire."""
    counts = [0, 1, 2, 3, 4, 5, 10, 3, 4, 100, 0, 7, 3, 31, 32, 2000]
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.5, size=(n_rows, d)).astype(np.float32)
    for j, c in enumerate(counts):
        x[rng.choice(n_rows, c, replace=False), j] = 5.0
    return x, np.array(counts)


def test_resampling_criterion_new_weights_and_untouched_adam_state():
    # catches: dead judged on training batches or a silence window instead of the density over fresh tokens, the
    # threshold 10^-5 instead of 10^-5.5 (or <= for <), the new rows not the reference's draws (order, fan-in,
    # normalised at once), Adam's moments reset, live features touched
    x, counts = planted()
    d, d_sae = x.shape[1], 40
    cfg = config(seed=0, d_sae=d_sae, resample_tokens=2_000_000, schedule_scale=0.5)
    source = ArraySource({"x": x}, len(x), 0)
    module = module_for(cfg, d, source)
    sae = module.saes[0]
    assert sae.resample_sample_tokens() == 1_000_000 and sae.resample_period() == 15_000  # one factor on both
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[torch.arange(d), torch.arange(d)] = 1.0
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=BETAS)
    sae.training_loss(torch.from_numpy(x[:512]), 0.0)["loss"].backward()
    opt.step()  # Adam state to keep
    before = {k: v.detach().clone() for k, v in sae.state_dict().items()} | {"W_enc": sae.W_enc.detach().clone()}
    adam = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}

    # 10^-5.5 x 1e6 = 3.16 firings: 0-3 firings dead, 4 and more alive; every feature >= d is dead
    expected = torch.tensor([c <= 3 for c in counts] + [True] * (d_sae - d))
    density = module.fresh_density([(module.specs[0], sae)], draw=1)["x"]
    torch.testing.assert_close(density[:d], torch.from_numpy(counts / 1e6).float())
    g_state = module._g.get_state()
    module._resample(opt, [(module.specs[0], sae, None, None)], step=14_999)

    with torch.random.fork_rng():  # the reference's re_init, drawn from the same generator state
        torch.set_rng_state(g_state)
        new_w_enc = torch.nn.init.kaiming_uniform_(torch.zeros(before["W_enc"].shape))  # contiguous, as its
        new_w_dec = torch.nn.init.kaiming_uniform_(torch.zeros(before["W_dec"].shape))
    dead = expected
    assert torch.equal(sae.W_enc[:, dead].detach(), new_w_enc[:, dead])
    assert torch.equal(sae.W_dec[dead].detach(), new_w_dec[dead])  # left unnormalised until the next step
    assert (sae.b_enc[dead] == 0).all()
    assert torch.equal(sae.W_enc[:, ~dead].detach(), before["W_enc"][:, ~dead])
    assert torch.equal(sae.W_dec[~dead].detach(), before["W_dec"][~dead])
    assert torch.equal(sae.b_enc[~dead].detach(), before["b_enc"][~dead])
    for p in sae.parameters():
        for k, v in adam[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k


def test_resampling_runs_in_training_at_the_scaled_period(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sfcd.sae.train")
    # in the Lightning loop: resampled at step resample_every x schedule_scale and not before, over fresh rows
    d_in, batch = 16, 256
    data = np.abs(make_data(n=4096, d=d_in, seed=5)[0])
    cfg = config(
        seed=1,
        d_sae=256,
        batch_size=batch,
        n_tokens=8 * batch,
        resample_every=600,
        schedule_scale=0.01,
        resample_tokens=204_800,
        checkpoint_every=100,
    )
    module = module_for(cfg, d_in, steps=8)
    with torch.no_grad():  # 20 features that can never fire (inputs >= 0, b_dec moves by ~lr per step)
        module.saes[0].W_enc[:, :20] = -1.0
        module.saes[0].b_enc[:20] = -10.0
    train_module(module, compose(["trainer.threads=1"]).trainer, tmp_path, {"x": data})
    msgs = [r.getMessage() for r in caplog.records if "resampling" in r.getMessage()]
    assert len(msgs) == 1 and "at step 6" in msgs[0], msgs
    n = int(msgs[0].split("resampling ")[1].split()[0])
    assert n >= 20


def test_reference_stage_trains_and_compares_what_it_ran(test_run, tmp_path, caplog):
    # the stage end to end on the test model (a copy of its run): seeds side by side, the scaled resampling
    # reading fresh activations from the model, metrics.json recording how it trained, and a comparison that
    # reads those records. Catches: the training record missing (every row "recipe"), the schedule factor not
    # applied in the stage, a comparison describing settings the run did not use
    import json
    import shutil

    from sfcd.stages import reference

    caplog.set_level(logging.INFO, logger="sfcd.sae.train")
    run = tmp_path / "run"
    shutil.copytree(test_run.run_dir, run, ignore=shutil.ignore_patterns("saes", "features", "circuits", "activations"))
    ref = compose(["experiment=one_layer_reference"]).sae  # its settings, on the test profile's model and sizes
    keys = ("architecture", "l1_coeff", "lr", "warmup_frac", "decay_frac", "grad_clip", "resample_every")
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={run}",
            "sae.sites=[mlp_act.0]",
            *(f"sae.{k}={ref[k]}" for k in keys),
            "sae.betas=[0.9,0.99]",
            "sae.buffer_dtype=bfloat16",
            "+sae.sweep.seed=[49,50]",
            "sae.schedule_scale=0.0001",  # resample every 3 steps over 328 fresh tokens
        ]
    )
    reference(cfg)
    out = run / "saes" / f"step{cfg.train.steps}"
    msgs = [r.getMessage() for r in caplog.records if "resampling" in r.getMessage()]
    assert {m.split(":")[0] for m in msgs} <= {"mlp_act.0@seed=49", "mlp_act.0@seed=50"}
    assert sorted(m.split(" at step ")[1] for m in msgs) == ["3", "3", "6", "6"]  # x 0.0001: 3 steps, not 30,000
    m = json.loads((out / "mlp_act.0@seed=49" / "metrics.json").read_text())
    assert m["training"]["batch_size"] == 1024 and m["training"]["buffer_dtype"] == "bfloat16"
    assert m["training"]["seed"] == 49 and m["hparams"]["schedule_scale"] == 0.0001
    md = (out / "reference_comparison.md").read_text()
    assert "| batch | 4,096 activations | 1,024 activations | recipe |" in md
    assert "| decoder | " in md and "| initialisation | " in md and "step24 on its run" in md  # the model it read
    assert "every 3 steps: features with density < 3.16e-06 over 328 fresh tokens" in md
    assert "mlp_act.0@seed=49, mlp_act.0@seed=50" in md
