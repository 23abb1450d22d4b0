"""Feature statistics against brute force, the features stage and its files, the notebook API, errors."""

import json

import numpy as np
import pytest
import torch

from sfcd.activations.harvest import token_windows
from sfcd.config import compose
from sfcd.data.tokens import read_tokens
from sfcd.errors import MissingArtifactError
from sfcd.features import api
from sfcd.features.collect import HIST_BINS, collect, feature_acts
from sfcd.features.stage import build_features
from sfcd.models.loading import load_model
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir
from sfcd.sae.io import load_sae


def test_streaming_statistics_equal_brute_force(test_run, test_saes):
    run = RunDir(test_run.run_dir)
    model, sae = load_model(run.root), load_sae(test_saes[1])  # mlp.1
    site = parse_site("mlp.1", model)
    windows = token_windows(read_tokens(run.tokens("val")), 32, 40)
    stats = collect(model, site, sae, windows, top_k=4, sample=8, batch=7)  # batches that do not divide evenly
    acts = feature_acts(model, site, sae, torch.from_numpy(windows)).flatten(0, 1)
    assert stats.n_tokens == acts.shape[0]
    assert torch.equal(stats.counts, (acts > 0).sum(0))
    torch.testing.assert_close(stats.maxs, acts.max(0).values)
    torch.testing.assert_close(stats.mean_act, acts.sum(0) / (acts > 0).sum(0).clamp_min(1), rtol=1e-4, atol=1e-5)
    top = acts.topk(4, dim=0)
    torch.testing.assert_close(stats.top_vals, top.values.t())
    firing = stats.top_vals > 0  # the stored positions hold those values (ties may pick other equal positions)
    cols = torch.arange(sae.d_sae)[:, None].expand_as(stats.top_pos)
    torch.testing.assert_close(acts[stats.top_pos[firing], cols[firing]], stats.top_vals[firing])
    assert torch.equal(stats.hist.sum(1), stats.counts) and stats.hist.shape[1] == HIST_BINS
    # the sample holds real firings of its feature, no more than the feature has
    for f in range(0, sae.d_sae, 17):
        ok = stats.sample_pos[f] >= 0
        assert int(ok.sum()) == min(8, int(stats.counts[f]))
        torch.testing.assert_close(stats.sample_vals[f][ok], acts[stats.sample_pos[f][ok], f])


def test_features_stage_writes_stats_dashboard_and_api(test_features, test_run, test_saes):
    from sfcd.features.dashboard import read_shard

    folders = test_features
    assert [f.name for f in folders] == ["mlp.1", "resid.0"]
    index = json.loads((folders[1] / "index.json").read_text())
    (shard,) = sorted((folders[1] / "feats").glob("shard_*.js"))  # 128 features: one file of 256
    data = read_shard(shard)
    feats = data["features"]
    assert len(feats) == 128 and index["summary"]["site"] == "resid.0" and index["d_sae"] == 128
    assert not (folders[1] / "features.json").exists()
    live = [f for f in feats if "dead" not in f["flags"]]
    assert live and all(f["density"] > 0 for f in live)
    assert all(f["density"] == 0 and not f["top"] for f in feats if "dead" in f["flags"])
    assert index["summary"]["dead"] == len(feats) - len(live)
    f = max(live, key=lambda r: r["max"])
    top = f["top"][0]
    assert top["acts"][top["at"]] == pytest.approx(f["max"], rel=1e-4)  # the window's marked token is the max
    assert len(f["top"]) <= 5 and len(f["samples"]) <= 3 and len(f["logits_pos"]) == 10
    assert [v for _, v in f["logits_pos"]] == sorted((v for _, v in f["logits_pos"]), reverse=True)
    rec = api.feature(test_run.run_dir, 24, "resid.0", f["id"])
    assert rec["top"][0]["tokens"][rec["top"][0]["at"]] == data["tokens"][str(top["ids"][top["at"]])]
    assert api.summary(test_run.run_dir, 24, "resid.0")["d_sae"] == 128
    with pytest.raises(MissingArtifactError, match="out of range"):
        api.feature(test_run.run_dir, 24, "resid.0", 999)
    html = (folders[1] / "index.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    # every feature's density and max against a brute-force count without sfcd's code: the stage's val windows
    # (consecutive, from the start), resid.0 read by a plain forward hook on block 0, special tokens left out, and
    # the saved SAE's tensors put through the TopK formula of its cfg.json by hand
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = RunDir(test_run.run_dir)
    model = AutoModelForCausalLM.from_pretrained(str(run.model_step(24))).eval()
    special = torch.tensor(AutoTokenizer.from_pretrained(str(run.model_step(24))).all_special_ids)
    T = test_run.model.seq_len
    n = 4096 // T  # the shared run's features.n_tokens
    x = torch.from_numpy(np.array(read_tokens(run.tokens("val"))[: n * T], dtype=np.int64)).view(n, T)
    seen = []
    handle = model.gpt_neox.layers[0].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    acts = seen[0][~torch.isin(x, special)]
    w = load_file(str(test_saes[0] / "sae_weights.safetensors"))
    k = json.loads((test_saes[0] / "cfg.json").read_text())["k"]
    pre = (acts - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    assert index["summary"]["n_tokens"] == len(acts) < n * T
    counts = (f > 0).sum(0).numpy()  # the index keeps 5 significant digits: the counts come back exactly
    assert np.array_equal(np.round(np.array(index["density"]) * len(acts)), counts) and counts.sum() > 0
    np.testing.assert_allclose(index["max"], f.max(0).values.numpy(), rtol=1e-4, atol=1e-6)


def test_contexts_equal_brute_force(test_run, test_saes):
    # catches: a window taken from the wrong sequence, feature or offset, or cut wrongly at a sequence's ends
    from sfcd.features.contexts import windows_for

    run = RunDir(test_run.run_dir)
    model, sae = load_model(run.root), load_sae(test_saes[0])
    site = parse_site("resid.0", model)
    windows = token_windows(read_tokens(run.tokens("val")), 16, 12)
    acts = feature_acts(model, site, sae, torch.from_numpy(windows))  # [12, 16, F]
    rng = np.random.default_rng(0)
    held = np.array([0, 3, 5, 7, 10, 11])  # sequences holding wanted positions: not contiguous, so chunks have gaps
    wanted = held[rng.integers(0, len(held), (sae.d_sae, 3))] * 16 + rng.integers(0, 16, (sae.d_sae, 3))
    wanted[::3, 1] = -1  # empty slots
    wanted[1, 0], wanted[2, 0] = 16 * 5, 16 * 7 + 15  # a sequence's first and last tokens
    ctx = windows_for(model, site, sae, windows, wanted, left=4, right=2, batch=4)
    for f in range(sae.d_sae):
        for c in range(3):
            p = int(wanted[f, c])
            got = ctx.window(f, c)
            if p < 0:
                assert got is None
                continue
            s, t = divmod(p, 16)
            lo, hi = max(0, t - 4), min(16, t + 3)
            assert got["ids"] == windows[s, lo:hi].tolist() and got["at"] == t - lo
            torch.testing.assert_close(
                torch.tensor(got["acts"], dtype=torch.float64), acts[s, lo:hi, f].double(), rtol=1e-4, atol=1e-6
            )


def test_token_feature_and_cluster_flags():
    from omegaconf import OmegaConf

    from sfcd.features.collect import FeatureStats
    from sfcd.features.contexts import Contexts
    from sfcd.features.stage import cluster_summary, feature_records
    from sfcd.sae.topk import TopKSAE

    F, windows = 3, np.array([[5, 5, 7, 5, 5, 9]])
    stats = FeatureStats(
        6,
        torch.tensor([5, 0, 1]),
        torch.ones(3),
        torch.ones(3),
        torch.zeros(3, HIST_BINS, dtype=torch.long),
        torch.zeros(3, 1),
        torch.full((3, 1), -1),
        torch.ones(3, 5),
        torch.tensor([[0, 1, 3, 4, 5], [-1] * 5, [2, -1, -1, -1, -1]]),
    )
    fc = OmegaConf.create({"ultra_low": 0.1, "token_feature": 0.8, "top_k": 1, "quantile_contexts": 0})
    logits = [torch.zeros(F, 1, dtype=torch.long)] * 2 + [torch.zeros(F, 1)] * 2
    logits = (logits[0], logits[2], logits[1], logits[3])
    empty = Contexts(np.full((F, 1, 1), -1, dtype=np.int32), np.zeros((F, 1, 1), dtype=np.float32), 0)
    recs = list(feature_records(stats, empty, logits, lambda i: f"t{i}", windows, fc))
    assert recs[0]["flags"] == ["token: t5"]  # 4 of 5 sampled firings on token 5
    assert recs[1]["flags"] == ["dead"] and recs[2]["flags"] == []
    sae = TopKSAE(4, 20, k=2)
    with torch.no_grad():  # 12 of 20 features share one encoder direction and fire rarely
        sae.W_enc[:, :12] = torch.tensor([1.0, 0.1, 0, 0])[:, None] + 0.05 * torch.randn(4, 12)
    density = torch.cat([torch.full((12,), 1e-5), torch.full((8,), 0.1)])
    s = cluster_summary(sae, density, 1e-4)
    assert s["cluster"] and s["ultra_low"] == 12 and s["ultra_low_cos_to_mean"] > 0.9


def test_features_errors(test_run, test_saes, tmp_path):
    import shutil

    # a checkpoint with no SAEs
    with pytest.raises(MissingArtifactError, match="no trained SAEs"):
        build_features(compose(["experiment=test", f"run_dir={test_run.run_dir}", "step=8"]))
    # a missing tokenizer
    run = RunDir(test_run.run_dir)
    copy = tmp_path / "copy"
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("activations", "last.ckpt"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / "model" / "step24" / name).unlink()
    with pytest.raises(MissingArtifactError, match="no tokenizer in"):
        build_features(compose(["experiment=test", f"run_dir={copy}"]))


def test_logit_effects_in_blocks_equal_the_whole_product(test_run):
    # catches: features misordered or dropped at block boundaries when [F, vocab] is computed block by block
    from sfcd.features.contexts import logit_effects
    from sfcd.models.loading import load_model
    from sfcd.models.sites import parse_site
    from sfcd.sae.topk import TopKSAE

    model = load_model(test_run.run_dir)
    sae = TopKSAE(32, 40, seed=3, k=4)
    site = parse_site("resid.1", model)
    effects = (sae.W_dec / sae.scale) @ model.get_output_embeddings().weight.t()
    pos_ids, pos_vals, neg_ids, neg_vals = logit_effects(model, site, sae, k=5, block=7)
    torch.testing.assert_close(pos_vals, effects.topk(5, dim=1).values)
    torch.testing.assert_close(neg_vals, -(-effects).topk(5, dim=1).values)
    assert torch.equal(pos_ids, effects.topk(5, dim=1).indices) and pos_ids.shape == (40, 5)


def test_wanted_positions_take_evenly_spaced_ranks_of_the_sample():
    # catches: quantile contexts from the wrong ranks (or from empty sample slots), top positions misplaced
    from omegaconf import OmegaConf

    from sfcd.features.collect import FeatureStats
    from sfcd.features.stage import wanted_positions

    rng = np.random.default_rng(0)
    F, R, k, q = 6, 9, 2, 3
    n_valid = [0, 1, 2, 3, 7, 9]  # samples each feature holds (the rest of its R slots are empty)
    vals = torch.from_numpy(rng.permutation(F * R).reshape(F, R).astype(np.float32))
    pos = torch.from_numpy(rng.permutation(10_000)[: F * R].reshape(F, R))
    for f, n in enumerate(n_valid):
        pos[f, n:] = -1
    top_pos = torch.from_numpy(rng.integers(0, 10_000, (F, k)))
    top_pos[0] = -1
    stats = FeatureStats(
        1, *(torch.zeros(F) for _ in range(3)), torch.zeros(F, 1), torch.zeros(F, k), top_pos, vals, pos
    )
    got = wanted_positions(stats, OmegaConf.create({"quantile_contexts": q}))
    assert got.shape == (F, k + q) and np.array_equal(got[:, :k], top_pos.numpy())
    for f, n in enumerate(n_valid):
        by_value = [int(p) for _, p in sorted(zip(vals[f, :n].tolist(), pos[f, :n].tolist(), strict=True))]
        ranks = {0: [], 1: [0], 2: [0, 1], 3: [0, 1, 2], 7: [0, 3, 6], 9: [0, 4, 8]}[n]  # lowest, middle, highest
        assert got[f, k:].tolist() == [by_value[r] for r in ranks] + [-1] * (q - len(ranks)), f
