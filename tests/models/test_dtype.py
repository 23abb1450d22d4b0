"""The real target's checkpoints as the hub stores them: float16 safetensors in a series of ``step<N>/`` folders.

Every stage reads them through ``model.source`` + ``step`` in ``model.dtype`` (float32 by default), records which
checkpoint it used, and says in one line what it cannot use. The expected values are computed here from the
stored tensors, upcast by hand, without sfcd's loading code."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from sfcd.config import compose
from sfcd.errors import ConfigError, MissingArtifactError
from sfcd.paths import RunDir


@pytest.fixture(scope="module")
def series(test_run, tmp_path_factory):
    """``series/step<N>/``: the test run's last two checkpoints stored in float16 with their tokenizer, as Pythia's
    hub revisions are, plus ``step<last+1>``, a byte-identical copy of the last (Pythia's step0 and step1)."""
    from sfcd.models.loading import load_model, load_tokenizer

    run = RunDir(test_run.run_dir)
    steps = run.model_steps()[-2:]
    root = tmp_path_factory.mktemp("fp16") / "series"
    for st in steps:
        m = load_model(run.root, st).half()
        m.save_pretrained(root / f"step{st}")
        load_tokenizer(run.root, st).save_pretrained(root / f"step{st}")
    shutil.copytree(root / f"step{steps[-1]}", root / f"step{steps[-1] + 1}")
    return root, steps


def upcast_by_hand(folder) -> GPTNeoXForCausalLM:
    """The stored float16 tensors, upcast to float32, in a model built from the config: no from_pretrained."""
    cfg = json.loads((folder / "config.json").read_text())
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in cfg.items() if k not in ("dtype", "torch_dtype")}))
    with safe_open(folder / "model.safetensors", "pt") as f:
        # Pythia's files call the unembedding embed_out; transformers 5's module is lm_head
        state = {k.replace("embed_out.", "lm_head."): f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.float().eval()


def test_series_is_stored_as_the_hub_stores_pythia(series):
    root, steps = series
    folder = root / f"step{steps[-1]}"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118


def test_eval_reads_a_float16_series_by_step_in_float32(series, own_run):
    """Bug caught: eval refusing model.source + step, or scoring in the stored float16 (different logits)."""
    from sfcd.models.eval_stage import evaluate_checkpoint

    root, steps = series
    out = evaluate_checkpoint(
        compose(
            [
                "experiment=test",
                f"run_dir={own_run.run_dir}",
                f"model.source={root}",
                f"step={steps[0]}",
                "tasks=[simple]",
            ]
        )
    )
    prov = out["sfcd_model"]
    assert (prov["stored_dtype"], prov["dtype"], prov["step"]) == ("float16", "float32", steps[0])
    assert prov["path"].endswith(f"step{steps[0]}")
    # the same accuracy and logit difference from the upcast tensors, scored pair by pair here
    from sfcd.data.tasks import load_task
    from sfcd.models.eval_stage import task_path
    from sfcd.models.loading import load_tokenizer

    model = upcast_by_hand(root / f"step{steps[0]}")
    task = load_task(task_path(RunDir(own_run.run_dir), "simple"), load_tokenizer(root, steps[0]), "simple")
    diffs = []
    with torch.no_grad():
        for p in task.pairs:
            lc = model(torch.tensor([p.clean_ids])).logits[0, -1]
            lp = model(torch.tensor([p.patch_ids])).logits[0, -1]
            diffs += [float(lc[p.clean_answer] - lc[p.patch_answer]), float(lp[p.patch_answer] - lp[p.clean_answer])]
    assert out["simple"]["accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))
    # one checkpoint folder given alone, no step: the same scores, written under the folder's name
    lone = evaluate_checkpoint(
        compose(
            [
                "experiment=test",
                f"run_dir={own_run.run_dir}",
                f"model.source={root / f'step{steps[0]}'}",
                "tasks=[simple]",
            ]
        )
    )
    assert lone["simple"] == out["simple"]
    assert (RunDir(own_run.run_dir).root / "eval" / f"step{steps[0]}.json").exists()
    assert out["simple"]["logit_diff"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4, abs=1e-4)


def test_sae_features_and_circuit_on_a_float16_checkpoint(series, test_run, tmp_path):
    """Bug caught: features' logit effects and the circuit's layer norms crashing on a float16-stored model
    (float != Half), and SAEs that do not record which checkpoint they belong to."""
    from sfcd.circuits.stage import find_circuit
    from sfcd.features.stage import build_features
    from sfcd.sae.io import load_sae
    from sfcd.sae.stage import train_saes

    root, steps = series
    step = steps[-1]
    shutil.copytree(RunDir(test_run.run_dir).corpus, tmp_path / "corpus")  # tokens and tasks, no model/
    base = ["experiment=test", f"run_dir={tmp_path}", f"model.source={root}", f"step={step}"]
    folders = train_saes(compose([*base, "sae.sites=[resid.0]", "sae.n_tokens=4096", "sae.eval_tokens=1024"]))
    meta = json.loads((folders[0] / "cfg.json").read_text())["metadata"]["sfcd_model"]
    assert (meta["stored_dtype"], meta["dtype"], meta["step"], meta["revision"]) == ("float16", "float32", step, None)
    assert len(meta["weights_sha256"]) == 64

    out = build_features(compose([*base, "features.n_tokens=2048", "features.top_k=3", "features.quantile_contexts=2"]))
    from sfcd.features import api

    sae = load_sae(folders[0])
    W_U = upcast_by_hand(root / f"step{step}").lm_head.weight.detach()  # [vocab, d]
    f = next(x for x in range(sae.d_sae) if api.feature(tmp_path, step, "resid.0", x, text=False)["top"])
    expected = (sae.W_dec[f].detach() / sae.scale) @ W_U.t()
    top_id, top_val = api.feature(tmp_path, step, "resid.0", f, text=False)["logits_pos"][0]
    assert int(expected.argmax()) == int(top_id)
    assert float(expected.max()) == pytest.approx(float(top_val), abs=1e-3)
    assert out

    # the circuit stage on the float16 folder equals it on a float32 folder of the same (upcast) weights: were the
    # stage to run in the stored float16, F(M) and F(empty) would differ at float16's rounding
    f32 = tmp_path / "f32" / f"step{step}"
    upcast_by_hand(root / f"step{step}").save_pretrained(f32)
    for tok in (root / f"step{step}").glob("*token*"):
        shutil.copy(tok, f32)
    args = ["circuit.task=simple", "circuit.sites=[resid.0]", "circuit.n_examples=8", "circuit.method=attrib"]
    got = {}
    for name, src in (("fp16", root), ("fp32", f32.parent)):
        out = find_circuit(compose([*base, f"model.source={src}", *args, f"circuit.out_dir={tmp_path / name}"]))
        got[name] = json.loads((out / "circuit.json").read_text())["metadata"]
    assert (
        got["fp16"]["sfcd_model"]["stored_dtype"] == "float16"
        and got["fp32"]["sfcd_model"]["stored_dtype"] == "float32"
    )
    assert got["fp16"]["sfcd_model"]["weights_sha256"] == got["fp32"]["sfcd_model"]["weights_sha256"]
    for key in ("F_M", "F_empty"):
        assert got["fp16"][key] == pytest.approx(got["fp32"][key], rel=1e-6, abs=1e-6), key
    assert abs(got["fp16"]["F_M"] - got["fp16"]["F_empty"]) > 1e-3  # the metric moves: the comparison has teeth


def test_identical_checkpoints_are_warned_by_name(series):
    """Bug caught: a hash that ignores the weights (equal for every checkpoint) or that differs between byte-identical
    copies; and identical checkpoints passing silently."""
    from sfcd.models.loading import load_model, provenance, warn_identical

    root, steps = series
    named = {st: provenance(load_model(root, st)) for st in (*steps, steps[-1] + 1)}
    assert named[steps[0]]["weights_sha256"] != named[steps[-1]]["weights_sha256"]
    with pytest.warns(UserWarning, match=rf"{steps[-1]}, {steps[-1] + 1} have identical weights"):
        groups = warn_identical(named)
    assert groups == [[steps[-1], steps[-1] + 1]]
    # one float16 ulp in one weight is another checkpoint
    m = load_model(root, steps[-1])
    with torch.no_grad():
        p = next(m.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0].half(), torch.tensor(1e4, dtype=torch.half)).float()
    assert provenance(m)["weights_sha256"] != named[steps[-1]]["weights_sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_identical({1: named[steps[0]], 2: named[steps[-1]]}) == []


def test_bfloat16_sae_and_features_and_one_line_errors(series, test_run, tmp_path):
    """Bug caught: model.dtype ignored (the model kept in float32 or float16), a float32 dictionary spliced into a
    bfloat16 model (dtype mismatch in the CE score), logit effects of a bfloat16 unembedding crashing or rounded."""
    from sfcd.circuits.stage import find_circuit
    from sfcd.features import api
    from sfcd.features.stage import build_features
    from sfcd.models.loading import checkpoint
    from sfcd.sae.io import load_sae
    from sfcd.sae.stage import train_saes

    root, steps = series
    shutil.copytree(RunDir(test_run.run_dir).corpus, tmp_path / "corpus")
    base = ["experiment=test", f"run_dir={tmp_path}", f"model.source={root}"]
    model, _, _ = checkpoint(compose([*base, "model.dtype=bfloat16"]), steps[0], "sae")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.sfcd_source["dtype"] == "bfloat16"

    bf = [*base, "model.dtype=bfloat16", f"step={steps[0]}"]
    folders = train_saes(compose([*bf, "sae.sites=[mlp.1]", "sae.n_tokens=2048", "sae.eval_tokens=1024"]))
    meta = json.loads((folders[0] / "cfg.json").read_text())["metadata"]["sfcd_model"]
    assert (meta["dtype"], meta["stored_dtype"]) == ("bfloat16", "float16")
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("fve", "ce_sae", "ce_clean", "ce_zero"))
    build_features(compose([*bf, "features.n_tokens=1024", "features.top_k=2", "features.quantile_contexts=1"]))
    sae = load_sae(folders[0])
    W_U = model.lm_head.weight.detach().float()  # the bfloat16 weights the stage used, upcast here
    f = next(x for x in range(sae.d_sae) if api.feature(tmp_path, steps[0], "mlp.1", x, text=False)["top"])
    top_id, top_val = api.feature(tmp_path, steps[0], "mlp.1", f, text=False)["logits_pos"][0]
    expected = (sae.W_dec[f].detach() / sae.scale) @ W_U.t()
    assert int(expected.argmax()) == int(top_id) and float(expected.max()) == pytest.approx(top_val, abs=1e-3)

    with pytest.raises(ConfigError, match=r"model.dtype=bfloat16 cannot be used by the circuit stage.*float32"):
        find_circuit(compose([*bf, "circuit.task=simple"]))
    with pytest.raises(ConfigError, match=r"model.dtype='float8'; expected one of"):
        checkpoint(compose([*base, "model.dtype=float8"]), steps[0])
    with pytest.raises(
        MissingArtifactError, match=rf"no checkpoint step7 in the series .*the steps there are \[{steps[0]}"
    ):
        checkpoint(compose(base), 7)
    bare = tmp_path / "bare"
    shutil.copytree(root / f"step{steps[0]}", bare)
    for f in bare.glob("*token*"):
        f.unlink()
    with pytest.raises(MissingArtifactError, match=r"no tokenizer in .*bare"):
        checkpoint(compose(["experiment=test", f"run_dir={tmp_path}", f"model.source={bare}"]), steps[0])


def test_a_crosscoder_over_identical_checkpoints_warns_and_records_them(series, test_run, tmp_path):
    """Bug caught: a crosscoder over Pythia's identical step0/step1 trained silently, or a cfg.json that does not say
    which checkpoints (and dtype, weights) its blocks came from."""
    from sfcd.crosscoders.stage import train_crosscoders

    root, steps = series
    twin = steps[-1] + 1
    shutil.copytree(RunDir(test_run.run_dir).corpus, tmp_path / "corpus")
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={tmp_path}",
            f"model.source={root}",
            f"crosscoder.steps=[{steps[-1]},{twin}]",
            "crosscoder.sites=[resid.0]",
            "crosscoder.n_tokens=2048",
            "crosscoder.circuits=false",
        ]
    )
    with pytest.warns(UserWarning, match=rf"checkpoints {steps[-1]}, {twin} have identical weights"):
        folders = train_crosscoders(cfg)
    meta = json.loads((folders[0] / "cfg.json").read_text())
    assert meta["identical_checkpoints"] == [[steps[-1], twin]]
    recs = meta["sfcd_models"]
    assert [recs[str(s)]["step"] for s in (steps[-1], twin)] == [steps[-1], twin]
    assert recs[str(steps[-1])]["weights_sha256"] == recs[str(twin)]["weights_sha256"]
    assert recs[str(twin)]["stored_dtype"] == "float16" and recs[str(twin)]["path"].endswith(f"step{twin}")
    # each checkpoint's block as a SAELens SAE names its own checkpoint, loadable as model_name
    block = json.loads((folders[0] / f"step{twin}" / "cfg.json").read_text())["metadata"]
    assert block["sfcd_model"]["step"] == twin and block["model_name"].endswith(f"step{twin}")


def test_a_study_on_a_checkpoint_series_warns_of_identical_steps_and_writes_its_report(series, test_run, tmp_path):
    """Bug caught: a study on model.source refusing every step (checked against the run's empty model/), crashing
    at the report for want of sfcd's train log, or passing over identical checkpoints in silence."""
    from sfcd.study import run_study

    root, steps = series
    twin = steps[-1] + 1
    shutil.copytree(RunDir(test_run.run_dir).corpus, tmp_path / "corpus")  # no model/, no train log
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={tmp_path}",
            f"model.source={root}",
            f"study.steps=[{steps[-1]},{twin}]",
            "study.tasks=[simple]",
            "sae.sites=[resid.0]",
            "sae.n_tokens=2048",
            "sae.eval_tokens=1024",
            "circuit.sites=[resid.0]",
            "circuit.n_examples=8",
            "circuit.method=attrib",
        ]
    )
    with pytest.warns(UserWarning, match=rf"checkpoints {steps[-1]}, {twin} have identical weights"):
        page = run_study(cfg)
    dev = json.loads((tmp_path / "development" / "development.json").read_text())
    assert dev["identical_checkpoints"] == [[steps[-1], twin]]
    html = page.read_text()
    assert "identical" in html and f"{twin}" in html
