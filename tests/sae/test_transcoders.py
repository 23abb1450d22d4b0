"""Transcoders (issue 23, item 1): the ``mlp_in`` site, sparsify's files, a planted MLP recovered, the stage."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from sfcd.config import compose
from sfcd.errors import SfcdError
from sfcd.models.sites import Site, hooks, parse_site, reaches, run_with_cache
from sfcd.sae import evaluate as E
from sfcd.sae.io import load_sae, load_transcoder, save_sae, save_transcoder
from sfcd.sae.train import SAEModule, make_specs, train_module
from sfcd.sae.transcoder import Transcoder

from .synthetic import mmcs


def _model(run):
    from transformers import AutoModelForCausalLM

    from sfcd.paths import RunDir

    r = RunDir(run.run_dir)
    return AutoModelForCausalLM.from_pretrained(str(r.model_step(r.model_steps()[-1]))).eval(), r


def test_mlp_in_is_what_the_mlp_reads(test_run):
    """``mlp_in.<l>`` is the MLP's input: the post-attention layer norm's output, read with a plain hook; a
    replacement there is what the MLP computes on. Bugs caught: mlp_in read at the MLP's output, a replacement at
    mlp_in ignored (a pre-hook's return value dropped), attn -> mlp_in of the same layer in parallel blocks."""
    model, _ = _model(test_run)
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    h = model.gpt_neox.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.update(ln=o))
    try:
        with torch.no_grad():
            cache = run_with_cache(model, ids, [parse_site("mlp_in.1", model), parse_site("mlp.1", model)])
    finally:
        h.remove()
    torch.testing.assert_close(cache["mlp_in.1"], seen["ln"])
    with torch.no_grad():
        torch.testing.assert_close(cache["mlp.1"], model.gpt_neox.layers[1].mlp(seen["ln"]))
        new = torch.randn_like(seen["ln"])
        with hooks(model, {parse_site("mlp_in.1", model): lambda a: new}):
            out = run_with_cache(model, ids, [parse_site("mlp.1", model)])["mlp.1"]
        torch.testing.assert_close(out, model.gpt_neox.layers[1].mlp(new))
    attn, mlp_in, mlp = Site("attn.1", "attn", 1), Site("mlp_in.1", "mlp_in", 1), Site("mlp.1", "mlp", 1)
    assert not reaches(attn, mlp_in, parallel=True) and reaches(attn, mlp_in, parallel=False)
    assert reaches(mlp_in, mlp, parallel=True) and not reaches(mlp, mlp_in, parallel=True)
    assert reaches(Site("resid.0", "resid", 0), mlp_in, parallel=True)


def _random_transcoder(d=24, m=80, k=5, skip=True, seed=0) -> Transcoder:
    tc = Transcoder(d, m, k=k, skip=skip)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        tc.scale.fill_(1.7)  # both scales folded into the files
        tc.out_scale.fill_(0.4)
    return tc


@pytest.mark.parametrize("skip", [True, False])
def test_sparsify_computes_the_saved_transcoder(skip, tmp_path):
    """sparsify's own ``SparseCoder.load_from_disk`` on sfcd's file computes sfcd's transcoder, and sfcd reads the
    file back to the same function; its raw decoder rows are sparsify's. Bugs caught: a scale not folded into W_skip
    or W_dec, W_skip transposed, b_dec subtracted from the input (sfcd's SAEs do; sparsify's transcoders do not), a
    wrong cfg key, decoder rows in the input's units (the logit effects of its dashboards read them)."""
    from sparsify import SparseCoder

    tc = _random_transcoder(skip=skip)
    folder = save_transcoder(tc, tmp_path / "mlp.0", {"sfcd_site": "mlp.0"})
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    theirs = SparseCoder.load_from_disk(folder)
    assert theirs.cfg.transcode and theirs.cfg.skip_connection == skip and theirs.cfg.k == 5
    with torch.no_grad():
        want = tc(x)
        torch.testing.assert_close(theirs(x).sae_out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_transcoder(folder)(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tc.decoder_rows(), theirs.W_dec, atol=1e-6, rtol=1e-5)  # output units
    with pytest.raises(Exception, match="load_transcoder"):
        load_sae(folder)  # a transcoder is not an SAE of one site
    with pytest.raises(Exception, match="save_transcoder"):
        save_sae(tc, tmp_path / "saelens")  # nor a file SAELens would misread


def _planted_mlp(n=16384, d=32, n_feat=48, p=0.03, seed=0):
    """A planted MLP: sparse signed input features ``a_i u_i`` (48 directions in 32 dimensions: no linear map
    recovers them) mapped to ``|a_i| v_i``, plus a dense linear part ``W x``. The feature part is even in each
    ``a_i``, so its best linear fit from ``x`` is zero, and ``x`` has a small dense part besides the features
    that no sparse code represents: only the skip path can hold ``W`` (on that part), and only latents (two per
    feature, one per sign) can write the ``v_i``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    lin = torch.randn(d, d, generator=g) * 0.1
    sign = torch.randint(0, 2, (n, n_feat), generator=g) * 2.0 - 1
    a = (torch.rand(n, n_feat, generator=g) < p) * (0.5 + torch.rand(n, n_feat, generator=g)) * sign
    x = a @ u + 0.3 * torch.randn(n, d, generator=g) / d**0.5  # a dense part that no sparse code holds
    y = a.abs() @ v + x @ lin.t()
    return {"mlp_in.0": x.numpy(), "mlp.0": y.numpy()}, v, a


def _fit(arrays, tmp_path, sae_sites=(), steps=120, overrides=()):
    cfg = compose(
        [
            "sae.batch_size=512",
            "sae.d_sae=128",
            "sae.k=4",
            f"sae.n_tokens={512 * steps}",
            "sae.lr=0.004",
            "sae.dead_tokens=2048",
            "sae.checkpoint_every=1000",
            "sae.transcoder.d_sae=128",  # over the default experiment's per-site size of mlp.0
            "sae.transcoder.k=4",
            *overrides,
        ]
    )
    specs = make_specs(cfg.sae, {s: 32 for s in sae_sites}, {"mlp.0": 32})
    module = SAEModule(specs, cfg.sae, steps)
    return train_module(module, cfg.trainer, tmp_path, arrays)


def test_planted_mlp_is_recovered_by_the_transcoder(tmp_path):
    """The transcoder's latents are the planted MLP's features: its decoder rows lie on the output directions v_i
    (mean best cosine > 0.95), each signed feature relu(+-a_i) has a latent whose activation follows it
    (correlation > 0.75 for 90% of them and median > 0.85; 0.82 and 0.91 measured), and the skip path pays:
    FVE of the MLP output above the same transcoder without one. Bugs caught: the target ignored (the latents
    reconstruct the input), input and target swapped, the skip path left out of the loss."""
    arrays, v, a = _planted_mlp()
    with_skip = _fit(arrays, tmp_path / "s").saes[0]
    without = _fit(arrays, tmp_path / "n", overrides=["sae.transcoder.skip=false"]).saes[0]
    dec = with_skip.export()[1]["W_dec"]
    assert mmcs(v, dec) > 0.95, mmcs(v, dec)
    x, y = (torch.from_numpy(arrays[k]) for k in ("mlp_in.0", "mlp.0"))
    with torch.no_grad():
        f = with_skip.encode(x)
    signed = torch.cat([a.clamp_min(0), (-a).clamp_min(0)], 1)  # [n, 2 x 48]
    cor = _corr(signed, f).max(1).values
    assert (cor > 0.75).float().mean() > 0.9 and cor.median() > 0.85, cor
    fve = [E.reconstruction_metrics(t, x, target=y)[0]["fve"] for t in (with_skip, without)]
    assert fve[0] > fve[1] + 0.02 and fve[0] > 0.8, fve
    with torch.no_grad():  # FVE of the MLP output, by hand
        assert fve[0] == pytest.approx(float(1 - (y - with_skip(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum()))


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlations [a's columns, b's columns]."""
    a = (a - a.mean(0)) / a.std(0).clamp_min(1e-8)
    b = (b - b.mean(0)) / b.std(0).clamp_min(1e-8)
    return a.t() @ b / (len(a) - 1)


def test_transcoder_beside_saes_equals_it_alone(tmp_path):
    """One stream feeds SAEs and transcoders: a transcoder trained beside SAEs on its own input and output sites
    is the one trained alone, and logs under its own name beside the SAE of the same MLP. Bugs caught: its
    initialisation depending on its place among the SAEs (a seed offset by its index), the transcoder and the SAE of
    one MLP logged under one name (Lightning refuses it); the planted test catches it reading the wrong site."""
    arrays, *_ = _planted_mlp(n=4096)
    both = _fit(arrays, tmp_path / "b", sae_sites=("mlp.0", "mlp_in.0"), steps=12)  # logged at step 10
    alone = _fit(arrays, tmp_path / "a", steps=12)
    assert [s.name for s in both.specs] == ["mlp.0", "mlp_in.0", "mlp.0"] and both.specs[2].in_site == "mlp_in.0"
    with open(tmp_path / "b" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        (logged,) = [row for row in csv.DictReader(f) if row.get("mlp.0/mse")]
    assert {"mlp.0/mse", "transcoder/mlp.0/mse"} <= set(logged)
    assert logged["mlp.0/mse"] != logged["transcoder/mlp.0/mse"]
    a, b = both.saes[2].state_dict(), alone.saes[0].state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_a_bad_target_stops_the_run_naming_the_transcoders_sites(tmp_path, value):
    """One entry of every 7th row of the transcoder's target (the MLP output) NaN or -inf, its input clean: the
    run stops naming both sites, at step 0. Bug caught: only the input checked, so the bad target is reported as
    the transcoder diverging (a non-finite loss)."""
    arrays, *_ = _planted_mlp(n=4096)
    arrays["mlp.0"][::7, 3] = value
    with pytest.raises(SfcdError, match=r"activations of site mlp_in.0 or mlp.0 at training step 0;"):
        _fit(arrays, tmp_path, steps=4)


def test_transcoder_stage_writes_sparsify_files_and_scores_the_splice(own_run):
    """``sfcd sae sae.transcoders=[mlp.1]`` beside an SAE: the transcoder under transcoders/step<N>/mlp.1/ in
    sparsify's layout, the SAE under saes/; its CE loss with the transcoder in place of the MLP equals the loss
    computed here with the MLP module's forward replaced by sparsify's own SparseCoder on the MLP's input; FVE
    is of the MLP output. Bugs caught: the splice reading the MLP's output instead of its input, FVE measured
    against the input, the transcoder written in the SAE layout or folder, the complete SAEs left out of the list
    of folders when others were trained (a study then lost its sites)."""
    from sparsify import SparseCoder
    from transformers import AutoTokenizer

    from sfcd.data.tokens import read_tokens
    from sfcd.sae.stage import train_saes

    over = [
        "experiment=test",
        f"run_dir={own_run.run_dir}",
        "sae.sites=[resid.0,attn.0]",  # resid.0 is complete in the shared run: skipped, and still listed
        "sae.transcoders=[mlp.1]",
        "sae.transcoder.d_sae=64",
        "sae.n_tokens=4096",
        "sae.eval_tokens=512",
        "sae.ce_tokens=256",
    ]
    folders = train_saes(compose(over))  # every folder asked for (the study reads its sites from them)
    assert [f.parent.parent.name + "/" + f.name for f in folders] == [
        "saes/resid.0",
        "saes/attn.0",
        "transcoders/mlp.1",
    ]
    tc_dir = folders[2]
    cfg = json.loads((tc_dir / "cfg.json").read_text())
    assert cfg["transcode"] and cfg["skip_connection"] and cfg["num_latents"] == 64
    assert cfg["sfcd"]["hook_name"] == "blocks.1.mlp.hook_in"
    m = json.loads((tc_dir / "metrics.json").read_text())
    assert m["site"] == "mlp.1" and m["input_site"] == "mlp_in.1" and m["d_sae"] == 64

    model, run = _model(own_run)
    tc = SparseCoder.load_from_disk(tc_dir)
    seq_len = own_run.model.seq_len
    val = torch.from_numpy(np.array(read_tokens(run.tokens("val")), dtype=np.int64))
    x = val[: 256 // seq_len * seq_len].view(-1, seq_len)
    special = torch.tensor(AutoTokenizer.from_pretrained(str(run.model_step(run.model_steps()[-1]))).all_special_ids)
    keep = ~torch.isin(x, special)[..., None]
    mlp = model.gpt_neox.layers[1].mlp
    plain = mlp.forward

    def ce():
        logits = model(x).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()

    with torch.no_grad():
        clean = ce()
        mlp.forward = lambda h: torch.where(keep, tc(h.flatten(0, 1)).sae_out.view_as(h), plain(h))
        try:
            spliced = ce()
        finally:
            del mlp.forward
    assert m["ce_clean"] == pytest.approx(clean, abs=1e-4)
    assert m["ce_sae"] == pytest.approx(spliced, abs=1e-4) and m["ce_sae"] != pytest.approx(clean, abs=1e-3)
    assert m["ce_zero"] > m["ce_clean"] and np.isfinite(m["fve"]) and m["l0"] <= 8 + 1e-6  # k of the test profile


def test_transcoder_settings_are_the_sae_settings_of_its_site_under_its_own():
    """A transcoder takes the SAE settings of its MLP site (sae.per_site by kind, then by name, over sae.*), then
    sae.transcoder's set ones; an expansion set there wins over the SAEs' d_sae. Bugs caught: per-site sizes
    ignored (a transcoder then differs in size from the SAE it is compared with), sae.transcoder not applied."""
    per_site = {"mlp": {"k": 3}, "mlp.1": {"d_sae": 48}}
    for extra, want in (
        ([], {"mlp.0": (64, 3), "mlp.1": (48, 3)}),
        (["sae.transcoder.k=5", "sae.transcoder.expansion=2"], {"mlp.0": (32, 5), "mlp.1": (32, 5)}),
    ):
        cfg = compose(["experiment=test", "sae.d_sae=null", "sae.expansion=4", "sae.k=7", *extra])
        cfg.sae.per_site = per_site
        specs = make_specs(cfg.sae, {}, {"mlp.0": 16, "mlp.1": 16})
        assert {s.name: (s.d_sae, s.hparams["k"]) for s in specs} == want
        assert [s.in_site for s in specs] == ["mlp_in.0", "mlp_in.1"]


def test_warm_start_reproduces_the_saved_transcoder(tmp_path):
    """sae.transcoder.init_from: a transcoder warm-started from a saved one computes the saved function, on data
    of another scale too (both scales unfolded). Bugs caught: the output scale not unfolded from W_dec, b_dec or
    W_skip, the SAE's warm start (load_sae) used, the biases' data initialisation left over the loaded ones."""
    arrays, *_ = _planted_mlp(n=4096)
    trained = _fit(arrays, tmp_path / "first", steps=8).saes[0]
    save_transcoder(trained, tmp_path / "tcs" / "mlp.0", {})
    cfg = compose(["sae.transcoder.d_sae=128", "sae.transcoder.k=4", f"sae.transcoder.init_from={tmp_path / 'tcs'}"])
    x = torch.from_numpy(arrays["mlp_in.0"][:100])
    for factor in (1.0, 3.0):  # another input and output scale
        module = SAEModule(make_specs(cfg.sae, {}, {"mlp.0": 32}), cfg.sae, 10)
        module.initialise({k: v * factor for k, v in arrays.items()})
        with torch.no_grad():
            torch.testing.assert_close(module.saes[0](x), trained(x), atol=1e-5, rtol=1e-4)
