"""SAE training: many SAEs in one stream equal each trained alone; resume; NaN handling; the stage."""

import json

import lightning as L
import numpy as np
import pytest
import torch

from sfcd.activations.stream import ArraySource, StreamBatches
from sfcd.config import compose
from sfcd.errors import ConfigError, InputError, SfcdError
from sfcd.sae.io import load_sae
from sfcd.sae.train import SAEModule, make_specs, train_module

from ..crash import Crash, CrashAt
from .synthetic import make_data


@pytest.fixture(scope="module")
def arrays():
    a, _ = make_data(n=8192, d=32, seed=0)
    b, _ = make_data(n=8192, d=32, seed=1)
    return {"x": a, "y": b}


def fit(overrides, site_dims, arrays, tmp_path, callbacks=None):
    cfg = compose(
        ["sae.batch_size=256", "sae.d_sae=64", "sae.k=4", "sae.n_tokens=8192", "sae.checkpoint_every=5", *overrides]
    )
    steps = cfg.sae.n_tokens // cfg.sae.batch_size
    module = SAEModule(make_specs(cfg.sae, site_dims), cfg.sae, steps)
    return train_module(module, cfg.trainer, tmp_path, {k: arrays[k] for k in site_dims}, callbacks)


def params(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_many_saes_in_one_stream_equal_each_alone(arch, arrays, tmp_path):
    many = fit([f"sae.architecture={arch}", "+sae.sweep.lr=[0.001,0.003]"], {"x": 32, "y": 32}, arrays, tmp_path / "m")
    names = [s.name for s in many.specs]
    assert names == ["x@lr=0.001", "x@lr=0.003", "y@lr=0.001", "y@lr=0.003"]
    alone = fit([f"sae.architecture={arch}", "sae.lr=0.003"], {"y": 32}, arrays, tmp_path / "a")
    assert_same(params(many.saes[3]), params(alone.saes[0]))
    assert not torch.allclose(many.saes[2].W_dec, alone.saes[0].W_dec)  # a different lr is a different SAE


def test_a_compiled_loss_trains_what_the_eager_one_trains(arrays, tmp_path, caplog):
    """``sae.compile=true``: ReLU SAEs at two sites, each in two ``l1_coeff`` values (4 SAEs, 2 hyperparameter
    groups), train through ``torch.compile``'d losses and end where the eager ones do, to float32 rounding (fused
    kernels sum in another order). Dynamo's recompile limit set to 2 here, as the default 8 is to a sweep of 4+
    values: each group needs two versions (``progress == 0``, then the rest), the sites share them. Bugs caught:
    the setting ignored (nothing compiled), one SAE's compiled loss used for another (the other's parameters
    never trained), the limit left as it is (the second group runs eager: 2 graphs, not 4), a copy of the module
    sharing the compiled losses of these SAEs (it would train the originals). TopK's loss is not compiled (its
    class does not say ``compiles``): it trains eager, with a warning naming it."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    sweep = ["sae.architecture=relu", "+sae.sweep.l1_coeff=[5.0,7.0]"]
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    counters.clear()
    # dynamo's own patch, not monkeypatch: its undo deletes what was not in the module's __dict__ (dynamo's
    # settings are not), and a deleted dynamo setting is hidden for the rest of the process
    with torch._dynamo.config.patch(recompile_limit=2):
        try:
            comp = fit([*sweep, "sae.compile=true"], {"x": 32, "y": 32}, arrays, tmp_path / "c")
            graphs = counters["stats"]["unique_graphs"]
            counters.clear()
            fit(["sae.architecture=topk", "sae.compile=true"], {"x": 32}, arrays, tmp_path / "t")
            topk_graphs = counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()
    assert torch._dynamo.config.recompile_limit == limit  # as it was before the test
    eager = fit(sweep, {"x": 32, "y": 32}, arrays, tmp_path / "e")
    assert [s.name for s in comp.specs] == ["x@l1_coeff=5.0", "x@l1_coeff=7.0", "y@l1_coeff=5.0", "y@l1_coeff=7.0"]
    for a, b in zip(comp.saes, eager.saes, strict=True):
        assert_same(params(a), params(b))
    assert graphs == 4
    assert topk_graphs == 0 and "sae.compile: topk train eager" in caplog.text
    assert copy.deepcopy(comp)._fns is None and comp._fns is not None


def test_a_sweep_value_listed_twice_is_refused_naming_it(arrays, tmp_path):
    """Two SAEs of one name would write one folder and log under one key: refused before training."""
    with pytest.raises(ConfigError, match=r"both named \['x@lr=0.001'\]: a value listed twice in sae.sweep"):
        fit(["+sae.sweep.lr=[0.001,0.001]"], {"x": 32}, arrays, tmp_path)


class Dead(L.Callback):
    """The first 16 latents of every SAE silent for long at every step: AuxK on in these short runs."""

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, batch, i):
        for sae in module.saes:
            sae.tokens_since_fired[:16] = 10**12


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_one_backward_pass_for_all_saes_where_their_graphs_are_small(arch, arrays, tmp_path, monkeypatch):
    """Four SAEs (two sites at two lrs), AuxK at work (16 latents of each counted dead). TopK's sparse path takes
    one backward pass a step for all four and trains bit for bit what one pass per SAE trains; a dense step
    (ReLU: [B, d_sae] tensors in its graph) keeps one pass per SAE. Bugs caught: the joint loss weighted (a mean:
    every gradient a third), a loss left out of it, dense graphs all alive at once (or the sparse ones not)."""
    passes = []
    real = SAEModule.manual_backward
    monkeypatch.setattr(SAEModule, "manual_backward", lambda self, loss: passes.append(1) or real(self, loss))
    cfg, sites = [f"sae.architecture={arch}", "+sae.sweep.lr=[0.001,0.003]"], {"x": 32, "y": 32}
    joint = fit(cfg, sites, arrays, tmp_path / "j", [Dead()])
    n_saes, steps = len(joint.saes), joint.total_steps
    assert len(passes) == (steps if arch != "relu" else n_saes * steps)
    if arch == "relu":
        return
    passes.clear()
    monkeypatch.setattr(type(joint.saes[0]), "small_graph", property(lambda self: False))
    each = fit(cfg, sites, arrays, tmp_path / "e", [Dead()])
    assert len(passes) == n_saes * steps
    for a, b in zip(joint.saes, each.saes, strict=True):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_resume_continues_the_same_run(arrays, tmp_path):
    ref = fit(["sae.architecture=topk"], {"x": 32}, arrays, tmp_path / "ref")
    with pytest.raises(Crash):
        fit(["sae.architecture=topk"], {"x": 32}, arrays, tmp_path / "r", [CrashAt(12)])
    assert (tmp_path / "r" / "last.ckpt").exists()
    resumed = fit(["sae.architecture=topk"], {"x": 32}, arrays, tmp_path / "r")
    assert_same(params(resumed.saes[0]), params(ref.saes[0]))


def test_a_state_with_one_optimizer_group_per_sae_resumes_into_the_shared_groups(arrays, tmp_path, monkeypatch):
    """Four SAEs in two layouts: one site swept over two lrs and two seeds (x@lr=0.001,seed=0, x@lr=0.001,seed=1,
    x@lr=0.003,seed=0, x@lr=0.003,seed=1: two groups of two) and two sites swept over two seeds (one lr: one
    group of four). A run that crashes at step 12 with one optimizer parameter group per SAE (the layout of states
    saved before the groups were shared) resumes in today's layout and ends bit for bit where an unbroken run
    ends. Bugs caught: the old state refused (Lightning: a different number of groups), the groups joined out of
    order (Adam's moments given to another SAE's parameters), the scheduler's per-group lists left long or cut to
    the wrong groups' lrs, a group given another run's lr."""
    layouts = {
        "lr_seed": (["+sae.sweep.lr=[0.001,0.003]", "+sae.sweep.seed=[0,1]"], {"x": 32}, [0.001, 0.003]),
        "seed": (["+sae.sweep.seed=[0,1]", "sae.lr=0.002"], {"x": 32, "y": 32}, [0.002]),
    }
    for name, (sweep, sites, lrs) in layouts.items():
        cfg = ["sae.architecture=topk", *sweep]
        ref = fit(cfg, sites, arrays, tmp_path / f"{name}_ref")
        assert [g["initial_lr"] for g in ref.optimizers().param_groups] == lrs  # each group at its SAEs' lr
        with monkeypatch.context() as m:
            m.setattr(SAEModule, "_lr_runs", lambda self: [1] * len(self.specs))
            with pytest.raises(Crash):
                fit(cfg, sites, arrays, tmp_path / name, [CrashAt(12)])
        state = torch.load(tmp_path / name / "last.ckpt", map_location="cpu", weights_only=True)
        assert len(state["optimizer_states"][0]["param_groups"]) == 4
        resumed = fit(cfg, sites, arrays, tmp_path / name)
        assert len(resumed.optimizers().param_groups) == len(lrs)
        for a, b in zip(resumed.saes, ref.saes, strict=True):
            assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("every", [5, 4])
def test_nan_stops_naming_step_and_site_and_keeps_the_last_state(arrays, tmp_path, every):
    """NaN rows in the batches of steps 7 and 8. The checks are read at the logging step 9 (saves every 5: the
    state of step 5 kept) or at the save after step 7 (every 4: the save refused, step 4's kept). Bugs caught: a
    later bad step reported instead of the first, a state saved after the bad step (NaN weights on disk)."""
    bad = {"x": arrays["x"].copy()}
    stream = StreamBatches(ArraySource(bad, 8192, seed=0), 256, seed=0)  # one chunk = the file
    for step in (7, 8):
        bad["x"][stream.rows(step).numpy()[0]] = np.nan
    with pytest.raises(SfcdError, match=r"site x at training step 7;.*last good training state is kept"):
        fit(["sae.architecture=relu", f"sae.checkpoint_every={every}"], {"x": 32}, bad, tmp_path)
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == every
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_at_the_last_step_stops_before_the_saes_are_returned(arrays, tmp_path, value):
    """Step 31 of 32, after the last logging step (29) and the last save (30); one entry of one row NaN, +inf or
    -inf. Bugs caught: the checks not read at the run's end, so SAEs with NaN weights go on to evaluation and
    export; an input check blind to one of the three (then named a diverged SAE, from its loss, not the site)."""
    bad = {"x": arrays["x"].copy()}
    bad["x"][StreamBatches(ArraySource(bad, 8192, seed=0), 256, seed=0).rows(31).numpy()[0], 5] = value
    with pytest.raises(SfcdError, match=r"site x at training step 31;"):
        fit(["sae.architecture=topk"], {"x": 32}, bad, tmp_path)


class Overflow(L.Callback):
    """A row of 1e20s (finite) in step 7's batch, whose squared error overflows to inf, and half the latents
    dead (silent for long, and held below zero in this step so that it cannot fire them)."""

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, batch, i):
        if i == 7:
            batch["x"][0] = 1e20
            module.saes[0].tokens_since_fired[::2] = 10**12
            module.saes[0].b_enc[::2] = -1e30


def test_an_overflow_at_a_resampling_step_stops_with_the_checks_error(arrays, tmp_path):
    """Step 7 ends in a resampling pass (every 8 steps) and its loss is inf, so the draw's weights (loss^2 over
    their sum) would be NaN. Bug caught: the checks read only after resampling, where torch.multinomial's error
    stops the run instead of the one naming the step and the SAE."""
    with pytest.raises(SfcdError, match=r"SAE x diverged \(a non-finite loss\) at training step 7;"):
        fit(
            ["sae.architecture=relu", "sae.resample_every=8"],
            {"x": 32},
            arrays,
            tmp_path,
            [Overflow()],
        )


def test_unknown_architecture_and_sweep_key():
    with pytest.raises(ConfigError, match="unknown SAE architecture 'gated'"):
        make_specs(compose(["sae.architecture=gated"]).sae, {"x": 4})
    with pytest.raises(ConfigError, match="cannot be swept"):
        make_specs(compose(["+sae.sweep.batch_size=[1,2]"]).sae, {"x": 4})


def test_per_site_settings_lay_a_site_over_its_kind_over_the_defaults():
    """Catches: an override applied to every site, the kind's entry winning over the exact site's, or the sweep
    losing to a per-site value."""
    cfg = compose(
        ["experiment=test", "sae.expansion=4", "sae.k=8", "+sae.per_site={resid:{expansion:2,k:4},resid.1:{k:6}}"]
    ).sae
    specs = {s.name: s for s in make_specs(cfg, {"embed": 16, "resid.0": 16, "resid.1": 16})}
    assert (specs["embed"].d_sae, specs["embed"].hparams["k"]) == (64, 8)
    assert (specs["resid.0"].d_sae, specs["resid.0"].hparams["k"]) == (32, 4)
    assert (specs["resid.1"].d_sae, specs["resid.1"].hparams["k"]) == (32, 6)
    swept = make_specs(compose(["experiment=test", "+sae.per_site.embed={k:2}", "+sae.sweep.k=[3]"]).sae, {"embed": 16})
    assert swept[0].hparams["k"] == 3
    with pytest.raises(ConfigError, match=r"sae.per_site.embed sets \['batch_size'\], which cannot differ by site"):
        make_specs(compose(["experiment=test", "+sae.per_site.embed={batch_size:2}"]).sae, {"embed": 4})


def test_sae_stage_files_of_the_shared_run(test_run, test_saes):
    """What the stage wrote for the shared run's TopK SAEs: SAELens metadata, the sparsity and density files, the
    activation cache's size, a complete stage skipped. (Its metric values are checked on planted dictionaries in
    ``test_sae_stage_scores_planted_dictionaries``.)"""
    from sfcd.paths import RunDir
    from sfcd.sae.stage import train_saes

    cfg = compose(["experiment=test", f"run_dir={test_run.run_dir}", "sae.sites=[resid.0,mlp.1]", "sae.cache=true"])
    folders = test_saes
    run = RunDir(test_run.run_dir)
    assert [f.name for f in folders] == ["resid.0", "mlp.1"]
    for f in folders:
        m = json.loads((f / "metrics.json").read_text())
        # 2048 evaluation tokens cannot tell a density of 1e-5 from 0: not reported as if they could
        assert m["density_resolution"] == 1 / 2048 and m["below_1e-5"] is None and m["below_1e-6"] is None
        meta = json.loads((f / "cfg.json").read_text())["metadata"]
        assert meta["prepend_bos"] is False and meta["model_from_pretrained_kwargs"]["center_writing_weights"] is False
        assert m["l0"] <= 8 + 1e-6 and m["ce_zero"] > m["ce_clean"]  # TopK with k = 8
        assert (f / "sparsity.safetensors").exists() and (f / "density.png").stat().st_size > 1000
        assert load_sae(f).d_sae == 4 * 32
    cache = run.root / "activations" / "step24" / "resid.0"
    stream = json.loads((cache / "stream.json").read_text())
    assert stream["rows"] == 8192 and stream["d"] == 32 and stream["step"] == 24
    assert (cache / "chunk_000000.bin").stat().st_size == 8192 * 32 * 4
    assert not (run.root / "saes" / "step24" / ".train").exists()
    before = (folders[0] / "sae_weights.safetensors").stat().st_mtime_ns
    train_saes(cfg)  # complete: skipped
    assert (folders[0] / "sae_weights.safetensors").stat().st_mtime_ns == before


class Plant(L.Callback):
    """When training ends, before the stage evaluates: SAE 0 becomes a perfect dictionary (latents relu(x_i) and
    relu(-x_i), decoded by +-e_i: x_hat = x exactly; the other latents never fire) and SAE 1 a zero one (no latent
    fires, b_dec = 0: x_hat = 0)."""

    def on_train_end(self, trainer, pl_module):
        perfect, zero = pl_module.saes
        d = perfect.d_in
        eye = torch.eye(d)
        with torch.no_grad():
            for p in (*perfect.parameters(), *zero.parameters()):
                p.zero_()
            perfect.W_enc[:, :d], perfect.W_enc[:, d : 2 * d] = eye, -eye
            perfect.W_dec[:d], perfect.W_dec[d : 2 * d] = eye, -eye
            perfect.b_enc[2 * d :] = -1.0
            zero.b_enc.fill_(-1.0)


def test_sae_stage_scores_planted_dictionaries(own_run):
    """The stage's evaluation of two planted dictionaries against values known without its code: the perfect one
    has FVE 1, CE loss score 1 and KL score 1 (spliced loss = clean loss), L0 = d_in and half its latents dead; the
    zero one has CE loss score 0 and KL score 0 (splicing it in is the zero ablation), L0 0, every latent dead,
    cosine 0, and FVE 1 - sum x^2 / sum (x - mean)^2. The clean and zero-ablated losses, and the activations, are
    computed here with plain transformers and a forward hook on the first block."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfcd.data.tokens import read_tokens
    from sfcd.paths import RunDir
    from sfcd.sae.stage import train_saes

    run = RunDir(own_run.run_dir)
    eval_tokens, ce_tokens = 512, 256
    over = [
        "experiment=test",
        f"run_dir={run.root}",
        "sae.sites=[resid.0]",
        "sae.architecture=relu",
        "+sae.sweep.seed=[1,2]",
        "sae.n_tokens=2048",
        f"sae.eval_tokens={eval_tokens}",
        f"sae.ce_tokens={ce_tokens}",
    ]
    folders = train_saes(compose(over), [Plant()])
    assert [f.name for f in folders] == ["resid.0@seed=1", "resid.0@seed=2"]
    perfect, zero = (json.loads((f / "metrics.json").read_text()) for f in folders)

    # the independent computation: val windows as the stage takes them (consecutive, from the start), BOS/EOS
    # positions left out of the activations and kept unablated
    model = AutoModelForCausalLM.from_pretrained(str(run.model_step(24))).eval()
    special = torch.tensor(AutoTokenizer.from_pretrained(str(run.model_step(24))).all_special_ids)
    seq_len = own_run.model.seq_len
    val = torch.from_numpy(np.array(read_tokens(run.tokens("val")), dtype=np.int64))
    block = model.gpt_neox.layers[0]
    keep, seen = None, []

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen.append(h[keep[..., 0]])
        if ablate:
            h = torch.where(keep, torch.zeros_like(h), h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def ce(x):
        logits = model(x).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            n_eval = int(eval_tokens * 1.25 / seq_len) + 2
            x = val[: n_eval * seq_len].view(n_eval, seq_len)
            keep, ablate = ~torch.isin(x, special)[..., None], False
            model(x)
            acts = torch.cat(seen)[:eval_tokens]
            x = val[: ce_tokens // seq_len * seq_len].view(-1, seq_len)
            keep = ~torch.isin(x, special)[..., None]
            ce_clean = ce(x)
            ablate = True
            ce_zero = ce(x)
    finally:
        handle.remove()
    assert len(acts) == eval_tokens and ce_zero > ce_clean + 0.02

    for m in (perfect, zero):
        assert m["ce_clean"] == pytest.approx(ce_clean, abs=1e-4)
        assert m["ce_zero"] == pytest.approx(ce_zero, abs=1e-4)
        assert m["eval_tokens"] == eval_tokens and m["d_sae"] == 128 and m["architecture"] == "relu"
    assert perfect["fve"] == pytest.approx(1, abs=1e-5) and perfect["ce_sae"] == pytest.approx(ce_clean, abs=1e-4)
    assert perfect["ce_loss_score"] == pytest.approx(1, abs=1e-3) and perfect["kl_score"] == pytest.approx(1, abs=1e-3)
    assert perfect["cosine"] == pytest.approx(1, abs=1e-5) and perfect["l2_ratio"] == pytest.approx(1, abs=1e-5)
    assert perfect["l0"] == pytest.approx(float((acts != 0).sum(1).float().mean()), abs=1e-6) and perfect["l0"] > 30
    # 64 of 128 latents can fire; relu(x_i) is dead when x_i is never positive, relu(-x_i) when never negative
    never = int((acts > 0).sum(0).eq(0).sum() + (acts < 0).sum(0).eq(0).sum())
    assert perfect["dead_fraction"] == (64 + never) / 128
    assert zero["ce_loss_score"] == 0 and zero["kl_score"] == 0 and zero["ce_sae"] == zero["ce_zero"]
    assert (zero["l0"], zero["dead_fraction"], zero["cosine"], zero["l2_ratio"]) == (0, 1, 0, 0)
    fve_zero = 1 - acts.pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    assert zero["fve"] == pytest.approx(float(fve_zero), rel=1e-4) and zero["fve"] < -0.01
    assert zero["mse"] == pytest.approx(float(acts.pow(2).mean()), rel=1e-4)
    # the saved files (scale folded into the weights) compute the same planted functions
    x = acts[:64]
    torch.testing.assert_close(load_sae(folders[0])(x), x, atol=1e-4, rtol=1e-4)
    assert load_sae(folders[1])(x).abs().max() == 0


def test_sae_stage_errors(test_run, test_saes, tmp_path):
    from sfcd.models.loading import load_model
    from sfcd.models.sites import parse_site
    from sfcd.sae.stage import check_sae_fits, train_saes

    with pytest.raises(ConfigError, match="unknown site 'resid.9'"):
        train_saes(compose(["experiment=test", f"run_dir={test_run.run_dir}", "sae.sites=[resid.9]"]))
    model = load_model(test_run.run_dir)
    sae = load_sae(test_saes[0])
    with pytest.raises(InputError, match="site mlp_act.0 of this model is 64-dimensional"):
        check_sae_fits(sae, model, parse_site("mlp_act.0", model))
    np.save(tmp_path / "acts.npy", np.ones((10, 4, 2), dtype=np.float32))
    with pytest.raises(InputError, match="rank 3"):
        train_saes(compose(["experiment=test", f"run_dir={tmp_path}", f"sae.activations={tmp_path / 'acts.npy'}"]))


class Steps(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, *args):
        self.steps = trainer.global_step


def test_sae_from_a_plain_activation_file(tmp_path):
    # catches: n_tokens beyond the file's length silently cut to one epoch; a same-named file of another width
    # skipped as complete
    from sfcd.sae.stage import train_saes

    acts, _ = make_data(n=6000, d=16, n_dirs=24, seed=2)
    np.save(tmp_path / "acts.npy", acts)
    over = [
        f"run_dir={tmp_path / 'run'}",
        f"sae.activations={tmp_path / 'acts.npy'}",
        "sae.batch_size=500",
        "sae.expansion=2",
        "sae.k=3",
        "sae.n_tokens=20000",  # 3.7 passes over the 5,400 training rows
        "sae.buffer_tokens=2000",
    ]
    steps = Steps()
    (folder,) = train_saes(compose(over), [steps])
    m = json.loads((folder / "metrics.json").read_text())
    assert steps.steps == 40 and m["train_tokens"] == 20000
    assert folder.parent.name == "file-acts" and m["d_in"] == 16 and m["d_sae"] == 32
    assert "ce_loss_score" not in m and 0.5 < m["fve"] <= 1
    np.save(tmp_path / "acts.npy", np.concatenate([acts, acts], 1))
    with pytest.raises(InputError, match="is 32-dimensional but .* was trained on a 16-dimensional file"):
        train_saes(compose(over))


def test_gpu_trainer_without_a_gpu_is_a_clear_error(tmp_path):
    from sfcd.sae.stage import train_saes

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    np.save(tmp_path / "acts.npy", np.ones((100, 4), dtype=np.float32))
    with pytest.raises(ConfigError, match="asks for a GPU but torch sees none.*use trainer=cpu"):
        train_saes(compose(["trainer=gpu", f"run_dir={tmp_path}", f"sae.activations={tmp_path / 'acts.npy'}"]))


def test_auxk_is_weighted_by_the_share_of_dead_latents():
    # catches: AuxK not scaled by min(n_dead / k_aux, 1) (Gao et al. B.1), or not in the main loss's units
    from sfcd.sae.topk import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(16, 64, seed=0, k=4, k_aux=8, dead_tokens=10)
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:3] = True  # 3 dead of k_aux 8: scale 3/8
    sae.tokens_since_fired[dead] = 100
    out = sae.training_loss(x, 0.5)
    with torch.no_grad():  # direct computation: the dead latents alone reconstruct the residual
        xc = x - sae.b_dec
        pre = xc @ sae.W_enc + sae.b_enc
        idx = pre.topk(4, dim=-1).indices
        f = torch.zeros_like(pre).scatter(1, idx, torch.relu(pre.gather(1, idx)))
        e = x - (f @ sae.W_dec + sae.b_dec)
        e_hat = torch.relu(pre[:, :3]) @ sae.W_dec[:3]
        expect = 3 / 8 * (e_hat - e).pow(2).sum(-1).mean()
    torch.testing.assert_close(out["aux"].detach(), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), out["mse"].detach() + expect / 32, atol=1e-5, rtol=1e-5)


def test_warm_start_reproduces_the_saved_sae(arrays, tmp_path):
    from sfcd.sae.io import save_sae

    trained = fit(["sae.architecture=topk"], {"x": 32}, arrays, tmp_path / "first").saes[0]
    save_sae(trained, tmp_path / "saes" / "x", {})
    cfg = compose(
        ["sae.architecture=topk", "sae.d_sae=64", "sae.k=4", "sae.seed=5", f"sae.init_from={tmp_path / 'saes'}"]
    )
    module = SAEModule(make_specs(cfg.sae, {"x": 32}), cfg.sae, 10)
    module.initialise({"x": arrays["x"]})
    x = torch.from_numpy(arrays["x"][:100])
    with torch.no_grad():
        torch.testing.assert_close(module.saes[0](x), trained(x), atol=1e-5, rtol=1e-4)
    # on data of another scale the input scale differs; the first step's decoder renormalisation must not
    # change the warm-started function (it did when the row norms s_new / s_old were left in the decoder)
    scaled = SAEModule(make_specs(cfg.sae, {"x": 32}), cfg.sae, 10)
    scaled.initialise({"x": arrays["x"] * 3.0})
    assert abs(float(scaled.saes[0].scale) - float(trained.scale) / 3) < 1e-3 * float(trained.scale)
    scaled.saes[0].after_step()
    with torch.no_grad():
        torch.testing.assert_close(scaled.saes[0](x), trained(x), atol=1e-5, rtol=1e-4)
    cold = SAEModule(
        make_specs(compose(["sae.architecture=topk", "sae.d_sae=64", "sae.k=4", "sae.seed=5"]).sae, {"x": 32}),
        cfg.sae.copy(),
        10,
    )
    with torch.no_grad():
        assert not torch.allclose(cold.saes[0].W_dec, module.saes[0].W_dec)


@pytest.mark.parametrize("every", [None, 16])
def test_every_saes_mse_and_l0_logged_as_numbers_at_the_logging_interval(arrays, tmp_path, monkeypatch, every):
    """32 steps, Lightning's interval 10 (``trainer.log_every_n_steps``'s default; or 16 as set): each SAE's MSE
    and L0 written to the loggers at steps 10, 20 and 30 only (16 and 32),
    as Python numbers, in the CSV log there, and the first SAE's on the progress bar (``self.log``, the same
    numbers as host tensors: test_host_syncs checks the bar never reads a device tensor); L0 at most k.
    Bugs caught: logging every step or logging tensors (either one reads every SAE's values back to the host at
    every step, on a GPU a sync each), never logging, another quantity under the L0's name or on the bar, every
    SAE's metrics through ``self.log`` again (Lightning's ~1,900 Python calls a metric), the interval's setting
    ignored."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    calls, written = [], []
    log, log_metrics = SAEModule.log, CSVLogger.log_metrics

    def spy(self, name, value, *a, **k):
        calls.append((self.global_step, name, (type(value), value.device.type, value.dim()), value.item()))
        return log(self, name, value, *a, **k)

    def spy_logger(self, metrics, step=None):
        written.append((step, dict(metrics)))
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(SAEModule, "log", spy)
    monkeypatch.setattr(CSVLogger, "log_metrics", spy_logger)
    fit(
        ["sae.architecture=topk", *([f"trainer.log_every_n_steps={every}"] if every else [])],
        {"x": 32, "y": 32},
        arrays,
        tmp_path,
    )
    # global_step counts optimizer steps: the log call of step 10 runs after its optimizer step (global_step 10)
    at = [16, 32] if every else [10, 20, 30]
    assert sorted({s for s, *_ in calls}) == at
    assert {n for _, n, *_ in calls} == {"x/mse", "x/l0"}  # the progress bar's
    assert {t for _, _, t, _ in calls} == {(torch.Tensor, "cpu", 0)}
    assert [s for s, *_ in written] == [s - 1 for s in at]  # the step's index, as Lightning's connector wrote it
    types = dict.fromkeys(("x/mse", "x/l0", "y/mse", "y/l0"), float)
    assert all({n: type(v) for n, v in metrics.items()} == types for _, metrics in written)
    # the bar's values are the loggers' numbers of the same step
    assert all(v == pytest.approx(written[at.index(s)][1][n], rel=1e-6) for s, n, _, v in calls)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("x/mse", "x/l0", "y/mse", "y/l0"):
        logged = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        assert [s for s, _ in logged] == [s - 1 for s in at], key
        assert all(v > 0 and v == v for _, v in logged), key
    assert all(float(r["x/l0"]) <= 4 for r in rows if r.get("x/l0"))  # k = 4


def test_a_logging_interval_below_one_is_refused_naming_the_setting(arrays, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.log_every_n_steps must be at least 1 .*: 0"):
        fit(["trainer.log_every_n_steps=0"], {"x": 32}, arrays, tmp_path)


def _largest_saved(sae, x, **kw) -> int:
    """The most elements of any tensor a training step's graph keeps for its backward pass."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sae.training_loss(x, 0.5, **kw)["loss"]
    return max(sizes)


@pytest.mark.parametrize(
    "arch",
    [
        "relu",
        "relu_reference",
        "jumprelu",
        "topk",
        "batchtopk",
        "crosscoder_batchtopk",
        "crosscoder_l1",
        "transcoder",
        "topk_dense",
    ],
)
def test_small_graph_is_true_of_the_graph(arch):
    """``small_graph`` (which lets a step's SAEs share one backward pass, their graphs alive at once) against
    what each architecture's graph saves for its backward (AuxK on: 128 latents dead): nothing of [B, d_sae] (here
    256 x 512; [B, d] is 256 x 32) where it says True, something that large where it says False, except the
    crosscoders, which say False for their stage's memory plan (one site's working tensors at a time). The
    sparse kernels' ``ctx.active`` ([B, k] indices, not a saved tensor) is not seen here. Bug caught: a dense
    architecture (the L1 crosscoder, a TopK SAE with ``sparse=False``) said small, so that 19 sites' [B, d_sae]
    activations would be alive at once."""
    from sfcd.crosscoders.model import CROSSCODERS

    torch.manual_seed(0)
    B, d, m, kw = 256, 32, 512, {}
    x = torch.randn(B, d)
    if arch.startswith("crosscoder_"):
        sae = CROSSCODERS[arch.removeprefix("crosscoder_")](d, m, seed=0, n_blocks=2, k=4)
    else:
        name = {"topk_dense": "topk"}.get(arch, arch)
        cfg = compose([f"sae.architecture={name}", f"sae.d_sae={m}", "sae.k=4", f"sae.transcoder.d_sae={m}"])
        if arch == "transcoder":
            specs, kw = make_specs(cfg.sae, {}, {"mlp.0": d}), {"target": torch.randn(B, d)}
        else:
            specs = make_specs(cfg.sae, {"x": d})
        sae = SAEModule(specs, cfg.sae, 10).saes[0]
        sae.hparams["sparse"] = arch != "topk_dense"  # the dense reference computation (tests)
    sae.tokens_since_fired[: m // 4] = 10**12  # AuxK on, where there is one
    big = _largest_saved(sae, x, **kw) >= B * m
    assert not big if sae.small_graph else big or arch == "crosscoder_batchtopk"
