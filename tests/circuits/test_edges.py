"""Which edges a circuit has (parallel and sequential blocks, partial site lists) and what they weigh, checked
against finite differences of the model itself on tiny random GPT-NeoX and GPT-2 models (float64)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from sfcd.circuits.data import PairBatch, metric
from sfcd.circuits.effects import edge_effects, edge_pairs, node_effects, y_edge_effects, y_pairs
from sfcd.circuits.splice import Identity
from sfcd.models.sites import hooks, parallel_blocks, parse_site, site_dim

V = 40


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = GPTNeoXConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            use_parallel_residual=kind == "neox-parallel",
        )
        model = GPTNeoXForCausalLM(cfg)
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pairs(seed=1, B=3, T=6) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, T), generator=g)
    patch = clean.clone()
    patch[:, 1] = torch.randint(0, V, (B,), generator=g)  # the pair differs at one position, as agreement pairs
    return PairBatch(clean, patch, torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g))


def identity_setup(kind: str, sites, seed: int, B: int = 3):
    """A tiny model with identity dictionaries (neurons) at ``sites``, a batch of pairs, attribution effects."""
    model = tiny(kind)
    dicts = {s: Identity(site_dim(model, s)) for s in sites}
    batch = pairs(seed=seed, B=B)
    return model, dicts, batch, node_effects(model, dicts, batch, "attrib")


def names(ps):
    return sorted((u.name, d.name, tuple(sorted(x.name for x in st))) for u, d, st in ps)


def S(*ns):
    return [parse_site(n) for n in ns]


FULL = S("embed", "attn.0", "mlp.0", "resid.0", "attn.1", "mlp.1", "resid.1")


def test_edge_rules_are_the_papers_for_parallel_blocks_and_add_attn_to_mlp_for_sequential_ones():
    # the paper's rules for parallel blocks (resid_{l-1} -> attn_l, mlp_l, resid_l; attn_l, mlp_l -> resid_l;
    # embed is resid_{-1}); its stop at attn_l for resid_{l-1} -> mlp_l, and at mlp_l for attn_l -> resid_l, cut
    # no path there and are left out. Catches: the attn -> mlp edge missing in sequential blocks (GPT-2), edges
    # across a chosen resid site, a partial list joining only neighbours, only the last site reaching y
    par = {(u, d) for u, d, _ in names(edge_pairs(FULL, parallel=True))}
    paper = set()
    for l, prev in ((0, "embed"), (1, "resid.0")):
        paper |= {(prev, f"attn.{l}"), (prev, f"mlp.{l}"), (prev, f"resid.{l}")}
        paper |= {(f"attn.{l}", f"resid.{l}"), (f"mlp.{l}", f"resid.{l}")}
    assert par == paper
    seq = {(u, d): st for u, d, st in names(edge_pairs(FULL, parallel=False))}
    assert set(seq) == paper | {("embed", "mlp.0")} | {("attn.0", "mlp.0"), ("attn.1", "mlp.1")}
    assert seq[("resid.0", "mlp.1")] == ("attn.1",) and seq[("attn.1", "resid.1")] == ("mlp.1",)
    assert seq[("resid.0", "resid.1")] == ("attn.1", "mlp.1")
    assert [(u.name, st) for u, st in y_pairs(FULL)] == [("resid.1", set())]
    # partial: each chosen site to the chosen ones it reaches first; y from every site not covered by a resid
    part = S("resid.0", "mlp.1")
    assert names(edge_pairs(part)) == [("resid.0", "mlp.1", ())]
    assert sorted((u.name, tuple(x.name for x in st)) for u, st in y_pairs(part)) == [
        ("mlp.1", ()),
        ("resid.0", ("mlp.1",)),
    ]


@pytest.mark.parametrize("kind", ["gpt2", "neox-sequential", "neox-parallel"])
def test_attn_to_mlp_edge_equals_finite_differences(kind):
    # the edge weight attn.0 -> mlp.0 (summed over upstream nodes) is the derivative of g_D . mlp.0 along the
    # attention output's clean -> patch change; a finite difference through the model says whether the edge
    # exists (sequential) or not (parallel), and its size
    model = tiny(kind)
    assert parallel_blocks(model) == (kind == "neox-parallel")
    up, down = parse_site("attn.0"), parse_site("mlp.0")
    dicts = {s: Identity(site_dim(model, s)) for s in (up, down)}
    batch = pairs()
    eff = node_effects(model, dicts, batch, "attrib")
    listed = [p for p in edge_pairs([up, down], parallel_blocks(model)) if p[:2] == (up, down)]
    nodes = [0, 3, 7]
    g = eff[down].grad_f
    delta = eff[up].delta_f

    def S_of(h):
        got = {}

        def set_attn(x):
            return eff[up].f_clean + h * delta

        def grab(x):
            got["mlp"] = x

        with torch.no_grad(), hooks(model, {up: set_attn, down: grab}):
            model(batch.clean)
        return torch.stack([(g[..., k] * got["mlp"][..., k]).sum() for k in nodes])

    h = 1e-5
    fd = (S_of(h) - S_of(-h)) / (2 * h)
    if kind == "neox-parallel":
        assert listed == [] and fd.abs().max() < 1e-12  # no path, and no edge
        return
    assert len(listed) == 1 and fd.abs().max() > 1e-6  # small random weights: small, but far from 0
    w = edge_effects(model, dicts, batch, up, down, listed[0][2], eff, nodes)
    torch.testing.assert_close(w[:, :-1].sum(1), fd, rtol=1e-5, atol=1e-9)


def test_y_edge_of_a_site_with_chosen_sites_after_it_equals_finite_differences():
    # partial list [resid.0, mlp.1]: resid.0 reaches y directly and through mlp.1; its edge to y counts the
    # direct paths only (mlp.1 held at its clean value), as the derivative of the metric shows
    up, mid = parse_site("resid.0"), parse_site("mlp.1")
    model, dicts, batch, eff = identity_setup("neox-parallel", (up, mid), 2)
    ((site, stop),) = [p for p in y_pairs([up, mid]) if p[0] == up]
    assert stop == {mid}
    w = y_edge_effects(model, dicts, batch, up, stop, eff)
    with torch.no_grad():
        got = {}
        with hooks(model, {mid: lambda x: got.setdefault("mlp", x)}):
            model(batch.clean)

    def m(h):
        fns = {up: lambda x: eff[up].f_clean + h * eff[up].delta_f, mid: lambda x: got["mlp"]}
        with torch.no_grad(), hooks(model, fns):
            return metric(model(batch.clean).logits[:, -1], batch).sum()

    h = 1e-5
    fd = (m(h) - m(-h)) / (2 * h)
    assert abs(fd) > 1e-4
    assert w.sum().item() == pytest.approx(fd.item(), rel=1e-6)
    # and it is not the node effect (which also counts the path through mlp.1)
    assert abs(w.sum().item() - eff[up].ie_f.sum().item()) > 1e-3 * abs(fd.item())


def test_consistency_exact_method_takes_its_edges_from_ig_gradients():
    # a consistency check: method=exact with edges crashed (no gradients); its edges now use IG's gradients, as
    # the paper does, so they equal IG's edges while its node effects stay exact's own. What the edges weigh is
    # checked against finite differences in the tests below
    model = tiny("gpt2")
    sites = S("attn.0", "mlp.0")
    dicts = {s: Identity(site_dim(model, s)) for s in sites}
    batch = pairs(seed=3, B=2, T=4)
    ex = node_effects(model, dicts, batch, "exact", edge_grads=True)
    ig = node_effects(model, dicts, batch, "ig")
    (pair,) = edge_pairs(sites, parallel=False)
    a = edge_effects(model, dicts, batch, *pair, ex, [0, 1])
    b = edge_effects(model, dicts, batch, *pair, ig, [0, 1])
    torch.testing.assert_close(a, b)
    assert a.abs().max() > 0
    assert not torch.allclose(ex[sites[1]].ie_f, ig[sites[1]].ie_f)  # the node effects are exact's own


def random_sae(model, site, kind: str, seed: int, batch: PairBatch):
    """A random float64 dictionary (3x wide) at ``site``, its input scale fitted to the site's clean outputs, as
    training would: ReLU or TopK (k=6). Its reconstruction error is far from zero."""
    from sfcd.sae.relu import ReLUSAE
    from sfcd.sae.topk import TopKSAE

    d = site_dim(model, site)
    sae = ReLUSAE(d, 3 * d, seed=seed) if kind == "relu" else TopKSAE(d, 3 * d, seed=seed, k=6)
    with torch.no_grad():  # unit decoder rows, a tied encoder: a rough reconstruction (ReLU: 3d half-active rows)
        w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.t() * (2 / 3 if kind == "relu" else 1.0))
    got = {}
    with torch.no_grad(), hooks(model, {site: lambda x: got.setdefault("x", x)}):
        model(batch.clean)
    sae.fit_input_scale(got["x"].reshape(-1, d).float())
    return sae.double().requires_grad_(False)


def site_outputs(model, x, sites) -> dict:
    got = {}
    with torch.no_grad(), hooks(model, {s: (lambda o, s=s: got.setdefault(s, o)) for s in sites}):
        model(x)
    return got


def nodes_of(sae, x):
    """(f, err) of output ``x``: the dictionary's own encode; err = x - (f @ W_dec + b_dec) / scale."""
    f = sae.encode(x)
    return f, x - (f @ sae.W_dec + sae.b_dec) / sae.scale


@pytest.mark.parametrize("kinds", [("relu", "topk"), ("topk", "relu")])
def test_edges_through_random_saes_with_error_nodes_equal_finite_differences(kinds):
    # attn.0 -> mlp.0 of a sequential (GPT-2) block through random ReLU / TopK dictionaries with real
    # reconstruction errors: every upstream column (each feature, moved by h * delta_f[j] * W_dec[j] / scale, and
    # the error node, moved by h * delta_err) to a downstream feature and to the downstream error node (its value
    # g_err . (x - decode(encode(x))) re-encoded from the moved stream). Catches: the downstream error node's value
    # detached or taken from the features, columns paired with the wrong feature's delta, the error column using
    # the features' delta; with identity dictionaries (every test before this one) the error nodes are all zero
    model = tiny("gpt2")
    up, down = parse_site("attn.0"), parse_site("mlp.0")
    batch = pairs(seed=9)
    dicts = {up: random_sae(model, up, kinds[0], 11, batch), down: random_sae(model, down, kinds[1], 12, batch)}
    ((_, _, stop),) = edge_pairs([up, down], parallel=False)
    eff = node_effects(model, dicts, batch, "attrib")
    k = int(eff[down].ie_f.sum((0, 1)).abs().argmax())
    w = edge_effects(model, dicts, batch, up, down, stop, eff, [k, -1])
    su, sd = dicts[up], dicts[down]
    out = {n: site_outputs(model, getattr(batch, n), [up])[up] for n in ("clean", "patch")}
    (fc, ec), (fp, ep) = nodes_of(su, out["clean"]), nodes_of(su, out["patch"])
    assert ec.norm() > 0.1 * out["clean"].norm()
    g_f, g_e = eff[down].grad_f[..., k], eff[down].grad_err

    def values(x_up):
        got = site_outputs_with(model, batch.clean, {up: lambda o: x_up}, down)
        f, err = nodes_of(sd, got)
        return torch.stack([(g_f * f[..., k]).sum(), (g_e * err).sum()])

    h = 1e-6
    fd = []
    for j in range(su.d_sae + 1):
        v = ep - ec if j == su.d_sae else (fp - fc)[..., j : j + 1] * (su.W_dec[j] / su.scale)
        fd.append((values(out["clean"] + h * v) - values(out["clean"] - h * v)) / (2 * h))
    fd = torch.stack(fd, 1)  # [2, F_up + 1]
    top = fd.abs().max().item()  # small random weights: effects ~1e-6 to 1e-4
    assert top > 1e-10 and fd[0, :-1].abs().max() > 1e-3 * top and fd[1, :-1].abs().max() > 1e-3 * top
    assert fd[:, -1].abs().min() > 1e-3 * top
    torch.testing.assert_close(w, fd, rtol=1e-5, atol=1e-7 * top)


def site_outputs_with(model, x, fns, grab_site):
    """The output of ``grab_site`` with hooks ``fns`` setting upstream outputs."""
    got = {}
    with torch.no_grad(), hooks(model, {**fns, grab_site: lambda o: got.setdefault("d", o)}):
        model(x)
    return got["d"]


def test_node_effects_where_the_metric_reads_a_site_linearly_equal_the_planted_value():
    # a GPT-NeoX without its final layer norm: the metric reads the last layer's mlp.1 linearly, so every method
    # (attribution, IG at any number of steps, exact patching) gives each node its planted effect
    # u . W_dec[j] / scale * delta_f[j] at the last position (u = W_U[patch answer] - W_U[clean answer]) and 0 before
    # it (the MLP is position-wise, and no layer follows). Catches: IG divided by steps + 1 (or any wrong
    # normaliser), a sign flip, effects at the wrong position or of the wrong example, exact patching of more than
    # one node; per node, where a Pearson correlation would pass any scale
    model = tiny("neox-parallel")
    model.gpt_neox.final_layer_norm = torch.nn.Identity()
    site = parse_site("mlp.1")
    batch = pairs(seed=8)
    sae = random_sae(model, site, "topk", 13, batch)
    out = {n: site_outputs(model, getattr(batch, n), [site])[site] for n in ("clean", "patch")}
    (fc, ec), (fp, ep) = nodes_of(sae, out["clean"]), nodes_of(sae, out["patch"])
    W_U = model.get_output_embeddings().weight
    u = W_U[batch.patch_answer] - W_U[batch.clean_answer]  # [B, d]
    planted_f, planted_e = torch.zeros_like(fc), torch.zeros(fc.shape[:2], dtype=fc.dtype)
    planted_f[:, -1] = (u @ (sae.W_dec / sae.scale).T) * (fp - fc)[:, -1]
    planted_e[:, -1] = (u * (ep - ec)[:, -1]).sum(-1)
    assert (planted_f[:, -1] != 0).sum() >= 6 and planted_e[:, -1].abs().min() > 1e-6
    for method, steps in (("attrib", 1), ("ig", 3), ("ig", 10), ("exact", 1)):
        e = node_effects(model, {site: sae}, batch, method, steps=steps)[site]
        torch.testing.assert_close(e.ie_f, planted_f, rtol=1e-9, atol=1e-12, msg=lambda m, x=method: f"{x}: {m}")
        tol = 1e-6 if method == "exact" else 1e-9  # exact's error effects are float32
        torch.testing.assert_close(
            e.ie_err.double(), planted_e, rtol=tol, atol=1e-12, msg=lambda m, x=method: f"{x}: {m}"
        )


def test_per_position_edges_equal_finite_differences_at_one_position():
    # the weight of upstream position t_u -> downstream (node k, position t_d): moving only position t_u of the
    # upstream site along its delta. Catches: positions swapped or summed, a later position reaching an earlier
    # one, per-position rows that do not add up to the summed edge
    model = tiny("neox-parallel")
    up, down = parse_site("resid.0"), parse_site("attn.1")
    dicts = {s: Identity(site_dim(model, s)) for s in (up, down)}
    batch = pairs(seed=4)
    T = batch.clean.shape[1]
    eff = node_effects(model, dicts, batch, "attrib")
    ((_, _, stop),) = [p for p in edge_pairs([up, down]) if p[:2] == (up, down)]
    k = 5
    w = edge_effects(model, dicts, batch, up, down, stop, eff, [(k, t) for t in range(T)], per_position=True)
    assert w.shape == (T, T, site_dim(model, up) + 1)
    summed = edge_effects(model, dicts, batch, up, down, stop, eff, [k])
    torch.testing.assert_close(w.sum((0, 1)), summed[0])
    later = torch.ones(T, T, dtype=torch.bool).triu(1)  # [t_d, t_u] with t_u > t_d
    assert w[later].abs().max() == 0

    def s_of(h, t_u, t_d):
        got = {}
        move = torch.zeros(1, T, 1, dtype=torch.float64)
        move[0, t_u] = h

        def fns_up(x):
            return eff[up].f_clean + move * eff[up].delta_f

        with torch.no_grad(), hooks(model, {up: fns_up, down: lambda x: got.setdefault("d", x)}):
            model(batch.clean)
        return (eff[down].grad_f[:, t_d, k] * got["d"][:, t_d, k]).sum()

    h = 1e-5
    checked = 0
    for t_d, t_u in ((T - 1, 1), (T - 1, T - 1), (3, 1), (2, 0)):
        fd = (s_of(h, t_u, t_d) - s_of(-h, t_u, t_d)) / (2 * h)
        assert w[t_d, t_u, :-1].sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-12)
        checked += abs(fd.item()) > 1e-6
    assert checked >= 2


def finite_difference(model, batch, up, eff, fns_after, scalar, h=1e-5, move=None):
    """d scalar / dh with ``up``'s output set to clean + h * delta (``move``: a [T] mask of the positions moved),
    other hooks ``fns_after``; ``scalar(captured)`` reads what the hooks captured."""

    def at(hh):
        got = {}
        d = eff[up].delta_f if move is None else eff[up].delta_f * move[None, :, None]
        fns = {up: lambda x: eff[up].f_clean + hh * d, **{s: fn(got) for s, fn in fns_after.items()}}
        with torch.no_grad(), hooks(model, fns):
            got["logits"] = model(batch.clean).logits[:, -1]
        return scalar(got)

    return (at(h) - at(-h)) / (2 * h)


def grab(name):
    return lambda got: lambda x: got.setdefault(name, x)


def test_paper_edge_items_equal_finite_differences_of_the_items_above_threshold():
    # edge_items=paper: only the downstream node's (example, position) items whose own effect passes the node
    # threshold are differentiated. Catches: the threshold ignored (both rules equal), applied to the upstream
    # side, or to the aggregated effect
    up, down = parse_site("attn.0"), parse_site("mlp.0")
    model, dicts, batch, eff = identity_setup("neox-sequential", (up, down), 5, B=4)
    k = 2
    ie = eff[down].ie_f[..., k]
    tau = ie.abs().flatten().median().item()
    chosen = ie.abs() > tau
    assert 0 < int(chosen.sum()) < chosen.numel()
    ((_, _, stop),) = [p for p in edge_pairs([up, down], parallel=False)]
    paper = edge_effects(model, dicts, batch, up, down, stop, eff, [k], item_threshold=tau)[0]
    every = edge_effects(model, dicts, batch, up, down, stop, eff, [k])[0]
    g = eff[down].grad_f[..., k]
    fd_paper = finite_difference(
        model, batch, up, eff, {down: grab("d")}, lambda got: (g * got["d"][..., k])[chosen].sum()
    )
    fd_all = finite_difference(model, batch, up, eff, {down: grab("d")}, lambda got: (g * got["d"][..., k]).sum())
    assert paper[:-1].sum().item() == pytest.approx(fd_paper.item(), rel=1e-5)
    assert every[:-1].sum().item() == pytest.approx(fd_all.item(), rel=1e-5)
    assert abs(fd_paper.item() - fd_all.item()) > 1e-3 * abs(fd_all.item())


def test_resid_to_resid_edge_counts_only_the_direct_path():
    # resid.0 -> resid.1 with attn.1 and mlp.1 stopped: only the residual connection itself; finite differences
    # with attn.1 and mlp.1 held at their clean outputs. Without the stops the edge would be the total effect
    up, down = parse_site("resid.0"), parse_site("resid.1")
    model, dicts, batch, eff = identity_setup("neox-parallel", (up, down), 6)
    (pair,) = [p for p in edge_pairs(FULL) if p[:2] == (up, down)]
    a1, m1 = parse_site("attn.1"), parse_site("mlp.1")
    assert pair[2] == {a1, m1}
    with torch.no_grad():
        clean = {}
        with hooks(model, {a1: lambda x: clean.setdefault("a", x), m1: lambda x: clean.setdefault("m", x)}):
            model(batch.clean)
    k = 4
    g = eff[down].grad_f[..., k]
    w = edge_effects(model, dicts, batch, *pair, eff, [k])[0]
    frozen = {a1: lambda got: lambda x: clean["a"], m1: lambda got: lambda x: clean["m"], down: grab("d")}
    fd = finite_difference(model, batch, up, eff, frozen, lambda got: (g * got["d"][..., k]).sum())
    total = finite_difference(model, batch, up, eff, {down: grab("d")}, lambda got: (g * got["d"][..., k]).sum())
    assert w[:-1].sum().item() == pytest.approx(fd.item(), rel=1e-5)
    assert abs(total.item() - fd.item()) > 1e-3 * abs(fd.item())  # the stops matter here


def test_ig_in_chunks_of_interpolation_points_equals_one_pass():
    # circuit.ig_batch bounds the sequences per IG forward pass; catches a chunk dropped, counted twice, or the
    # mean taken per chunk
    model = tiny("neox-parallel")
    sites = S("resid.0", "mlp.1")
    dicts = {s: Identity(site_dim(model, s)) for s in sites}
    batch = pairs(seed=7)
    whole = node_effects(model, dicts, batch, "ig", steps=10)
    chunked = node_effects(model, dicts, batch, "ig", steps=10, ig_batch=3 * len(batch))  # 3 + 3 + 3 + 1 points
    for s in sites:
        torch.testing.assert_close(chunked[s].ie_f, whole[s].ie_f)
        torch.testing.assert_close(chunked[s].grad_err, whole[s].grad_err)
    assert whole[sites[0]].ie_f.abs().max() > 1e-6
