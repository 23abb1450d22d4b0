"""The crosscoder stage on the test run: K checkpoints streamed on the same tokens, files, the joint view inside
each checkpoint's forward pass, circuits on shared latents, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sfcd.config import compose
from sfcd.errors import ConfigError, InputError

STEPS = [8, 16, 24]


def _cfg(test_run, *extra):
    return compose(
        [
            "experiment=test",
            f"run_dir={test_run.run_dir}",
            "crosscoder.sites=[resid.0]",
            f"crosscoder.steps=[{','.join(map(str, STEPS))}]",
            "crosscoder.n_tokens=8192",
            "crosscoder.buffer_tokens=4096",
            "crosscoder.eval_tokens=2048",
            "crosscoder.ce_tokens=512",
            "crosscoder.checkpoint_every=2",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def test_run(_shared_run, tmp_path_factory):
    """This module's own copy of the shared run: the crosscoder stage writes ``crosscoders/`` into its run."""
    import shutil

    run_dir = tmp_path_factory.mktemp("crosscoder_run") / "run"
    shutil.copytree(_shared_run[0].run_dir, run_dir)
    return compose(["experiment=test", f"run_dir={run_dir}"])


@pytest.fixture(scope="module")
def crosscoder_folder(test_run):
    from sfcd.crosscoders.stage import train_crosscoders

    return train_crosscoders(_cfg(test_run))[0]


def _models(test_run, steps):
    from sfcd.models.loading import load_model

    return [load_model(test_run.run_dir, s) for s in steps]


def test_stage_writes_a_loadable_crosscoder_and_its_reading(test_run, crosscoder_folder):
    from sfcd.crosscoders.io import load_crosscoder
    from sfcd.crosscoders.stage import train_crosscoders
    from sfcd.io import read_json

    cc = load_crosscoder(crosscoder_folder)
    assert cc.cfg["steps"] == STEPS and cc.cfg["site"] == "resid.0" and cc.n_blocks == 3
    latents = read_json(crosscoder_folder / "latents.json")
    rows = latents["per_checkpoint"]
    assert [r["step"] for r in rows] == STEPS
    for r in rows:
        assert np.isfinite(r["fve"]) and np.isfinite(r["ce_loss_score"])
    # the reading, recomputed from the saved weights (decoder norms [d_sae, K]) and densities: a live latent (fired
    # on the evaluation tokens) is present at checkpoint m when its norm there is >= 0.3 x its largest, and emerged
    # at m when present at m and every later checkpoint but not at m - 1. Bugs caught: presence against another
    # latent's or the sum's norm, shares over dead latents, emergence counted from the first presence.
    from safetensors.torch import load_file

    norms = load_file(str(crosscoder_folder / "crosscoder_weights.safetensors"))["W_dec"].norm(dim=2)
    live = load_file(str(crosscoder_folder / "latents.safetensors"))["density"] > 0
    assert latents["n_live"] == int(live.sum()) > 0
    present = (norms >= 0.3 * norms.max(1, keepdim=True).values)[live]
    for m, r in enumerate(rows):
        assert r["present"] == pytest.approx(present[:, m].float().mean().item(), abs=1e-6), m
        emerged = present[:, m:].all(1) & (~present[:, m - 1] if m else True)
        assert latents["emerged_at"][str(STEPS[m])] == int(emerged.sum()), m
    for s in STEPS:
        assert (crosscoder_folder / f"step{s}" / "sae_weights.safetensors").exists()
    assert (crosscoder_folder / "latents.png").stat().st_size > 1000
    before = (crosscoder_folder / "metrics.json").stat().st_mtime_ns
    train_crosscoders(_cfg(test_run))  # complete: skipped
    assert (crosscoder_folder / "metrics.json").stat().st_mtime_ns == before


def test_stream_rows_are_the_same_tokens_at_every_checkpoint(test_run):
    """Bug caught: checkpoints harvested over different windows (a seed, an exclusion or an order differing
    per source), which would pair one token's activation at step 8 with another token's at step 24."""
    from sfcd.activations.stream import ConcatSource, HarvestSource
    from sfcd.data.tokens import read_tokens
    from sfcd.models.sites import parse_site
    from sfcd.paths import RunDir

    run = RunDir(test_run.run_dir)
    tokens = read_tokens(run.tokens("train"))
    site = parse_site("resid.0")
    m8, m24 = _models(test_run, [8, 24])
    d = m8.config.hidden_size

    def src(m):
        return HarvestSource(m, tokens, [site], {"resid.0": d}, 32, 2048, seed=3, exclude_ids={0})

    same = ConcatSource([src(m24), src(m24)]).chunk(1)["resid.0"]
    assert torch.equal(same[:, :d], same[:, d:])  # the same model twice: identical blocks
    joined = ConcatSource([src(m8), src(m24)]).chunk(1)["resid.0"]
    assert torch.equal(joined[:, :d], src(m8).chunk(1)["resid.0"])
    assert torch.equal(joined[:, d:], same[:, :d])


def test_joint_view_is_the_crosscoder_inside_each_checkpoint_forward(test_run, crosscoder_folder):
    """The view of checkpoint m, spliced into m's model, encodes what the crosscoder encodes from the K models'
    activations on the same tokens, computed here separately with run_with_cache. Two batches in turn: the
    other checkpoints' terms follow the tokens (a stale cache would fail the second)."""
    from sfcd.crosscoders.io import load_crosscoder
    from sfcd.crosscoders.view import JointView
    from sfcd.models.sites import hooks, parse_site, run_with_cache

    cc = load_crosscoder(crosscoder_folder)
    site = parse_site("resid.0")
    models = _models(test_run, STEPS)
    g = torch.Generator().manual_seed(0)
    m = 1
    view = JointView(cc, m, site, {j: models[j] for j in range(3) if j != m})
    handle = view.attach(models[m])
    try:
        for _ in range(2):
            ids = torch.randint(5, 200, (3, 12), generator=g)
            seen = {}

            def grab(a, seen=seen):
                seen["f"] = view.encode(a)

            with torch.no_grad(), hooks(models[m], {site: grab}):
                models[m](ids)
            acts = torch.cat([run_with_cache(md, ids, [site])["resid.0"] for md in models], dim=-1)
            want = cc.encode(acts)
            assert torch.allclose(seen["f"], want, atol=1e-5)
            assert torch.allclose(
                view.decode(want), cc.decode(want)[..., m * cc.d : (m + 1) * cc.d], atol=1e-5
            )  # decode: block m in raw units
    finally:
        handle.remove()
    with pytest.raises(Exception, match="forward pass"):
        view.encode(torch.zeros(2, 5, cc.d))  # not from its model's forward: a clear error


def test_circuit_on_shared_latents_follows_the_same_ids(test_run, crosscoder_folder, tmp_path):
    """The circuit stage takes the crosscoder as the dictionary at any of its checkpoints; the last circuit's
    latent ids are then scored at an earlier checkpoint."""
    from sfcd.circuits.stage import faithfulness_of, find_circuit
    from sfcd.io import read_json

    common = [
        f"circuit.dictionaries={crosscoder_folder.parent}",
        "circuit.sites=[resid.0]",
        "circuit.method=attrib",
        "circuit.baselines=false",
        "circuit.edges=false",
    ]
    outs = {}
    for s in (16, 24):
        cfg = _cfg(test_run, f"step={s}", f"circuit.out_dir={tmp_path / str(s)}", *common)
        outs[s] = read_json(find_circuit(cfg) / "circuit.json")
    ids = {n["id"] for n in outs[24]["nodes"] if n["feature"] is not None}
    assert all(i.startswith("resid.0/") for i in ids)
    assert outs[24]["metadata"]["dictionaries"]["resid.0"] == str(crosscoder_folder)
    assert all(n["label"] == "" for n in outs[24]["nodes"])  # the run's SAE dashboards do not describe latents
    r = faithfulness_of(_cfg(test_run, *common), 16, "nounpp", ids)
    # F(M) and F(empty) at step 16, recomputed with plain torch hooks on the step-16 model, no sfcd circuit code: the
    # metric (logit of the clean answer minus the patch answer's, last position) on the evaluation rows the circuit
    # names; empty = resid.0's output set to its mean over those rows' patch prefixes, position by position (with
    # every latent and the error node at their means, the affine decoder gives back the mean of the stream). Catches
    # faithfulness_of scoring another checkpoint, other pairs, or the clean prefixes' mean.
    from sfcd.data.tasks import load_task
    from sfcd.models.loading import load_tokenizer
    from sfcd.paths import RunDir

    run = RunDir(test_run.run_dir)
    ev = outs[24]["metadata"]["pairs"]["evaluation"]
    model = _models(test_run, [16])[0]
    task = load_task(Path(ev["file"]), load_tokenizer(run.root), "nounpp")
    pairs = [p for p in task.pairs if p.index in set(ev["rows"])]
    assert len(pairs) == ev["n"] > 1 and len({len(p.clean_ids) for p in pairs}) == 1
    clean = torch.tensor([p.clean_ids for p in pairs])
    patch = torch.tensor([p.patch_ids for p in pairs])
    rows = torch.arange(len(pairs))
    ca, pa = torch.tensor([p.clean_answer for p in pairs]), torch.tensor([p.patch_answer for p in pairs])
    layer = model.gpt_neox.layers[0]
    seen = {}
    h = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("x", (o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(patch)
    h.remove()
    mean = seen["x"].mean(0, keepdim=True)

    def metric(replace: bool) -> float:
        def hook(m, i, o):
            if not replace:
                return None
            first = mean.expand_as(o[0] if isinstance(o, tuple) else o)
            return (first, *o[1:]) if isinstance(o, tuple) else first

        h = layer.register_forward_hook(hook)
        with torch.no_grad():
            logits = model(clean).logits[:, -1]
        h.remove()
        return (logits[rows, ca] - logits[rows, pa]).mean().item()

    F_M, F_empty = metric(False), metric(True)
    assert abs(F_M - F_empty) > 1e-4  # the two cases differ, so each check below can fail
    assert r["F_M"] == pytest.approx(F_M, abs=1e-5)
    assert r["F_empty"] == pytest.approx(F_empty, abs=1e-5)
    f = r["faithfulness"]  # the micro model is near chance: reported only where F(M) - F(empty) is resolvable
    if r["resolvable"]:
        assert f == pytest.approx((r["F_C"] - F_empty) / (F_M - F_empty), rel=1e-4)
    else:
        assert f is None and r["completeness"] is None
    with pytest.raises(Exception, match="not one of them"):
        find_circuit(_cfg(test_run, "step=0", f"circuit.out_dir={tmp_path / '0'}", *common))


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("crosscoder.steps=[8,8,24]", ConfigError, "more than once"),
        ("crosscoder.steps=[24]", ConfigError, "K >= 2"),
        ("crosscoder.steps=[24,8]", ConfigError, "training order"),
        ("crosscoder.sites=[resid.7]", ConfigError, "unknown site"),
        ("crosscoder.steps=[8,999]", InputError, "not checkpoints"),
        ("crosscoder.architecture=relu", ConfigError, "batchtopk"),
    ],
)
def test_bad_input_is_a_one_line_error(test_run, override, error, message):
    from sfcd.crosscoders.stage import train_crosscoders

    with pytest.raises(error, match=message) as e:
        train_crosscoders(_cfg(test_run, override))
    assert "\n" not in str(e.value)


def test_checkpoints_of_different_widths_are_refused():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from sfcd.crosscoders.stage import _sites_and_width

    def tiny(h):
        c = GPTNeoXConfig(
            vocab_size=50, hidden_size=h, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * h
        )
        return GPTNeoXForCausalLM(c)

    c = compose(["experiment=test", "crosscoder.sites=[resid.0]"]).crosscoder
    with pytest.raises(InputError, match=r"different widths across checkpoints \{1: 16, 2: 32\}"):
        _sites_and_width(c, [tiny(16), tiny(32)], [1, 2])


def test_interrupted_training_resumes_to_the_uninterrupted_crosscoder(test_run, caplog):
    """Bug caught: a resumed crosscoder that restarts its stream, its shuffle or its per-checkpoint scales
    instead of continuing (the state is the SAE loop's; the joined K-checkpoint stream must continue too)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    from sfcd.crosscoders.stage import train_crosscoders
    from tests.crash import Crash, CrashAt

    cfg = _cfg(test_run, "crosscoder.sites=[resid.1]")
    folder = Path(test_run.run_dir) / "crosscoders" / "resid.1"
    with pytest.raises(Crash):
        train_crosscoders(cfg, [CrashAt(3)])
    assert not (folder / "metrics.json").exists()
    with caplog.at_level("INFO", logger="sfcd.sae.train"):
        train_crosscoders(cfg)
    assert "resuming SAE training" in caplog.text  # it continued from the saved state, not from scratch
    resumed = load_file(str(folder / "crosscoder_weights.safetensors"))
    shutil.rmtree(folder)
    train_crosscoders(cfg)
    whole = load_file(str(folder / "crosscoder_weights.safetensors"))
    for name, t in whole.items():
        assert torch.equal(resumed[name], t), name


def test_without_steps_the_crosscoder_reads_the_study_steps_chosen_from_the_train_log(tmp_path):
    """A planted train log whose choice is known by hand: nounpp at chance to step 4, 0.7 at step 8 (crosses
    0.6), 0.95 from step 16 (crosses 0.9). With study.max_steps=3 the study keeps the checkpoint before
    learning (4: the last one at most 8 / 1.5), the last (24) and the one place left to the crossing of the
    highest threshold (16, over 8); simple, never learned, adds nothing. Catches: an empty crosscoder.steps and
    study.steps (the defaults) read as K = 0 instead of the study's checkpoints, or steps taken from elsewhere
    than the train log's choice."""
    import json

    from sfcd.crosscoders.stage import crosscoder_steps
    from sfcd.io import write_csv

    acc = {0: 0.5, 1: 0.5, 2: 0.45, 4: 0.5, 8: 0.7, 16: 0.95, 24: 0.96}
    rows = [{"step": s, "nounpp_accuracy": a, "simple_accuracy": 0.5} for s, a in acc.items()]
    write_csv(tmp_path / "model" / "train_log.csv", rows, ["step", "nounpp_accuracy", "simple_accuracy"])
    cfg = compose(["experiment=test", f"run_dir={tmp_path}", "study.steps=[]", "study.max_steps=3"])
    assert crosscoder_steps(cfg) == [4, 16, 24]
    assert json.loads((tmp_path / "development" / "study_steps.json").read_text())["steps"] == [4, 16, 24]


def test_stage_saves_block_means_lifecycle_and_latent_scaling(test_run, crosscoder_folder):
    """The block means saved with the crosscoder are each checkpoint's mean activation over the first
    crosscoder.scaling_tokens rows of the training tokens (computed here separately: windows in file order,
    special tokens left out, one model at a time); the SAELens folders are checkpoint m alone; latents.json counts
    every live latent in the onset histogram and reports support counts. Bugs caught: means in scaled units, from
    another stream or another model's block; the lifecycle histogram dropping latents absent at the end."""
    from safetensors.torch import load_file

    from sfcd.crosscoders.io import load_crosscoder
    from sfcd.data.tokens import read_tokens
    from sfcd.io import read_json
    from sfcd.models.sites import parse_site, run_with_cache
    from sfcd.paths import RunDir

    cc = load_crosscoder(crosscoder_folder)
    assert cc.has_block_means()
    cfg = _cfg(test_run)
    n, seq = int(cfg.crosscoder.scaling_tokens), int(cfg.sae.seq_len or cfg.model.seq_len)
    tokens = read_tokens(RunDir(test_run.run_dir).tokens("train"))
    excl = torch.tensor(sorted(cc.cfg["exclude_special_tokens"]))
    ids = torch.from_numpy(np.asarray(tokens[: 2 * n], dtype=np.int64)[: (2 * n // seq) * seq].reshape(-1, seq))
    keep = ~torch.isin(ids, excl).flatten()
    for m, model in enumerate(_models(test_run, STEPS)):
        a = run_with_cache(model, ids, [parse_site("resid.0")])["resid.0"].flatten(0, 1)[keep][:n]
        assert torch.allclose(cc.block_mean.view(3, cc.d)[m], a.mean(0), atol=1e-4), m
    sae = load_file(str(crosscoder_folder / "step16" / "sae_weights.safetensors"))
    assert torch.allclose(sae["b_enc"], cc.alone_bias(1), atol=1e-5)
    latents = read_json(crosscoder_folder / "latents.json")
    assert sum(latents["onset_at"].values()) == latents["n_live"]
    assert latents["latent_scaling"]["tokens"] == n
    assert latents["latent_scaling_support"]["median"] > 0
    t = load_file(str(crosscoder_folder / "latents.safetensors"))
    for key in ("onset", "offset", "transient", "gaps", "reldec_bin", "nu_eps", "nu_r", "nu_eps_lo", "support"):
        assert key in t, key
    assert int(t["support"].sum()) > 0
