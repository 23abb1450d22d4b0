"""Sparse feature circuits on the test run's micro model and its resid.0 / mlp.1 SAEs."""

import json
import math

import numpy as np
import pytest
import torch

from sfcd.circuits.data import batches
from sfcd.circuits.effects import edge_effects, edge_pairs, node_effects
from sfcd.circuits.evaluate import faithfulness
from sfcd.circuits.splice import Identity, Splice, last_logits
from sfcd.config import compose
from sfcd.data.tasks import load_task
from sfcd.errors import ConfigError, InputError, MissingArtifactError
from sfcd.models.loading import load_model, load_tokenizer
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir
from sfcd.sae.io import load_sae

ATTRIB_EXACT_R = 0.9  # attribution vs exact patching, Pearson over nodes: 0.994 measured on this model


@pytest.fixture(scope="module")
def setup(test_run, test_saes):
    run = RunDir(test_run.run_dir)
    model, tok = load_model(run.root), load_tokenizer(run.root)
    for p in model.parameters():
        p.requires_grad_(False)
    dicts = {parse_site(f.name, model): load_sae(f) for f in test_saes}  # resid.0, mlp.1
    task = load_task(run.task_file("nounpp", "train"), tok)
    return model, dicts, batches(task, 12, 12)


def test_splicing_with_error_nodes_leaves_logits_unchanged(setup):
    model, dicts, bs = setup
    all_sites = dict(dicts)
    all_sites[parse_site("attn.1", model)] = Identity(32)
    with torch.no_grad():
        a = last_logits(model, bs[0].clean)
        b = last_logits(model, bs[0].clean, Splice(all_sites))
    assert (a - b).abs().max().item() < 1e-5


def test_ig_node_effects_correlate_with_exact(setup):
    model, dicts, bs = setup
    ig = node_effects(model, dicts, bs[0], "ig", steps=10)
    ex = node_effects(model, dicts, bs[0], "exact")
    x = torch.cat([ig[s].ie_f.sum(0).flatten() for s in dicts] + [ig[s].ie_err.sum(0) for s in dicts])
    y = torch.cat([ex[s].ie_f.sum(0).flatten() for s in dicts] + [ex[s].ie_err.sum(0) for s in dicts])
    nz = (x != 0) | (y != 0)
    r = np.corrcoef(x[nz].numpy(), y[nz].numpy())[0, 1]
    assert nz.sum() > 20 and r >= 0.9, f"Pearson {r:.3f} over {int(nz.sum())} nodes"
    # attribution patching is the one-step estimate: it correlates too, and is not identical to IG
    at = node_effects(model, dicts, bs[0], "attrib")
    z = torch.cat([at[s].ie_f.sum(0).flatten() for s in dicts] + [at[s].ie_err.sum(0) for s in dicts])
    assert not torch.allclose(z, x)


def test_fast_edges_equal_the_reference_mode(setup):
    model, dicts, bs = setup
    eff = node_effects(model, dicts, bs[0], "ig")
    ((up, down, stop),) = [p for p in edge_pairs(list(dicts)) if p[0].name == "resid.0" and p[1].name == "mlp.1"]
    assert stop == set()  # attn.1 is not a chosen site, and in parallel blocks mlp.1 does not read it
    nodes = [int(i) for i in eff[down].ie_f.sum((0, 1)).abs().topk(4).indices] + [-1]
    fast = edge_effects(model, dicts, bs[0], up, down, stop, eff, nodes)
    ref = edge_effects(model, dicts, bs[0], up, down, stop, eff, nodes, reference=True)
    assert fast.shape == (5, 129) and fast.abs().max() > 1e-3
    assert (fast - ref).abs().max().item() < 1e-5


def test_full_circuit_is_faithful_and_empty_is_not(setup):
    model, dicts, bs = setup
    everything = {s: (torch.ones(d.d_sae, dtype=torch.bool), True) for s, d in dicts.items()}
    nothing = {s: (torch.zeros(d.d_sae, dtype=torch.bool), False) for s, d in dicts.items()}
    # the ratios' algebra: no resolvability rule (z = floor = -inf, so the one-sided rule passes a negative
    # F(M) - F(empty) too)
    for ablation in ("mean", "zero", "resample"):
        full = faithfulness(model, dicts, bs, everything, ablation, z=-math.inf, floor=-math.inf)
        assert full["faithfulness"] == pytest.approx(1.0) and full["completeness"] == pytest.approx(0.0)
        empty = faithfulness(model, dicts, bs, nothing, ablation, z=-math.inf, floor=-math.inf)
        assert empty["faithfulness"] == pytest.approx(0.0) and empty["completeness"] == pytest.approx(1.0)
    assert abs(full["F_M"] - full["F_empty"]) > 1e-5  # ablating everything changes the metric


def test_mean_ablation_is_one_mean_whatever_the_batching(setup):
    # catches: a mean per batch (a batch of one pair ablates to its own patch), a mean that ignores examples of
    # other lengths, the clean prefixes used where patches exist. Independent check: the mean of each example's
    # own values, computed one example at a time.
    from sfcd.circuits.effects import site_values
    from sfcd.circuits.evaluate import Faithfulness

    model, dicts, bs = setup
    task_pairs = bs[0]
    g = torch.Generator().manual_seed(0)
    keep = {s: (torch.rand(d.d_sae, generator=g) < 0.3, False) for s, d in dicts.items()}
    ones = [
        type(task_pairs)(
            task_pairs.clean[i : i + 1],
            task_pairs.patch[i : i + 1],
            task_pairs.clean_answer[i : i + 1],
            task_pairs.patch_answer[i : i + 1],
        )
        for i in range(len(task_pairs))
    ]
    by_12, by_1 = (
        Faithfulness(model, dicts, bs, "mean", z=-math.inf, floor=-math.inf),
        Faithfulness(model, dicts, ones, "mean", z=-math.inf, floor=-math.inf),
    )
    a, b = by_12(keep), by_1(keep)
    assert a["faithfulness"] == pytest.approx(b["faithfulness"], abs=2e-4)  # float32 sums in another order
    assert a["F_empty"] == pytest.approx(b["F_empty"], abs=2e-4) and abs(a["F_M"] - a["F_empty"]) > 1e-3
    for s in dicts:
        per_example = torch.stack([site_values(model, dicts, o.patch)[s][0][0] for o in ones]).mean(0)
        torch.testing.assert_close(by_1.ablations[0][s][0][0], per_example, atol=1e-5, rtol=1e-4)
    assert by_12.ablation_info["over"] == "patch prefixes" and by_12.ablation_info["n_examples"] == len(task_pairs)


def run_circuit(test_run, *overrides: str) -> tuple[dict, dict]:
    """``sfcd circuit`` on the test run's resid.0 and mlp.1 SAEs: (circuit.json, node effects)."""
    from safetensors.torch import load_file

    from sfcd.circuits.stage import find_circuit

    cfg = compose(["experiment=test", f"run_dir={test_run.run_dir}", "circuit.sites=[resid.0,mlp.1]", *overrides])
    out = find_circuit(cfg)
    return json.loads((out / "circuit.json").read_text()), load_file(str(out / "node_effects.safetensors"))


def test_circuit_stage_end_to_end(test_run, test_saes):
    c, effects = run_circuit(
        test_run, "circuit.n_examples=16", "circuit.node_threshold=0.001", "circuit.sweep_points=5"
    )
    out = RunDir(test_run.run_dir).root / "circuits" / "nounpp" / "step24"
    m = c["metadata"]
    assert m["task"] == "nounpp" and m["step"] == 24 and m["n_examples"] == 16
    # the circuit's nodes are exactly the nodes whose effect passes the threshold
    expected = {
        f"{site}/{j}"
        for site in ("resid.0", "mlp.1")
        for j in (effects[f"{site}.features"].abs() > 0.001).nonzero().flatten().tolist()
    }
    expected |= {f"{site}/eps" for site in ("resid.0", "mlp.1") if effects[f"{site}.error"].abs() > 0.001}
    assert {n["id"] for n in c["nodes"]} == expected and expected
    assert all(abs(n["effect"]) > 0.001 for n in c["nodes"])
    assert {"F_M", "F_empty", "faithfulness", "completeness"} <= set(m)
    ids = {n["id"] for n in c["nodes"]} | {"y"}
    assert all(e["from"] in ids and e["to"] in ids for e in c["edges"])
    curves = json.loads((out / "faithfulness.json").read_text())
    assert set(curves) == {"features", "features, no error nodes", "neurons"}
    for ext in ("svg", "png"):
        assert (out / f"circuit.{ext}").stat().st_size > 1000 and (out / f"faithfulness.{ext}").stat().st_size > 1000
    assert (out / "circuit.svg").read_text().lstrip().startswith("<?xml")


def test_per_position_circuit(test_run, test_saes, tmp_path):
    # catches: edges pointing at node ids that do not exist (ids without @pos), edges summed over positions,
    # an error node kept at every position because it passed at one, edges from a later position to an earlier
    # one, a picture without positions; mixed lengths or a test split of another length taken silently
    from sfcd.circuits.stage import find_circuit
    from sfcd.io import write_jsonl

    c, eff = run_circuit(
        test_run,
        "circuit.aggregation=none",
        "circuit.method=attrib",
        "circuit.n_examples=8",
        "circuit.baselines=false",
        "circuit.sweep_points=3",
        "circuit.task=nounpp",
        "circuit.node_threshold=0.0001",  # the micro model's effects before the last position are small
    )
    T = eff["resid.0.features"].shape[0]
    assert eff["resid.0.features"].ndim == 2 and eff["resid.0.error"].shape == (T,)  # [positions, features]
    assert len(c["metadata"]["positions"]) == T
    ids = {n["id"] for n in c["nodes"]}
    assert all(n["position"] is not None and n["id"].endswith(f"@{n['position']}") for n in c["nodes"])
    for site in ("resid.0", "mlp.1"):
        err = eff[f"{site}.error"]
        assert {n["position"] for n in c["nodes"] if n["site"] == site and n["feature"] is None} == {
            t for t in range(T) if abs(err[t]) > 0.0001
        }
    assert c["edges"] and all(e["from"] in ids and e["to"] in ids | {"y"} for e in c["edges"])
    inner = [e for e in c["edges"] if e["to"] != "y"]
    # resid.0 -> mlp.1 in parallel blocks: the MLP is position-wise, so only same-position edges are non-zero
    # (the others, exact zeros, are left out and counted)
    assert inner and all(e["from"].split("@")[1] == e["to"].split("@")[1] for e in inner)
    assert c["metadata"]["edges_zero_left_out"] > 0
    assert {e["from"] for e in c["edges"] if e["to"] == "y"} == ids  # both sites reach y (resid.0 past mlp.1)
    out = RunDir(test_run.run_dir).root / "circuits" / "nounpp" / "step24"
    assert (out / "circuit.svg").stat().st_size > 1000

    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(
        mixed,
        [
            {"clean_prefix": "The boy", "patch_prefix": "The boys", "clean_answer": " is", "patch_answer": " are"},
            {
                "clean_prefix": "The boy near the car",
                "patch_prefix": "The boys near the car",
                "clean_answer": " is",
                "patch_answer": " are",
            },
        ],
    )
    (tmp_path / "mixed_eval.jsonl").write_bytes(mixed.read_bytes())
    base = ["experiment=test", f"run_dir={test_run.run_dir}", "circuit.sites=[resid.0]", "circuit.aggregation=none"]
    base += ["circuit.lengths=all", f"circuit.eval_task={tmp_path / 'mixed_eval.jsonl'}"]  # keep both lengths
    with pytest.raises(InputError, match=r"one length.*found 3 tokens \(1 pairs\), 6 tokens \(1 pairs\)"):
        find_circuit(compose([*base, f"circuit.task={mixed}"]))


def test_nopair_task_and_neuron_dictionary(test_run, test_saes, tmp_path):
    from sfcd.circuits.stage import find_circuit
    from sfcd.io import write_jsonl

    rows = [
        {"clean_prefix": "The boy near the car", "clean_answer": " is"},
        {"clean_prefix": "The boys near the car", "clean_answer": " are"},
    ] * 4
    write_jsonl(tmp_path / "nopair.jsonl", rows)
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={test_run.run_dir}",
            "circuit.sites=[resid.0,mlp.1]",
            f"circuit.task={tmp_path / 'nopair.jsonl'}",
            "circuit.dictionary=neurons",
            "circuit.edges=false",
            "circuit.sweep_points=3",
        ]
    )
    c = json.loads((find_circuit(cfg) / "circuit.json").read_text())
    # a lone file is split: half of its 8 pairs find the circuit, the other half evaluate it
    assert c["metadata"]["dictionary"] == "neurons" and c["metadata"]["n_examples"] == 4
    assert all(n["feature"] is None or n["feature"] < 32 for n in c["nodes"])  # neurons of a 32-wide stream


def test_circuit_errors(test_run, test_saes, tmp_path):
    from sfcd.circuits.stage import find_circuit
    from sfcd.io import write_jsonl

    base = ["experiment=test", f"run_dir={test_run.run_dir}"]
    with pytest.raises(MissingArtifactError, match=r"no SAEs for sites \['embed', 'attn.0'"):
        find_circuit(compose(base))
    with pytest.raises(ConfigError, match="node_threshold=-1.0 is out of range"):
        find_circuit(compose([*base, "circuit.node_threshold=-1"]))
    with pytest.raises(ConfigError, match="unknown circuit.edge_items 'some'; expected all or paper"):
        find_circuit(compose([*base, "circuit.edge_items=some"]))
    bad = tmp_path / "bad.jsonl"
    write_jsonl(
        bad,
        [
            {
                "clean_prefix": "The boy",
                "patch_prefix": "The boys near the car",
                "clean_answer": " is",
                "patch_answer": " are",
            },
            {
                "clean_prefix": "The boy",
                "patch_prefix": "The boys",
                "clean_answer": " xylophone",
                "patch_answer": " are",
            },
        ],
    )
    with pytest.raises(
        InputError, match=r"kept 0 pairs.*1 multi-token answer, 1 unequal prefix lengths.*no usable pairs"
    ):
        find_circuit(compose([*base, "circuit.sites=[resid.0]", f"circuit.task={bad}"]))
    bad.write_text('{"clean_prefix": "The boy", "clean_answer": " is"}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        find_circuit(compose([*base, "circuit.sites=[resid.0]", f"circuit.task={bad}"]))


def test_ground_truths_for_nodes_and_error_edges(test_run, test_saes, setup):
    # float64 copies of the model and its SAEs. Catches: F(M) not the model's own metric (a splice that changes
    # the output), a leaf left without gradient (f and err not independent leaves: the gradient cancels), an
    # error node's edges dropped or computed from the features' delta, attribution unrelated to exact patching
    from sfcd.circuits.data import metric
    from sfcd.circuits.effects import edge_pairs
    from sfcd.circuits.evaluate import Faithfulness
    from sfcd.models.sites import hooks

    run = RunDir(test_run.run_dir)
    model = load_model(run.root).double()
    for p in model.parameters():
        p.requires_grad_(False)
    dicts = {parse_site(f.name, model): load_sae(f).double() for f in test_saes}
    _, _, bs = setup
    batch = bs[0]
    with torch.no_grad():
        plain = -metric(last_logits(model, batch.clean), batch).mean().item()  # logit[clean] - logit[patch]
    assert pytest.approx(plain, rel=1e-9) == Faithfulness(model, dicts, [batch], "mean").F_M

    eff = node_effects(model, dicts, batch, "attrib")
    for s in dicts:
        assert eff[s].grad_f.abs().sum() > 0 and eff[s].grad_err.abs().sum() > 0, s.name
    exact = node_effects(model, dicts, batch, "exact")
    x = torch.cat([eff[s].ie_f.sum(0).flatten() for s in dicts] + [eff[s].ie_err.sum(0) for s in dicts])
    y = torch.cat([exact[s].ie_f.sum(0).flatten() for s in dicts] + [exact[s].ie_err.sum(0) for s in dicts])
    nz = (x != 0) | (y != 0)
    assert np.corrcoef(x[nz].numpy(), y[nz].numpy())[0, 1] >= ATTRIB_EXACT_R

    up, down = (parse_site(n) for n in ("resid.0", "mlp.1"))
    ((_, _, stop),) = [p for p in edge_pairs(list(dicts)) if p[:2] == (up, down)]
    k = int(eff[down].ie_f.sum((0, 1)).abs().argmax())
    w = edge_effects(model, dicts, batch, up, down, stop, eff, [k])[0]
    g, du = eff[down].grad_f[..., k], dicts[up]

    def s_of(h):
        got = {}
        fns = {
            up: lambda x: du.decode(eff[up].f_clean) + eff[up].err_clean + h * eff[up].delta_err,
            down: lambda x: got.setdefault("d", x),
        }
        with torch.no_grad(), hooks(model, fns):
            model(batch.clean)
        return (g * dicts[down].encode(got["d"])[..., k]).sum()

    fd = (s_of(1e-6) - s_of(-1e-6)) / 2e-6
    assert abs(w[-1].item()) > 1e-6
    assert w[-1].item() == pytest.approx(fd.item(), rel=1e-5)


def test_compact_effects_give_the_same_edges(setup):
    # what the stage keeps per batch for edges is sparse, and the downstream gradients only where the feature is
    # active on the clean input; catches: a gradient needed elsewhere (a downstream feature that moves while
    # inactive), an index lost in the sparse round trip, per-position or paper-item edges reading the wrong entries
    from sfcd.circuits.effects import compact

    model, dicts, bs = setup
    eff = node_effects(model, dicts, bs[0], "ig")
    small = compact(eff)
    ((up, down, stop),) = [p for p in edge_pairs(list(dicts)) if p[0].name == "resid.0" and p[1].name == "mlp.1"]
    nodes = [int(i) for i in eff[down].ie_f.sum((0, 1)).abs().topk(4).indices] + [-1]
    tau = float(eff[down].ie_f.abs().flatten().kthvalue(eff[down].ie_f.numel() - 50).values)
    T = bs[0].clean.shape[1]
    for kw in ({}, {"item_threshold": tau}, {"per_position": True}):
        down_nodes = [(k, t) for k in nodes for t in (T - 2, T - 1)] if kw.get("per_position") else nodes
        a = edge_effects(model, dicts, bs[0], up, down, stop, eff, down_nodes, **kw)
        b = edge_effects(model, dicts, bs[0], up, down, stop, small, down_nodes, **kw)
        assert a.abs().max() > 1e-4
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    dense_size = sum(t.numel() for e in eff.values() for t in (e.f_clean, e.delta_f, e.grad_f, e.ie_f))
    sparse_size = sum(t._nnz() for e in small.values() for t in (e.f_clean, e.delta_f, e.grad_f, e.ie_f))
    assert sparse_size < dense_size / 4
