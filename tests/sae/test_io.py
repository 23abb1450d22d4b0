"""SAE files: the SAELens layout round trip, and reading dictionary_learning and sparsify directories."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sfcd.errors import InputError, MissingArtifactError
from sfcd.sae.io import load_sae, save_sae
from sfcd.sae.registry import ARCHITECTURES


def trained_like(arch: str, d_in=12, d_sae=40, seed=0):
    """An SAE with random (non-initial) parameters and a non-trivial input scale."""
    sae = ARCHITECTURES[arch](d_in, d_sae, seed=seed, k=5, l1_coeff=1.0, l0_coeff=1.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        sae.scale.fill_(2.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.05)
    return sae.eval()


# (transcoders have no SAELens file: sparsify's layout, tests/sae/test_transcoders.py)
@pytest.mark.parametrize("arch", sorted(a for a, c in ARCHITECTURES.items() if not c.is_transcoder))
def test_saelens_round_trip_folds_the_scale(arch, tmp_path):
    sae = trained_like(arch)
    x = torch.randn(50, 12) * 3
    save_sae(sae, tmp_path / "s", {"sfcd_site": "resid.1"}, density=torch.rand(40))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"] >= "6.0.0"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["architecture"] == (sae.saelens_architecture or arch) in ("standard", "topk", "jumprelu")
    loaded = load_sae(tmp_path / "s")
    assert float(loaded.scale) == 1.0
    with torch.no_grad():
        # batchtopk is exported as a JumpReLU: its inference threshold replaces the batch top-k
        expected_f = sae.activation(sae.pre_acts(x * sae.scale)) if arch == "batchtopk" else sae.encode(x)
        torch.testing.assert_close(loaded.encode(x), expected_f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.decode(expected_f), sae.decode(expected_f), atol=1e-5, rtol=1e-5)


def test_files_load_in_saelens_unchanged(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(20, 12) * 3
    for arch in ("relu", "topk", "jumprelu", "batchtopk"):
        sae = trained_like(arch)
        save_sae(sae, tmp_path / arch, {"sfcd_site": "mlp.0"})
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch), device="cpu")
        ours = load_sae(tmp_path / arch)
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), atol=1e-5, rtol=1e-5)


def test_dictionary_learning_autoencoder_formula(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, m = 10, 30
    state = {
        "bias": torch.randn(d, generator=g),
        "encoder.weight": torch.randn(m, d, generator=g),
        "encoder.bias": torch.randn(m, generator=g),
        "decoder.weight": torch.randn(d, m, generator=g),
    }
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(
        json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": d, "dict_size": m}, "buffer": {}})
    )
    sae = load_sae(tmp_path)
    x = torch.randn(7, d, generator=g)
    f = torch.relu((x - state["bias"]) @ state["encoder.weight"].t() + state["encoder.bias"])
    x_hat = f @ state["decoder.weight"].t() + state["bias"]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae(x), x_hat)


def test_dictionary_learning_topk_and_sparsify_formula(tmp_path):
    g = torch.Generator().manual_seed(1)
    d, m, k = 8, 24, 3
    enc_w, enc_b = torch.randn(m, d, generator=g), torch.randn(m, generator=g)
    W_dec, b_dec = torch.randn(m, d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(9, d, generator=g)
    pre = torch.relu((x - b_dec) @ enc_w.t() + enc_b)
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    # sparsify
    sp = tmp_path / "sparsify" / "layers.3"
    sp.mkdir(parents=True)
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}, str(sp / "sae.safetensors")
    )
    (sp / "cfg.json").write_text(json.dumps({"k": k, "expansion_factor": 3}))
    # dictionary_learning AutoEncoderTopK
    dl = tmp_path / "dl"
    dl.mkdir()
    torch.save(
        {
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "decoder.weight": W_dec.t().contiguous(),
            "b_dec": b_dec,
            "k": torch.tensor(k),
        },
        dl / "ae.pt",
    )
    (dl / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "k": k}}))
    for folder in (sp, dl):
        sae = load_sae(folder)
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(x), f)
            torch.testing.assert_close(sae(x), f @ W_dec + b_dec)


def test_bad_files_are_clear_errors(tmp_path):
    sae = trained_like("topk")
    save_sae(sae, tmp_path / "ok", {"sfcd_site": "resid.0"})
    # corrupt weights
    bad = tmp_path / "corrupt"
    save_sae(sae, bad, {})
    (bad / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_sae(bad)
    # foreign tensors (a sparsify file renamed into the SAELens layout)
    foreign = tmp_path / "foreign"
    save_sae(sae, foreign, {})
    save_file({"encoder.weight": torch.zeros(3, 2)}, str(foreign / "sae_weights.safetensors"))
    with pytest.raises(InputError, match="another kind"):
        load_sae(foreign)
    # cfg.json missing keys
    nokeys = tmp_path / "nokeys"
    save_sae(sae, nokeys, {})
    cfg = json.loads((nokeys / "cfg.json").read_text())
    del cfg["d_sae"]
    (nokeys / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"lacks keys \['d_sae'\]"):
        load_sae(nokeys)
    # a folder with no SAE, and none at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no SAE"):
        load_sae(tmp_path / "empty")
    with pytest.raises(MissingArtifactError):
        load_sae(tmp_path / "nope")
    # a pickle that is not weights-only is refused
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"fn": print}, evil / "ae.pt")
    (evil / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(InputError, match="weights-only"):
        load_sae(evil)


def test_reference_comparison_table(tmp_path):
    from sfcd.io import write_json
    from sfcd.sae.reference import write_comparison

    folders = []
    for seed in (0, 1):
        sae = trained_like("relu", d_in=8, d_sae=20, seed=seed)
        with torch.no_grad():  # 10 rare features sharing one encoder direction, as in the reference's finding
            sae.W_enc[:, :10] = torch.tensor([1.0] + [0.0] * 7)[:, None] + 0.01 * torch.randn(8, 10)
        density = torch.cat([torch.full((10,), 1e-5), torch.zeros(2), torch.full((8,), 0.05)])
        folder = tmp_path / f"mlp_act.0@seed={seed}"
        save_sae(sae, folder, {"sfcd_site": "mlp_act.0"}, density=density)
        write_json(
            folder / "metrics.json",
            {
                "ce_loss_score": 0.9,
                "l0": 5.0,
                "d_in": 8,
                "d_sae": 20,
                "site": "mlp_act.0",
                "architecture": "relu_reference",
                "hparams": {
                    "l1_coeff": 3e-4,
                    "resample_every": 30000,
                    "resample_tokens": 3276800,
                    "resample_density": 10**-5.5,
                    "schedule_scale": 0.01,
                },
                "training": {
                    "seed": seed,
                    "batch_size": 4096,
                    "betas": [0.9, 0.99],
                    "warmup_frac": 0.0,
                    "decay_frac": 0.0,
                    "grad_clip": 0.0,
                    "buffer_tokens": 262144,
                    "buffer_dtype": "bfloat16",
                    "precision": "32-true",
                },
                "lr": 1e-4,
                "train_tokens": 2_000_000,
            },
        )
        folders.append(folder)
    md = write_comparison(folders, tmp_path).read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[2:] for line in md.splitlines() if " | " in line}
    # catches: a recipe row judged "same" where the run scales the schedule or changes a setting, and the reverse
    assert rows["initialisation"] == ["the same draws from a generator seeded with sae.seed (0)", "same |"]
    for same in ("inputs", "loss", "optimizer", "batch", "decoder", "precision"):
        assert rows[same][-1] == "same |", same
    assert rows["resampling"][0].startswith("every 300 steps: features with density < 3.16e-06 over 32,768 fresh")
    assert rows["resampling"][-1] == rows["run length"][-1] == "run length |"
    assert rows["dictionary"][-1] == rows["buffer"][-1] == "recipe |"  # 2.5x here; chunks replaced whole
    assert rows["model"][-1] == "model and corpus |"
    assert "| dead_fraction | no dead features | 0.100, 0.100 |" in md
    assert "| ultra_low_fraction | over half of the features (density < 1e-4) | 0.500, 0.500 |" in md
    stats = json.loads((tmp_path / "reference_comparison.json").read_text())
    assert stats["stats"][0]["cluster_cos_to_mean"] > 0.99 and stats["cross_seed_cluster_cos"] > 0.99


def _dl_folder(tmp_path, name, cls, state, trainer=None):
    folder = tmp_path / name
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, **(trainer or {})}}))
    return folder


@pytest.mark.parametrize("threshold", [0.4, -1.0])
def test_dictionary_learning_batchtopk_and_matryoshka_formula(tmp_path, threshold):
    # their inference formulas (dictionary_learning trainers/batch_top_k.py, matryoshka_batch_top_k.py):
    #   f = relu(W_enc (x - b_dec) + b_enc) * (relu(...) > threshold)   [Matryoshka: latents past the groups = 0]
    #   x_hat = f @ W_dec + b_dec.  Catches: the threshold applied before the relu (wrong when it is -1, the value
    #   of an untrained or a never-updated SAE), b_dec not subtracted, latents past the last group firing.
    g = torch.Generator().manual_seed(2)
    d, m = 8, 24
    W_enc, b_enc = torch.randn(d, m, generator=g), torch.randn(m, generator=g)
    W_dec, b_dec = torch.randn(m, d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(11, d, generator=g)
    post = torch.relu((x - b_dec) @ W_enc + b_enc)
    f = post * (post > threshold)
    th = torch.tensor(threshold)
    btk = _dl_folder(
        tmp_path,
        "btk",
        "BatchTopKSAE",
        {
            "k": torch.tensor(4, dtype=torch.int),
            "threshold": th,
            "encoder.weight": W_enc.t().contiguous(),
            "encoder.bias": b_enc,
            "decoder.weight": W_dec.t().contiguous(),
            "b_dec": b_dec,
        },
    )
    sizes = torch.tensor([4, 8, 8])  # 20 of 24 latents in groups
    mat = _dl_folder(
        tmp_path,
        "mat",
        "MatryoshkaBatchTopKSAE",
        {
            "k": torch.tensor(4, dtype=torch.int),
            "threshold": th,
            "group_sizes": sizes,
            "W_enc": W_enc,
            "b_enc": b_enc,
            "W_dec": W_dec,
            "b_dec": b_dec,
        },
    )
    f_mat = f.clone()
    f_mat[:, 20:] = 0
    for folder, expect in ((btk, f), (mat, f_mat)):
        sae = load_sae(folder)
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(x), expect)
            torch.testing.assert_close(sae(x), expect @ W_dec + b_dec)
    assert f_mat[:, :20].count_nonzero() > 0 and f[:, 20:].count_nonzero() > 0  # the cut is visible


def test_sparsify_groupmax_formula_and_transcoders_refused(tmp_path):
    # sparsify's fused_encoder: pre = relu(encoder(x - b_dec)); groupmax keeps each of k contiguous groups'
    # maximum. Catches: groupmax read as top-k (a different function), a transcoder loaded as an SAE.
    g = torch.Generator().manual_seed(3)
    d, m, k = 6, 24, 4
    enc_w, enc_b = torch.randn(m, d, generator=g), torch.randn(m, generator=g)
    W_dec, b_dec = torch.randn(m, d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(9, d, generator=g)
    pre = torch.relu((x - b_dec) @ enc_w.t() + enc_b)
    f = torch.zeros_like(pre)
    for j in range(k):
        block = pre[:, j * 6 : (j + 1) * 6]
        v, i = block.max(dim=1)
        f[torch.arange(len(x)), j * 6 + i] = v
    tensors = {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}
    gm = tmp_path / "gm"
    gm.mkdir()
    save_file(tensors, str(gm / "sae.safetensors"))
    (gm / "cfg.json").write_text(json.dumps({"k": k, "activation": "groupmax"}))
    sae = load_sae(gm)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae(x), f @ W_dec + b_dec)
        topk = torch.zeros_like(pre).scatter(-1, pre.topk(k).indices, pre.topk(k).values)
        assert not torch.allclose(sae.encode(x), topk)
    tc = tmp_path / "tc"
    tc.mkdir()
    save_file(tensors, str(tc / "sae.safetensors"))
    (tc / "cfg.json").write_text(json.dumps({"k": k, "transcode": True}))
    with pytest.raises(InputError, match="transcoder"):
        load_sae(tc)
    (gm / "cfg.json").write_text(json.dumps({"k": k, "activation": "sigmoid"}))
    with pytest.raises(InputError, match="activation 'sigmoid' is not supported"):
        load_sae(gm)
