"""Sparse feature circuits with transcoders at the MLP sites (issue 23, item 2), on the test run's micro model
(2 layers, parallel blocks) and transcoders trained here on a private copy of it.

Ground truths come from plain torch forward hooks on the transformers modules (no sfcd splicing or effects code):
the MLP's input is read at its layer norm's output, the MLP's output is read, set or made a leaf, and the metric is
read from the logits; the transcoders' weights are read from their files (sparsify's layout: ``encoder.weight``
[F, d], ``W_dec`` [F, d], ``W_skip`` [d, d], raw units)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sfcd.circuits.data import PairBatch, batches
from sfcd.circuits.dictionaries import dictionary_folders, folders_in, load_dictionaries
from sfcd.circuits.effects import compact, direct_activations, node_effects, norm_scales
from sfcd.circuits.splice import Splice
from sfcd.circuits.stage import circuit_edges
from sfcd.config import compose
from sfcd.data.tasks import load_task
from sfcd.errors import InputError, MissingArtifactError
from sfcd.models.loading import load_model, load_tokenizer
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir

MLPS = ("mlp.0", "mlp.1")


@pytest.fixture(scope="module")
def tc_run(test_run, tmp_path_factory):
    """A private copy of the shared run with TopK skip transcoders at both MLPs (transcoders/step24/mlp.<l>)."""
    from sfcd.sae.stage import train_saes

    run_dir = tmp_path_factory.mktemp("tc") / "run"
    shutil.copytree(test_run.run_dir, run_dir)
    over = ["sae.sites=[]", "sae.transcoders=[mlp]", "sae.n_tokens=16384", "sae.lr=0.01"]  # FVE 0.97 at both
    train_saes(compose(["experiment=test", f"run_dir={run_dir}", *over]))
    return RunDir(run_dir)


@pytest.fixture(scope="module")
def setup(tc_run):
    """The model and its transcoders in float64 (gradients and finite differences to 1e-9), a batch of pairs."""
    model = load_model(tc_run.root).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sites = [parse_site(s, model) for s in MLPS]
    dicts = load_dictionaries(model, sites, dictionary_folders(None, tc_run, 24, sites, transcoders=True))
    dicts = {s: d.double().requires_grad_(False) for s, d in dicts.items()}
    task = load_task(tc_run.task_file("nounpp", "train"), load_tokenizer(tc_run.root))
    return model, dicts, batches(task, 8, 8)[0], tc_run


# ----------------------------------------------------------------------------- plain hooks: the ground truths
def block(model, l: int):
    return model.gpt_neox.layers[l]


@contextlib.contextmanager
def plain(model, mlp_out: dict | None = None, read: dict | None = None):
    """Plain torch hooks: ``mlp_out[l](output)`` replaces MLP l's output; ``read`` collects each layer's MLP input
    (its layer norm's output, ``in<l>``), the norm's input (``r<l>``) and the MLP's output (``out<l>``)."""
    handles = []
    for l in range(2):
        b = block(model, l)
        if read is not None:
            handles.append(b.post_attention_layernorm.register_forward_hook(_put(read, l)))
        fn = (mlp_out or {}).get(l)
        handles.append(b.mlp.register_forward_hook(_mlp_hook(fn, read, l)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _put(read, l):
    def h(module, args, out):
        read[f"r{l}"], read[f"in{l}"] = args[0].detach().clone(), out.detach().clone()

    return h


def _mlp_hook(fn, read, l):
    def h(module, args, out):
        new = fn(out) if fn is not None else None
        if read is not None:
            read[f"out{l}"] = (out if new is None else new).detach().clone()
        return new

    return h


def answer_diff(logits, batch):
    rows = torch.arange(len(batch))
    return logits[rows, batch.clean_answer] - logits[rows, batch.patch_answer]


def metric_grad(model, batch, l: int, value: torch.Tensor) -> torch.Tensor:
    """d m / d(MLP l's output) with that output set to ``value``, m = sum of logit[patch] - logit[clean] (sfcd's
    metric), every other module the model's own."""
    leaf = value.detach().clone().requires_grad_(True)
    with plain(model, {l: lambda o: leaf}):
        m = -answer_diff(model(batch.clean).logits[:, -1], batch).sum()
    return torch.autograd.grad(m, leaf)[0]


def files(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(folder / "sae.safetensors")).items()}


def k_of(folder: Path) -> int:
    return int(json.loads((folder / "cfg.json").read_text())["k"])


def tc_of(t: dict[str, torch.Tensor], k: int):
    """The transcoder computed from its file's tensors: (encode, decode, skip) in raw units, TopK of relu."""

    def encode(x):
        pre = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])
        vals, idx = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    return encode, lambda f: f @ t["W_dec"] + t["b_dec"], lambda x: x @ t["W_skip"].T


def plain_nodes(model, batch, run):
    """Per layer, from plain hooks and the files: clean and patch (f, err, skip) and the clean MLP input/output."""
    out = {}
    for x, tag in ((batch.clean, "c"), (batch.patch, "p")):
        read = {}
        with torch.no_grad(), plain(model, read=read):
            model(x)
        for l in range(2):
            folder = run.transcoders(24) / f"mlp.{l}"
            enc, dec, skip = tc_of(files(folder), k_of(folder))
            f = enc(read[f"in{l}"])
            s = skip(read[f"in{l}"])
            out[(l, tag)] = {"f": f, "err": read[f"out{l}"] - dec(f) - s, "skip": s, **read}
    return out


# --------------------------------------------------------------------------------------------------- tests
def test_transcoder_splice_reads_the_mlp_input_and_leaves_logits_unchanged(setup):
    """Transcoders at both MLPs with every error node kept: the logits are the model's (plain and with f/err as
    leaves), f is the transcoder's code of the MLP's *input* (its layer norm's output) and err = MLP out - (decode(f)
    + skip(input)), both as computed here from the files. Bugs caught (each made and seen failing): f encoded from
    the MLP's output (the logits alone would not show it: err absorbs it), the skip path left out of the spliced
    output, err computed without the skip (x - decode(f))."""
    model, dicts, batch, run = setup
    want = plain_nodes(model, batch, run)
    with torch.no_grad():
        ref = model(batch.clean).logits
        sp = Splice(dicts)
        with sp.applied(model):
            got = model(batch.clean).logits
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    for l, s in enumerate(dicts):
        torch.testing.assert_close(sp.states[s].f, want[(l, "c")]["f"], atol=1e-10, rtol=0)
        torch.testing.assert_close(sp.states[s].err, want[(l, "c")]["err"], atol=1e-10, rtol=0)
        assert want[(l, "c")]["skip"].norm() > 0.1 * want[(l, "c")]["out" + str(l)].norm()  # a real skip path
        assert want[(l, "c")]["err"].norm() > 0.01 * want[(l, "c")]["out" + str(l)].norm()  # a real error node
    leaves = Splice(dicts, leaves=set(dicts))
    with leaves.applied(model):
        got = model(batch.clean).logits
        m = got[:, -1].sum()
    torch.testing.assert_close(got.detach(), ref, atol=1e-10, rtol=0)
    g = torch.autograd.grad(m, [leaves.states[s].f for s in dicts])
    assert all(x.abs().sum() > 0 for x in g)


@pytest.mark.parametrize("method", ["attrib", "ig"])
def test_transcoder_node_effects_equal_plain_gradients(setup, method):
    """Node effects of transcoder features and error nodes (both MLPs spliced, as the stage runs them) against
    gradients of the plain model: attribution = (dm/d out_l . W_dec[j]) delta f_j and (dm/d out_l . delta err),
    the gradient of the model itself at the clean input (total derivative, through the real MLP 1 for MLP 0's
    nodes); IG: the gradient at out_l = out_c + alpha (decode(f_p) - decode(f_c) + err_p - err_c), averaged over
    alpha = 0, .1, .., .9 (the skip path keeps the clean input's value: no node carries it). Bugs caught: the
    gradient to upstream nodes passing only through the downstream transcoder's skip path (not the MLP), err's
    delta without the skip, IG interpolating the skip path too."""
    model, dicts, batch, run = setup
    batch = last_differs(batch)  # MLP 0's nodes then reach the metric through MLP 1 too
    want = plain_nodes(model, batch, run)
    eff = node_effects(model, dicts, batch, method, steps=10)
    for l, s in enumerate(dicts):
        c, p = want[(l, "c")], want[(l, "p")]
        dec = files(run.transcoders(24) / s.name)["W_dec"]
        step = (p["f"] - c["f"]) @ dec + p["err"] - c["err"]  # decode(f_p) - decode(f_c) + delta err
        alphas = [0.0] if method == "attrib" else [k / 10 for k in range(10)]
        G = sum(metric_grad(model, batch, l, c[f"out{l}"] + a * step) for a in alphas) / len(alphas)
        torch.testing.assert_close(eff[s].ie_f, (G @ dec.T) * (p["f"] - c["f"]), atol=1e-13, rtol=1e-7)
        torch.testing.assert_close(eff[s].ie_err, (G * (p["err"] - c["err"])).sum(-1), atol=1e-13, rtol=1e-7)
        assert eff[s].ie_f.abs().max() > 1e-6 and eff[s].ie_err.abs().max() > 1e-6  # the micro model: small effects


def last_differs(batch: PairBatch) -> PairBatch:
    """The pairs with the patch's last token also changed (another example's): in this 2-layer parallel model MLP 0
    reads its own token's embedding and MLP 1 writes to the logits of its own position, so the direct mlp.0 ->
    mlp.1 path reaches the metric (read at the last position) only through a change at the last token."""
    patch = batch.patch.clone()
    patch[:, -1] = batch.clean[:, -1].roll(1)
    assert (patch[:, -1] != batch.clean[:, -1]).any()
    return PairBatch(batch.clean, patch, batch.clean_answer, batch.patch_answer)


def _edges(setup):
    """mlp.0 -> mlp.1 edges through the stage's own edge code (attribution effects) between every feature and
    error node of both."""
    model, dicts, batch, run = setup
    eff = node_effects(model, dicts, batch, "attrib")
    keep = {s: (torch.ones(d.d_sae, dtype=torch.bool), True) for s, d in dicts.items()}
    nodes = [
        {"id": f"{s}/{j}", "site": s, "feature": j, "position": None, "effect": 0.0} for s in MLPS for j in range(128)
    ]
    nodes += [{"id": f"{s}/eps", "site": s, "feature": None, "position": None, "effect": 0.0} for s in MLPS]
    edges = circuit_edges(model, dicts, [batch], [compact(eff)], list(dicts), keep, len(batch), False, nodes)
    return eff, {(e["from"], e["to"]): e for e in edges}


def test_direct_edge_between_transcoder_features_is_virtual_weight_times_activation(setup):
    """The split of the edges mlp.0/i' -> mlp.1/i, against a hand computation from the files and plain hooks:
    virtual_weight = (W_dec0[i'] - its mean) . (gamma_1 * W_enc1[:, i]) (gamma_1 the layer norm's weight);
    activation = sum over tokens of g_i 1[f_i > 0] / sigma delta f_i' / n, g = dm/d out_1 . W_dec1[i] and sigma the
    layer norm's scale read on the clean prompt; direct = their product. Then by finite differences of the plain
    model (moving MLP 0's output along delta f_i' W_dec0[i'] and reading sum g_i f_i(MLP 1's input)): with the
    layer norm's sigma held at its clean value this is ``direct`` (in parallel blocks the residual stream is MLP 0's
    only path to MLP 1), and free it is ``weight`` (the edge as sfcd computes every edge). Bugs caught: the
    layer norm's centring left out of the virtual weight, 1/sigma left out of the activation, the activation not
    masked to the downstream feature's active tokens, gamma applied to the decoder side twice."""
    model, dicts, batch, run = setup
    batch = last_differs(batch)
    eff, edges = _edges((model, dicts, batch, run))
    want = plain_nodes(model, batch, run)
    c0, p0, c1 = want[(0, "c")], want[(0, "p")], want[(1, "c")]
    t0, t1 = files(run.transcoders(24) / "mlp.0"), files(run.transcoders(24) / "mlp.1")
    norm = block(model, 1).post_attention_layernorm
    gamma = norm.weight
    r = c1["r1"]
    sigma = torch.sqrt(r.var(-1, unbiased=False) + norm.eps)
    # LN's output is gamma (r - mean) / sigma + beta: the norm read back from its input
    torch.testing.assert_close(gamma * (r - r.mean(-1, keepdim=True)) / sigma[..., None] + norm.bias, c1["in1"])
    g = metric_grad(model, batch, 1, c1["out1"]) @ t1["W_dec"].T  # dm/df_i at MLP 1
    n = len(batch)
    df0 = p0["f"] - c0["f"]
    fd_pairs = sorted((e for e in edges.values() if "direct" in e), key=lambda e: -abs(e["direct"]))[:4]
    k = k_of(run.transcoders(24) / "mlp.1")
    inv_sigma = norm_scales(model, batch.clean, [1])[1]
    torch.testing.assert_close(inv_sigma, 1 / sigma)
    for (src, dst), e in edges.items():
        if dst == "y":
            continue
        if not (src.startswith("mlp.0/") and dst.startswith("mlp.1/")) or "eps" in src + dst:
            assert "direct" not in e, e  # only transcoder feature -> transcoder feature edges are split
            continue
        j, i = int(src.split("/")[1]), int(dst.split("/")[1])
        dec = t0["W_dec"][j] - t0["W_dec"][j].mean()
        v = float(dec @ (gamma * t1["encoder.weight"][i]))
        act = float(((g[..., i] * (c1["f"][..., i] > 0) / sigma) * df0[..., j]).sum() / n)
        assert e["virtual_weight"] == pytest.approx(v, rel=1e-9, abs=1e-15), (src, dst)
        assert e["activation"] == pytest.approx(act, rel=1e-7, abs=1e-15), (src, dst)
        assert e["direct"] == pytest.approx(v * act, rel=1e-7, abs=1e-18)
        if e in fd_pairs:
            fd_held = _fd(model, batch, t0, t1, k, j, i, g, df0, sigma) / n
            fd_free = _fd(model, batch, t0, t1, k, j, i, g, df0, None) / n
            assert e["direct"] == pytest.approx(fd_held, rel=1e-5, abs=1e-14), (e, fd_held)
            assert e["weight"] == pytest.approx(fd_free, rel=1e-5, abs=1e-14), (e, fd_free)
            # the same activation from the uncompacted effects (gradients also where the feature is inactive)
            raw = direct_activations(inv_sigma, *dicts, eff, [i], [j])
            assert float(raw[0, 0]) / n == pytest.approx(e["activation"], rel=1e-9, abs=1e-18)
    assert len(fd_pairs) == 4 and abs(fd_pairs[-1]["direct"]) > 1e-9, fd_pairs
    # mlp.0 -> y, with the gradient stopped at mlp.1's nodes: the metric's gradient at MLP 0's output with MLP 1's
    # output held except for its skip path (W_skip LN(r), still a function of MLP 0's output), times the deltas
    enc1, dec1, skip1 = tc_of(t1, k_of(run.transcoders(24) / "mlp.1"))
    seen = {}
    leaf = c0["out0"].clone().requires_grad_(True)
    h_in = block(model, 1).post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.update(x=o))
    try:
        fns = {0: lambda o: leaf, 1: lambda o: o.detach() + skip1(seen["x"]) - skip1(seen["x"]).detach()}
        with plain(model, fns):
            m = -answer_diff(model(batch.clean).logits[:, -1], batch).sum()
    finally:
        h_in.remove()
    G0 = torch.autograd.grad(m, leaf)[0]
    w_y = ((G0 @ t0["W_dec"].T) * df0).sum((0, 1)) / n
    for j in range(128):
        e = edges.get((f"mlp.0/{j}", "y"))
        assert (0.0 if e is None else e["weight"]) == pytest.approx(float(w_y[j]), rel=1e-7, abs=1e-15), j
    eps = float((G0 * (p0["err"] - c0["err"])).sum() / n)
    assert edges[("mlp.0/eps", "y")]["weight"] == pytest.approx(eps, rel=1e-7, abs=1e-15)
    assert w_y.abs().max() > 1e-6


def _fd(model, batch, t0, t1, k, j, i, g, df0, sigma, h=1e-6):
    """d/dh of sum g_i f_i(MLP 1's input) with MLP 0's output moved by h delta f_j W_dec0[j] at every token;
    ``sigma``: MLP 1's layer norm holds its scale at these values (else the model's own layer norm)."""
    enc1, _, _ = tc_of(t1, k)
    norm = block(model, 1).post_attention_layernorm
    move = df0[..., j, None] * t0["W_dec"][j]

    def S(hh):
        read = {}
        held = None
        if sigma is not None:

            def held_norm(module, args, out):
                r = args[0]
                return module.weight * (r - r.mean(-1, keepdim=True)) / sigma[..., None] + module.bias

            held = norm.register_forward_hook(held_norm)
        try:
            with torch.no_grad(), plain(model, {0: lambda o: o + hh * move}, read=read):
                model(batch.clean)
        finally:
            if held is not None:
                held.remove()
        return float((g[..., i] * enc1(read["in1"])[..., i]).sum())

    return (S(h) - S(-h)) / (2 * h)


def test_circuit_stage_with_transcoders_end_to_end(tc_run, tmp_path):
    """``sfcd circuit circuit.transcoders=true circuit.sites=[mlp.0,mlp.1]`` on the test run, a task without patch
    prefixes (zero ablation is the patch: MLP 0's features change at the last token, so mlp.0 -> mlp.1 edges reach
    the metric): circuit.json is strict JSON naming the transcoders, with faithfulness (or an unresolvable marker)
    and the split on its mlp.0 -> mlp.1 feature edges (direct = virtual_weight x activation); F(M), everything
    kept, is the plain model's metric on the evaluation rows. Bugs caught: the run's SAE read at mlp.1 instead of
    its transcoder (metadata), the split missing from circuit.json, a splice that changes the model (F(M))."""
    from sfcd.circuits.stage import circuit_pairs, find_circuit

    rows = [json.loads(x) for x in tc_run.task_file("nounpp", "train").read_text().splitlines()[:24]]
    task = tmp_path / "nopair.jsonl"
    task.write_text("".join(json.dumps({k: r[k] for k in ("clean_prefix", "clean_answer")}) + "\n" for r in rows))
    out = tmp_path / "c"
    over = ["experiment=test", f"run_dir={tc_run.root}", "circuit.transcoders=true", "circuit.sites=[mlp.0,mlp.1]"]
    over += [f"circuit.task={task}", f"circuit.out_dir={out}", "circuit.method=attrib", "circuit.node_threshold=1e-4"]
    cfg = compose([*over, "circuit.baselines=false"])
    find_circuit(cfg)

    def strict(x):
        raise ValueError(f"not strict JSON: {x}")

    c = json.loads((out / "circuit.json").read_text(), parse_constant=strict)
    meta = c["metadata"]
    assert meta["transcoders"] == list(MLPS) and meta["edge_split"]
    assert meta["dictionaries"] == {s: str(tc_run.transcoders(24) / s) for s in MLPS}
    assert "faithfulness" in meta and (meta["faithfulness"] is not None or meta["resolvable"] is False)
    split = [e for e in c["edges"] if "direct" in e]
    assert split and all(e["from"].startswith("mlp.0/") and e["to"].startswith("mlp.1/") for e in split)
    assert any(e["direct"] != 0 for e in split)
    for e in split:
        assert e["direct"] == pytest.approx(e["virtual_weight"] * e["activation"], rel=1e-12, abs=1e-15)
    # F(M): the plain model's logit[answer] over the evaluation rows (float32)
    model, tok = load_model(tc_run.root), load_tokenizer(tc_run.root)
    _, eval_task, _, evals, _ = circuit_pairs(tc_run, cfg.circuit, tok, str(task))
    M = []
    with torch.no_grad():
        for b in batches(eval_task, 16, 32, pairs=evals):
            M.append(model(b.clean).logits[:, -1].gather(1, b.clean_answer[:, None])[:, 0])
    assert meta["F_M"] == pytest.approx(torch.cat(M).mean().item(), abs=1e-4)


def test_transcoder_folders_are_found_and_checked(tc_run, setup, tmp_path):
    """A sparsify run folder of transcoders named by hookpoint (``layers.0.mlp``, ``gpt_neox.layers.1.mlp``) maps
    to mlp.0/mlp.1 beside an SAE; a transcoder at a non-MLP site or of the wrong width is refused with an InputError
    naming the folder; circuit.transcoders=true without the run's transcoders names the command that trains them.
    Bugs caught: base-module hookpoints not recognised, the width check comparing only the input."""
    model = setup[0]
    root = tmp_path / "sparsify"
    shutil.copytree(tc_run.transcoders(24) / "mlp.0", root / "layers.0.mlp")
    shutil.copytree(tc_run.transcoders(24) / "mlp.1", root / "gpt_neox.layers.1.mlp")
    shutil.copytree(tc_run.root / "saes" / "step24" / "resid.0", root / "resid.0")
    found = folders_in(root)
    assert found == {
        "mlp.0": root / "layers.0.mlp",
        "mlp.1": root / "gpt_neox.layers.1.mlp",
        "resid.0": root / "resid.0",
    }
    sites = [parse_site(s) for s in ("resid.0", "mlp.0", "mlp.1")]
    dicts = load_dictionaries(model, sites, dictionary_folders(str(root), tc_run, 24, sites))
    assert [getattr(d, "is_transcoder", False) for d in dicts.values()] == [False, True, True]
    with pytest.raises(InputError, match="replaces an MLP"):
        load_dictionaries(model, [parse_site("resid.1")], {parse_site("resid.1"): root / "layers.0.mlp"})
    bad = tmp_path / "bad"  # a consistent transcoder of a 16-wide MLP
    shutil.copytree(root / "layers.0.mlp", bad)
    t = load_file(str(bad / "sae.safetensors"))
    F = t["W_dec"].shape[0]
    t |= {"encoder.weight": torch.zeros(F, 16), "W_dec": torch.zeros(F, 16), "b_dec": torch.zeros(16)}
    t["W_skip"] = torch.zeros(16, 16)
    save_file(t, str(bad / "sae.safetensors"))
    cfg = json.loads((bad / "cfg.json").read_text())
    (bad / "cfg.json").write_text(json.dumps(cfg | {"d_in": 16}))
    with pytest.raises(InputError, match=f"{bad}.*16 -> 16.*32 -> 32"):
        load_dictionaries(model, [parse_site("mlp.0")], {parse_site("mlp.0"): bad})
    with pytest.raises(MissingArtifactError, match="sae.transcoders"):
        dictionary_folders(None, tc_run, 8, sites, transcoders=True)
    assert OmegaConf.select(compose(["experiment=test"]), "circuit.transcoders") is False
