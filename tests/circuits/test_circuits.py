"""Sparse feature circuits on the test run's micro model and its resid.0 / mlp.1 SAEs.

Ground truths come from plain torch forward hooks on the transformers modules (no sfcd splicing, effects or
ablation code): the site's output is captured, set, or made a leaf, and the metric read from the logits. A
dictionary's decoder is affine (``x_hat = (f @ W_dec + b_dec) / scale``), so moving a site's nodes moves its
output along known directions: feature j of a site adds ``W_dec[j] / scale`` per unit, its error node adds
itself, and interpolating every node of a site interpolates the site's output."""

import contextlib
import copy
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sfcd.circuits.data import batches
from sfcd.circuits.effects import edge_effects, edge_pairs, node_effects
from sfcd.circuits.evaluate import Faithfulness, faithfulness
from sfcd.circuits.splice import Identity, Splice, last_logits
from sfcd.config import compose
from sfcd.data.tasks import load_task
from sfcd.errors import ConfigError, InputError, MissingArtifactError
from sfcd.models.loading import load_model, load_tokenizer
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir
from sfcd.sae.io import load_sae

IG_EXACT_R = 0.9  # IG and attribution vs exact patching, Pearson over nodes: 0.99 measured on this model


@pytest.fixture(scope="module")
def setup(test_run, test_saes):
    run = RunDir(test_run.run_dir)
    model, tok = load_model(run.root), load_tokenizer(run.root)
    for p in model.parameters():
        p.requires_grad_(False)
    dicts = {parse_site(f.name, model): load_sae(f) for f in test_saes}  # resid.0, mlp.1
    task = load_task(run.task_file("nounpp", "train"), tok)
    return model, dicts, batches(task, 12, 12)


@pytest.fixture(scope="module")
def setup64(setup):
    """float64 copies of the model and its SAEs (finite differences and per-node comparisons), the same batches."""
    model, dicts, bs = setup
    return (
        copy.deepcopy(model).double(),
        {s: copy.deepcopy(d).double().requires_grad_(False) for s, d in dicts.items()},
        bs,
    )


# ----------------------------------------------------------------------------- plain hooks: the ground truths
def module_of(model, name: str):
    """The transformers module whose output is site ``name`` of the micro GPT-NeoX (resid.l: the layer)."""
    kind, layer = name.split(".")
    block = model.gpt_neox.layers[int(layer)]
    return {"resid": block, "mlp": block.mlp, "attn": block.attention}[kind]


@contextlib.contextmanager
def plain_hooks(model, fns: dict):
    """torch forward hooks: ``fns[name](output)`` returns the module's new output (or None: unchanged)."""

    def make(fn):
        def hook(module, inputs, output):
            first = output[0] if isinstance(output, tuple) else output
            new = fn(first)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = [module_of(model, n).register_forward_hook(make(fn)) for n, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def outputs(model, x, names) -> dict:
    """The plain model's outputs at ``names`` on input ``x``."""
    got = {}

    def grab(n):
        def fn(o):
            got[n] = o.detach().clone()

        return fn

    with torch.no_grad(), plain_hooks(model, {n: grab(n) for n in names}):
        model(x)
    return got


def output_with(model, x, set_name: str, value: torch.Tensor, read_name: str) -> torch.Tensor:
    """The plain model's output at ``read_name`` on input ``x`` with ``set_name``'s output set to ``value``."""
    got = {}
    with torch.no_grad(), plain_hooks(model, {set_name: lambda o: value, read_name: lambda o: got.setdefault("d", o)}):
        model(x)
    return got["d"]


def answer_diff(model, batch, fns=None) -> torch.Tensor:
    """Per example, logit[clean answer] - logit[patch answer] at the last position, with plain hooks ``fns``."""
    with plain_hooks(model, fns or {}):
        logits = model(batch.clean).logits[:, -1]
    rows = torch.arange(len(batch))
    return logits[rows, batch.clean_answer] - logits[rows, batch.patch_answer]


def grad_at(model, batch, name: str, value: torch.Tensor) -> torch.Tensor:
    """d m / d(site output) with the site's output set to ``value``; m = sum over examples of logit[patch answer]
    - logit[clean answer] (sfcd's metric: the effects' sign)."""
    leaf = value.detach().clone().requires_grad_(True)
    m = -answer_diff(model, batch, {name: lambda o: leaf}).sum()
    return torch.autograd.grad(m, leaf)[0]


def nodes_of(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, err) of output ``x``: the dictionary's own encode, err = x - (f @ W_dec + b_dec) / scale."""
    with torch.no_grad():
        f = sae.encode(x)
        return f, x - (f @ sae.W_dec + sae.b_dec) / sae.scale


def split_over_nodes(sae, xc, xp, G) -> tuple[torch.Tensor, torch.Tensor]:
    """Effects G . delta of each node of a site (G: d m / d output, [B, T, d]): features [B, T, F], errors [B, T]."""
    (fc, ec), (fp, ep) = nodes_of(sae, xc), nodes_of(sae, xp)
    with torch.no_grad():
        return (G @ (sae.W_dec / sae.scale).T) * (fp - fc), (G * (ep - ec)).sum(-1)


def plain_ig(model, sae, name, batch, steps: int):
    """Integrated gradients as the method states them: gradients at u_clean + alpha (u_patch - u_clean) for
    alpha = 0, 1/steps, ..., (steps - 1)/steps, averaged, times each node's delta (one site at a time)."""
    got_c, got_p = outputs(model, batch.clean, [name]), outputs(model, batch.patch, [name])
    xc, xp = got_c[name], got_p[name]
    G = sum(grad_at(model, batch, name, xc + (k / steps) * (xp - xc)) for k in range(steps)) / steps
    return split_over_nodes(sae, xc, xp, G)


def site_names(dicts):
    return [s.name for s in dicts]


# --------------------------------------------------------------------------------------------------- tests
def test_splicing_with_error_nodes_leaves_logits_unchanged(setup):
    # catches: a splice that changes the output (err dropped or not x - decode(f)), and one that is not in place
    # at all (the first check alone would pass): the error nodes are the SAEs' real reconstruction errors, and
    # zeroing them moves the logits
    model, dicts, bs = setup
    all_sites = dict(dicts)
    all_sites[parse_site("attn.1", model)] = Identity(32)
    sp = Splice(all_sites)
    with torch.no_grad():
        a = last_logits(model, bs[0].clean)
        b = last_logits(model, bs[0].clean, sp)
        plain = outputs(model, bs[0].clean, site_names(dicts))
        for s, d in dicts.items():
            f, err = nodes_of(d, plain[s.name])
            torch.testing.assert_close(sp.states[s].f, f)
            torch.testing.assert_close(sp.states[s].err, err)
            assert err.norm() > 0.05 * plain[s.name].norm(), s.name  # trained SAEs: a real error node
        no_err = Splice(dicts, values={s: (lambda f, e: (f, torch.zeros_like(e))) for s in dicts})
        c = last_logits(model, bs[0].clean, no_err)
    assert (a - b).abs().max().item() < 1e-5
    assert (a - c).abs().max().item() > 1e-2


def test_ablations_of_full_partial_and_empty_circuits_equal_plain_hooks(setup64):
    # F(M), F(empty) and F(C), example by example, against the model run with plain hooks that set each ablated
    # site's output: its mean over the evaluation examples' patch prefixes, position by position (mean), the decoder
    # bias (zero: f = 0 and err = 0 decode to b_dec / scale), another example's patch output (resample). A site
    # whose nodes are all kept is left alone: downstream dictionaries re-encode the modified stream, and
    # decode(f) + err is the stream. Catches: a mean per batch or over clean prefixes, the kept and ablated nodes
    # swapped, a downstream site fed its clean values instead of re-encoding, a resample that keeps an example's
    # own values, wrong ratios. (The micro model barely does the task: its metric is ~0.1 logits per example.)
    model, dicts, bs = setup64
    batch = bs[0]
    names = site_names(dicts)
    r0, m1 = dicts
    patch = outputs(model, batch.patch, names)
    with torch.no_grad():
        M = answer_diff(model, batch)
    everything = {s: (torch.ones(d.d_sae, dtype=torch.bool), True) for s, d in dicts.items()}
    nothing = {s: (torch.zeros(d.d_sae, dtype=torch.bool), False) for s, d in dicts.items()}
    only_r0 = {r0: everything[r0], m1: nothing[m1]}
    only_m1 = {r0: nothing[r0], m1: everything[m1]}
    for ablation in ("mean", "zero", "resample"):
        ev = Faithfulness(model, dicts, bs, ablation, z=-math.inf, floor=-math.inf)
        if ablation == "mean":
            value = {n: patch[n].mean(0, keepdim=True) for n in names}
        elif ablation == "zero":
            value = {s.name: (d.b_dec / d.scale).expand_as(patch[s.name]) for s, d in dicts.items()}
        else:
            src = ev.ablation_info["sources"]
            assert sorted(src) == list(range(len(batch))) and all(i != j for i, j in enumerate(src))
            value = {n: patch[n][src] for n in names}

        def set_to(n, value=value):
            return lambda o: value[n].expand_as(o)

        with torch.no_grad():
            empty = answer_diff(model, batch, {n: set_to(n) for n in names})
            keep_r0 = answer_diff(model, batch, {m1.name: set_to(m1.name)})
            keep_m1 = answer_diff(model, batch, {r0.name: set_to(r0.name)})
        for a, b in ((M, empty), (keep_r0, empty), (keep_r0, M), (keep_m1, M)):
            assert (a - b).abs().max() > 1e-3, ablation  # each comparison below tells the cases apart
        torch.testing.assert_close(ev.M_i, M, rtol=0, atol=1e-9)
        torch.testing.assert_close(ev.empty_i, empty, rtol=0, atol=1e-9)
        torch.testing.assert_close(ev.values(only_r0), keep_r0, rtol=0, atol=1e-9)
        torch.testing.assert_close(ev.values(only_m1), keep_m1, rtol=0, atol=1e-9)
        F_M, F_empty = M.mean().item(), empty.mean().item()
        r = ev(only_r0)
        assert r["F_C"] == pytest.approx(keep_r0.mean().item(), abs=1e-9)
        assert r["F_M_minus_C"] == pytest.approx(keep_m1.mean().item(), abs=1e-9)  # the complement of only_r0
        assert r["faithfulness"] == pytest.approx((keep_r0.mean().item() - F_empty) / (F_M - F_empty), rel=1e-6)
        assert r["completeness"] == pytest.approx((keep_m1.mean().item() - F_empty) / (F_M - F_empty), rel=1e-6)
        full, none = ev(everything), ev(nothing)
        assert full["faithfulness"] == pytest.approx(1.0) and full["completeness"] == pytest.approx(0.0)
        assert none["faithfulness"] == pytest.approx(0.0) and none["completeness"] == pytest.approx(1.0)
    # the function is the class
    assert faithfulness(model, dicts, bs, only_r0, "resample", z=-math.inf, floor=-math.inf) == r


def test_ig_node_effects_equal_integrated_gradients_and_are_complete(setup64):
    # per node: IG's gradients at alpha = 0, .1, ..., .9 averaged, times the node's delta, computed through plain
    # hooks (the site's output moved along clean -> patch). Completeness: the sum over a site's nodes (error node
    # included) approaches the metric's change when the whole site is patched, closer with more steps (a left
    # Riemann sum: the gap falls as 1/steps). Catches: a wrong interpolation grid (ends included or shifted), a
    # wrong divisor, a node's gradient taken at the clean point, the error node left out; Pearson with exact
    # patching (the old check) passed all of those
    model, dicts, bs = setup64
    batch = bs[0]
    for s, d in dicts.items():
        ig = node_effects(model, dicts, batch, "ig", steps=10)[s]
        want_f, want_e = plain_ig(model, d, s.name, batch, 10)
        big = want_f.abs() > 1e-3 * want_f.abs().max()
        assert int(big.sum()) > 20 and want_e.abs().max() > 1e-3, s.name
        rel = ((ig.ie_f - want_f).abs() / want_f.abs())[big]
        assert rel.max() < 1e-6, f"{s.name}: worst relative error {rel.max():.2e}"
        torch.testing.assert_close(ig.ie_f, want_f, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(ig.ie_err, want_e, rtol=1e-6, atol=1e-12)

        xp = outputs(model, batch.patch, [s.name])[s.name]
        with torch.no_grad():
            total = (answer_diff(model, batch) - answer_diff(model, batch, {s.name: lambda o, xp=xp: xp})).sum().item()
        gaps = {}
        for steps in (2, 16):
            e = node_effects(model, dicts, batch, "ig", steps=steps)[s]
            gaps[steps] = abs(e.ie_f.sum().item() + e.ie_err.sum().item() - total)
        # resid.0: 0.0058 patched, gaps 5.1e-4 (2 steps) and 8.0e-5 (16); mlp.1 (nearly linear): 9.6e-4, 2.6e-6, 3.3e-7
        assert gaps[2] > 1e-3 * abs(total), (s.name, gaps, total)  # the path is curved: 2 steps are not enough
        assert gaps[16] < gaps[2] / 4 and gaps[16] < 0.03 * abs(total), (s.name, gaps, total)


def test_consistency_fast_and_reference_edge_modes_agree(setup):
    # a consistency check of the code against its other mode (one backward per item); the edges' values are
    # checked against finite differences in test_edges_through_the_trained_saes_equal_finite_differences
    model, dicts, bs = setup
    b = bs[0]
    few = type(b)(b.clean[:4], b.patch[:4], b.clean_answer[:4], b.patch_answer[:4])  # the reference mode is slow
    eff = node_effects(model, dicts, few, "attrib")
    ((up, down, stop),) = [p for p in edge_pairs(list(dicts)) if p[0].name == "resid.0" and p[1].name == "mlp.1"]
    assert stop == set()  # attn.1 is not a chosen site, and in parallel blocks mlp.1 does not read it
    nodes = [int(i) for i in eff[down].ie_f.sum((0, 1)).abs().topk(2).indices] + [-1]
    fast = edge_effects(model, dicts, few, up, down, stop, eff, nodes)
    ref = edge_effects(model, dicts, few, up, down, stop, eff, nodes, reference=True)
    assert fast.shape == (3, 129) and fast.abs().max() > 1e-3
    assert (fast - ref).abs().max().item() < 1e-5


def test_edges_through_the_trained_saes_equal_finite_differences(setup64):
    # edge(D_k <- U_j) = d/dh of g_D . D_k with U's node j moved by h times its delta (its output moves by
    # h * delta_f[j] * W_dec[j] / scale; the error node's by h * delta_err), through the trained TopK SAEs (real
    # reconstruction errors), to a downstream feature and to the downstream error node (its value
    # g_err . (x - decode(encode(x))) re-encoded from the moved stream). Catches: the downstream error node's value
    # detached or taken from the features, an upstream column paired with another feature's delta, the error
    # column using the features' delta; the fast/reference and exact/IG checks passed all of those
    model, dicts, bs = setup64
    batch = bs[0]
    up, down = (parse_site(n) for n in ("resid.0", "mlp.1"))
    ((_, _, stop),) = [p for p in edge_pairs(list(dicts)) if p[:2] == (up, down)]
    eff = node_effects(model, dicts, batch, "attrib")
    # the downstream feature: the largest effect among those active on the clean input at the last position (a
    # feature that only the patch turns on has a clean value that nothing upstream moves: edges into it are 0)
    active = (eff[down].f_clean[:, -1] != 0).any(0)
    k = int((eff[down].ie_f.sum((0, 1)).abs() * active).argmax())
    w = edge_effects(model, dicts, batch, up, down, stop, eff, [k, -1])
    su, sd = dicts[up], dicts[down]
    xc, xp = outputs(model, batch.clean, [up.name])[up.name], outputs(model, batch.patch, [up.name])[up.name]
    (fc, ec), (fp, ep) = nodes_of(su, xc), nodes_of(su, xp)
    g_f, g_e = eff[down].grad_f[..., k], eff[down].grad_err

    def values(x_up):
        f, err = nodes_of(sd, output_with(model, batch.clean, up.name, x_up, down.name))
        return torch.stack([(g_f * f[..., k]).sum(), (g_e * err).sum()])

    def fd(direction, h=1e-6):
        return (values(xc + h * direction) - values(xc - h * direction)) / (2 * h)

    cols = {int(j) for r in (0, 1) for j in w[r, :-1].abs().topk(3).indices}
    for j in sorted(cols):
        want = fd((fp - fc)[..., j : j + 1] * (su.W_dec[j] / su.scale))
        torch.testing.assert_close(w[:, j], want, rtol=1e-5, atol=1e-9 * w.abs().max().item())
    want = fd(ep - ec)
    torch.testing.assert_close(w[:, -1], want, rtol=1e-5, atol=1e-9 * w.abs().max().item())
    for r in (0, 1):  # neither row is empty
        assert w[r, :-1].abs().max() > 1e-3 * w.abs().max() and abs(w[r, -1]) > 1e-3 * w.abs().max(), r


def test_mean_ablation_is_one_mean_whatever_the_batching(setup):
    # catches: a mean per batch (a batch of one pair ablates to its own patch), a mean that ignores examples of
    # other lengths, the clean prefixes used where patches exist. Independent check: the mean of each example's
    # own values, computed one example at a time, and F(empty) from plain hooks setting each site's output to the
    # mean of its patch outputs over all examples
    from sfcd.circuits.effects import site_values

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
    mean = {n: o.mean(0, keepdim=True) for n, o in outputs(model, task_pairs.patch, site_names(dicts)).items()}
    with torch.no_grad():
        empty = answer_diff(model, task_pairs, {n: (lambda o, v=v: v.expand_as(o)) for n, v in mean.items()})
    torch.testing.assert_close(by_1.empty_i, empty, rtol=0, atol=1e-4)
    assert b["F_empty"] == pytest.approx(empty.mean().item(), abs=1e-4)
    assert by_12.ablation_info["over"] == "patch prefixes" and by_12.ablation_info["n_examples"] == len(task_pairs)


def test_node_effects_and_edges_do_not_depend_on_the_batch_size(setup64):
    # the stage's own functions (all_effects, circuit_edges) over 12 examples in one batch and in batches of 5, 5
    # and 2, against an unbatched computation through plain hooks: attribution effects (the metric's gradient at
    # the clean input times each node's delta) averaged over the 12 examples, and edges as finite differences of
    # the summed scalar over all 12, divided by 12. Catches: a sum or mean per batch, division by the number of
    # batches or the last batch's size, an edge not divided by the number of examples
    from sfcd.circuits.stage import all_effects, circuit_edges

    model, dicts, bs = setup64
    (one,) = bs
    split = [
        type(one)(one.clean[a:b], one.patch[a:b], one.clean_answer[a:b], one.patch_answer[a:b])
        for a, b in ((0, 5), (5, 10), (10, 12))
    ]
    c = OmegaConf.create({"method": "attrib", "steps": 10, "aggregation": "sum", "edges": True, "ig_batch": None})
    up, down = (parse_site(n) for n in ("resid.0", "mlp.1"))
    n = len(one)
    want, at_last = {}, {}
    for s, d in dicts.items():
        x = {k: outputs(model, getattr(one, k), [s.name])[s.name] for k in ("clean", "patch")}
        f, e = split_over_nodes(d, x["clean"], x["patch"], grad_at(model, one, s.name, x["clean"]))
        want[s] = (f.sum((0, 1)) / n, e.sum() / n)
        at_last[s] = f[:, -1]  # [B, F]: mlp.1 reaches the metric at the last position only
    on = nodes_of(dicts[down], outputs(model, one.clean, [down.name])[down.name])[0][:, -1] != 0  # [B, F]
    got = {}
    for name, bb in (("one batch", [one]), ("batches of 5", split)):
        per_batch, agg, n_seen = all_effects(model, dicts, bb, c)
        assert n_seen == n
        for s in dicts:
            torch.testing.assert_close(
                agg[s][0], want[s][0], rtol=1e-6, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
            )
            torch.testing.assert_close(
                agg[s][1], want[s][1], rtol=1e-6, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
            )
        k = int((want[down][0].abs() * on.any(0)).argmax())  # active on the clean input (see the test above)
        # upstream: the largest effects at the last position of the examples where feature k is on
        js = [int(j) for j in (at_last[up].abs() * on[:, k, None]).sum(0).topk(2).indices]
        keep = {
            up: (
                torch.zeros(dicts[up].d_sae, dtype=torch.bool).index_fill(0, torch.tensor(js), True),
                torch.tensor(True),
            ),
            down: (
                torch.zeros(dicts[down].d_sae, dtype=torch.bool).index_fill(0, torch.tensor([k]), True),
                torch.tensor(False),
            ),
        }
        nodes = [
            {"id": f"{s.name}/{j}", "site": s.name, "feature": j, "position": None, "effect": float(want[s][0][j])}
            for s, jj in ((up, js), (down, [k]))
            for j in jj
        ] + [{"id": "resid.0/eps", "site": "resid.0", "feature": None, "position": None, "effect": float(want[up][1])}]
        edges = circuit_edges(model, dicts, bb, per_batch, [up, down], keep, n, False, nodes)
        got[name] = {(e["from"], e["to"]): e["weight"] for e in edges}
    assert got["one batch"].keys() == got["batches of 5"].keys()
    for key, v in got["one batch"].items():
        assert got["batches of 5"][key] == pytest.approx(v, rel=1e-6, abs=1e-12), key

    # the unbatched finite differences: resid.0 -> mlp.1 feature k, from feature js[0] and from the error node
    su, sd = dicts[up], dicts[down]
    g = node_effects(model, dicts, one, "attrib")[down].grad_f[..., k]
    xc, xp = outputs(model, one.clean, [up.name])[up.name], outputs(model, one.patch, [up.name])[up.name]
    (fc, ec), (fp, ep) = nodes_of(su, xc), nodes_of(su, xp)

    def value(x_up):
        return (g * sd.encode(output_with(model, one.clean, up.name, x_up, down.name))[..., k]).sum()

    h = 1e-6
    for frm, direction in (
        (f"resid.0/{js[0]}", (fp - fc)[..., js[0] : js[0] + 1] * (su.W_dec[js[0]] / su.scale)),
        ("resid.0/eps", ep - ec),
    ):
        fd = (value(xc + h * direction) - value(xc - h * direction)).item() / (2 * h) / n
        assert abs(fd) > 1e-7 and got["batches of 5"][(frm, f"mlp.1/{k}")] == pytest.approx(fd, rel=1e-5), frm
    # y edges: mlp.1 (nothing after it) carries its node effect; resid.0 reaches y past mlp.1 (stopped there)
    assert got["batches of 5"][(f"mlp.1/{k}", "y")] == pytest.approx(float(want[down][0][k]), rel=1e-6)
    m1_clean = outputs(model, one.clean, [down.name])[down.name]

    def metric_sum(x_up):  # sfcd's metric, with mlp.1 held at its clean output: the paths past it only
        with torch.no_grad():
            return -answer_diff(model, one, {up.name: lambda o: x_up, down.name: lambda o: m1_clean}).sum().item()

    fd = (metric_sum(xc + h * (ep - ec)) - metric_sum(xc - h * (ep - ec))) / (2 * h) / n
    assert abs(fd) > 1e-5 and got["batches of 5"][("resid.0/eps", "y")] == pytest.approx(fd, rel=1e-5)


def run_circuit(test_run, *overrides: str) -> tuple[dict, dict]:
    """``sfcd circuit`` on the test run's resid.0 and mlp.1 SAEs: (circuit.json, node effects)."""
    from safetensors.torch import load_file

    from sfcd.circuits.stage import find_circuit

    cfg = compose(["experiment=test", f"run_dir={test_run.run_dir}", "circuit.sites=[resid.0,mlp.1]", *overrides])
    out = find_circuit(cfg)
    return json.loads((out / "circuit.json").read_text()), load_file(str(out / "node_effects.safetensors"))


def test_per_position_circuit(own_run, setup, tmp_path):
    # catches: node effects not the mean over the discovery examples at each position (against attribution through
    # plain hooks on the pairs the metadata names), edges pointing at node ids that do not exist (ids without @pos),
    # edges summed over positions, an error node kept at every position because it passed at one, edges from a
    # later position to an earlier one, a picture without positions; mixed lengths or a test split of another
    # length taken silently. Runs the stage on a private copy of the run (it writes circuits/).
    from sfcd.circuits.data import PairBatch
    from sfcd.circuits.stage import find_circuit
    from sfcd.io import write_jsonl

    c, eff = run_circuit(
        own_run,
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
    model, dicts, _ = setup  # the same checkpoint (step 24) and SAEs
    run = RunDir(own_run.run_dir)
    rows = set(c["metadata"]["pairs"]["discovery"]["rows"])
    assert c["metadata"]["step"] == 24 and len(rows) == c["metadata"]["n_examples"] == 8
    found = [p for p in load_task(run.task_file("nounpp", "train"), load_tokenizer(run.root)).pairs if p.index in rows]
    cols = ("clean_ids", "patch_ids", "clean_answer", "patch_answer")
    batch = PairBatch(*(torch.tensor([getattr(p, k) for p in found]) for k in cols))
    for s, d in dicts.items():
        x = {k: outputs(model, getattr(batch, k), [s.name])[s.name] for k in ("clean", "patch")}
        f, e = split_over_nodes(d, x["clean"], x["patch"], grad_at(model, batch, s.name, x["clean"]))
        assert f.mean(0).abs().max() > 1e-4, s.name  # the stage's threshold here
        torch.testing.assert_close(eff[f"{s.name}.features"], f.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(eff[f"{s.name}.error"], e.mean(0), rtol=1e-4, atol=1e-6)
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
    out = RunDir(own_run.run_dir).root / "circuits" / "nounpp" / "step24"
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
    base = ["experiment=test", f"run_dir={own_run.run_dir}", "circuit.sites=[resid.0]", "circuit.aggregation=none"]
    base += ["circuit.lengths=all", f"circuit.eval_task={tmp_path / 'mixed_eval.jsonl'}"]  # keep both lengths
    with pytest.raises(InputError, match=r"one length.*found 3 tokens \(1 pairs\), 6 tokens \(1 pairs\)"):
        find_circuit(compose([*base, f"circuit.task={mixed}"]))


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


def test_node_effects_equal_plain_hook_ground_truths(setup64):
    # float64 copies of the model and its SAEs. Per node, through plain hooks: attribution is the metric's
    # gradient at the clean input times the node's delta; exact patching moves one node (feature j at position t:
    # the output moves by delta_f * W_dec[j] / scale there; the error node: by delta_err) and reruns. Catches: F(M)
    # not the model's own metric (a splice that changes the output), a leaf left without gradient (f and err not
    # independent leaves: the gradient cancels), effects of the wrong sign or scale, exact patching more than one
    # node or the wrong position; Pearson with exact patching (the old check) passed wrong scales
    model, dicts, bs = setup64
    b = bs[0]
    batch = type(b)(b.clean[:6], b.patch[:6], b.clean_answer[:6], b.patch_answer[:6])  # exact patching is slow
    with torch.no_grad():
        m0 = -answer_diff(model, batch)  # sfcd's metric per example: logit[patch] - logit[clean]
    assert pytest.approx(-m0.mean().item(), rel=1e-9) == Faithfulness(model, dicts, [batch], "mean").F_M

    eff = node_effects(model, dicts, batch, "attrib")
    exact = node_effects(model, dicts, batch, "exact")
    for s, d in dicts.items():
        assert eff[s].grad_f.abs().sum() > 0 and eff[s].grad_err.abs().sum() > 0, s.name
        xc, xp = outputs(model, batch.clean, [s.name])[s.name], outputs(model, batch.patch, [s.name])[s.name]
        want_f, want_e = split_over_nodes(d, xc, xp, grad_at(model, batch, s.name, xc))
        assert want_f.abs().max() > 1e-3 and want_e.abs().max() > 1e-4, s.name
        torch.testing.assert_close(eff[s].ie_f, want_f, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(eff[s].ie_err, want_e, rtol=1e-6, atol=1e-12)

        (fc, ec), (fp, ep) = nodes_of(d, xc), nodes_of(d, xp)
        T = xc.shape[1]
        by_size = exact[s].ie_f.abs().sum(0).flatten().topk(3).indices
        # the three largest features, the error node at the last position and at the noun (position 2; mlp.1 of
        # the last layer reaches the last position only, so its error there moves nothing: exact must say 0 too)
        moves = [(int(i) // d.d_sae, int(i) % d.d_sae) for i in by_size] + [(T - 1, -1), (2, -1)]
        for t, j in moves:
            v = torch.zeros_like(xc)
            v[:, t] = (ep - ec)[:, t] if j < 0 else (fp - fc)[:, t, j, None] * (d.W_dec[j] / d.scale)
            with torch.no_grad():
                want = -answer_diff(model, batch, {s.name: lambda o, v=xc + v: v}) - m0
            got = exact[s].ie_err[:, t] if j < 0 else exact[s].ie_f[:, t, j]
            assert want.abs().max() > 1e-6 or (t, j, s.name) == (2, -1, "mlp.1"), (s.name, t, j)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)  # exact's errors: float32
    # how well the estimates approximate exact patching on this model (a property of the method, not of the code)
    ig = node_effects(model, dicts, batch, "ig")
    y = torch.cat([exact[s].ie_f.sum(0).flatten() for s in dicts] + [exact[s].ie_err.sum(0) for s in dicts])
    for est in (eff, ig):
        x = torch.cat([est[s].ie_f.sum(0).flatten() for s in dicts] + [est[s].ie_err.sum(0) for s in dicts])
        nz = (x != 0) | (y != 0)
        assert nz.sum() > 20 and np.corrcoef(x[nz].numpy(), y[nz].numpy())[0, 1] >= IG_EXACT_R


def test_consistency_compact_effects_give_the_dense_edges(setup):
    # a consistency check (the sparse form against the dense one it is made from): what the stage keeps per batch
    # for edges is sparse, and the downstream gradients only where the feature is active on the clean input;
    # catches: a gradient needed elsewhere (a downstream feature that moves while inactive), an index lost in the
    # sparse round trip, per-position or paper-item edges reading the wrong entries
    from sfcd.circuits.effects import compact

    model, dicts, bs = setup
    eff = node_effects(model, dicts, bs[0], "attrib")
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
