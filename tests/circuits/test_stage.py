"""The circuit stage (``sfcd circuit``) end to end, each number it writes checked against a computation made here
without sfcd's circuit code: the model loaded with ``transformers`` in float64, plain ``torch`` forward hooks on its
modules, exact patching one node at a time, integrated gradients and attribution by ``torch.autograd``, edges by
central finite differences, F(M) / F(empty) / F(C) by setting the modules' outputs, and the task rows the stage names
tokenized here. The dictionaries are used through their own ``encode`` / ``decode`` (a crosscoder's view is built
here from its weights file)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfcd.config import compose


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread while these tests run (restored after): their hundreds of forward passes on [6, 6, 32]
    tensors are op overhead, which a second thread only adds to (several times over on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SITES = ("resid.0", "mlp.1")  # the shared run's SAEs; in parallel blocks mlp.1 reads resid.0 directly
_MODULES = {"resid": "gpt_neox.layers.{}", "mlp": "gpt_neox.layers.{}.mlp"}


# ----------------------------------------------------------------------------------------- plain-hook reference
@contextlib.contextmanager
def plain_hooks(model, fns: dict[str, Callable]):
    """``torch`` forward hooks on the modules of ``fns`` ({site name: fn(output) -> replacement or None})."""

    def hook(fn):
        def h(module, inputs, output):
            assert isinstance(output, torch.Tensor), type(output)
            return fn(output)

        return h

    handles = []
    try:
        for site, fn in fns.items():
            kind, layer = site.split(".")
            handles.append(model.get_submodule(_MODULES[kind].format(layer)).register_forward_hook(hook(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Pairs:
    clean: torch.Tensor  # [N, T]
    patch: torch.Tensor | None  # [N, T]; None without patch prefixes
    clean_answer: torch.Tensor  # [N]
    patch_answer: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.clean)


def task_rows(part: dict, tok) -> Pairs:
    """The rows the stage says it used (``metadata.pairs.discovery`` / ``.evaluation``: file and row numbers among
    its non-blank lines), tokenized here."""
    lines = [json.loads(x) for x in Path(part["file"]).read_text().splitlines() if x.strip()]
    rows = [lines[i] for i in part["rows"]]
    assert len(rows) == part["n"]

    def answer(text):
        (i,) = tok(text, add_special_tokens=False)["input_ids"]
        return i

    nopair = "patch_prefix" not in rows[0]
    return Pairs(
        torch.tensor([tok(r["clean_prefix"])["input_ids"] for r in rows]),
        None if nopair else torch.tensor([tok(r["patch_prefix"])["input_ids"] for r in rows]),
        torch.tensor([answer(r["clean_answer"]) for r in rows]),
        None if nopair else torch.tensor([answer(r["patch_answer"]) for r in rows]),
    )


def metric(model, p: Pairs, fns: dict | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per example, what node effects differentiate: logit[patch answer] - logit[clean answer] at the last position
    (without patches: -logit[answer]). F(.) is its negative, averaged. ``ids``: the clean prefixes repeated."""
    ids = p.clean if ids is None else ids
    reps = len(ids) // len(p)
    with plain_hooks(model, fns or {}):
        logits = model(ids).logits[:, -1]
    rows = torch.arange(len(ids))
    m = -logits[rows, p.clean_answer.repeat(reps)]
    if p.patch is not None:
        m = m + logits[rows, p.patch_answer.repeat(reps)]
    return m


def outputs(model, ids: torch.Tensor, sites=SITES) -> dict[str, torch.Tensor]:
    """Each site's output in the model's own forward pass."""
    got = {}

    def grab(s):
        def fn(x):
            got[s] = x.detach()

        return fn

    with torch.no_grad(), plain_hooks(model, {s: grab(s) for s in sites}):
        model(ids)
    return got


class Neurons(torch.nn.Module):
    """The neuron baseline's dictionary, written here: a site's coordinates, no error."""

    def encode(self, x):
        return x

    def decode(self, f):
        return f


def reference_model(folder: Path):
    """The checkpoint in float64, loaded by ``transformers`` (no sfcd code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).double().eval()
    model.requires_grad_(False)
    return model


@dataclass
class Site:
    """One site of the reference: clean and patch outputs, codes and errors (patch: zeros without patch prefixes,
    the stage's zero ablation)."""

    name: str
    d: torch.nn.Module
    xc: torch.Tensor
    xp: torch.Tensor
    fc: torch.Tensor
    fp: torch.Tensor
    ec: torch.Tensor
    ep: torch.Tensor

    @classmethod
    def of(cls, model, p: Pairs, name: str, d) -> Site:
        with torch.no_grad():
            xc = outputs(model, p.clean)[name]
            fc = d.encode(xc)
            ec = xc - d.decode(fc)
            if p.patch is None:
                return cls(name, d, xc, torch.zeros_like(xc), fc, torch.zeros_like(fc), ec, torch.zeros_like(ec))
            xp = outputs(model, p.patch)[name]
            fp = d.encode(xp)
            return cls(name, d, xc, xp, fc, fp, ec, xp - d.decode(fp))

    def direction(self, j: int) -> torch.Tensor:
        """[B, T, d]: how the site's output moves when node j (-1: the error node) goes from clean to patch."""
        if j < 0:
            return self.ep - self.ec
        with torch.no_grad():
            f = self.fc.clone()
            f[..., j] = self.fp[..., j]
            return self.d.decode(f) - self.d.decode(self.fc)

    def code_grads(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to the codes of a gradient ``g`` with respect to the site's output."""
        return torch.func.vjp(self.d.decode, self.fc)[1](g)[0]


def exact_items(model, p: Pairs, s: Site) -> dict[int, torch.Tensor]:
    """{node (feature, -1: error): [B, T]}: m with that node alone patched at one position minus m, per example;
    every node whose code moves somewhere (the others' effects are zero)."""
    B, T = p.clean.shape
    variants = []
    for t in range(T):
        for j in (s.fp[:, t] != s.fc[:, t]).any(0).nonzero().flatten().tolist():
            f = s.fc.clone()
            f[:, t, j] = s.fp[:, t, j]
            variants.append((j, t, s.d.decode(f) + s.ec))
        e = s.ec.clone()
        e[:, t] = s.ep[:, t]
        variants.append((-1, t, s.d.decode(s.fc) + e))
    with torch.no_grad():
        m0 = metric(model, p)
        items: dict[int, torch.Tensor] = {}
        for a in range(0, len(variants), 64):
            chunk = variants[a : a + 64]
            new = torch.cat([v for _, _, v in chunk])
            mv = metric(model, p, {s.name: lambda x, new=new: new}, p.clean.repeat(len(chunk), 1)).view(len(chunk), B)
            for (j, t, _), m in zip(chunk, mv, strict=True):
                items.setdefault(j, torch.zeros(B, T, dtype=m.dtype))[:, t] = m - m0
    return items


def ig_output_grad(model, p: Pairs, s: Site, steps: int) -> torch.Tensor:
    """[B, T, d]: integrated gradients at a site: the mean over alpha in {0, 1/steps, ...} of the gradient of
    sum_b m_b with respect to the site's output, set to clean + alpha (patch - clean), the rest of the model as it
    computes."""
    g = torch.zeros_like(s.xc)
    for a in range(steps):
        v = (s.xc + a / steps * (s.xp - s.xc)).requires_grad_(True)
        (gv,) = torch.autograd.grad(metric(model, p, {s.name: lambda x, v=v: v}).sum(), v)
        g += gv
    return g / steps


def attrib_output_grads(model, p: Pairs, sites: list[Site]) -> dict[str, torch.Tensor]:
    """The gradient of sum_b m_b at the clean input with respect to each site's output (the first site a leaf, so
    its gradient is the total one, through the later sites)."""
    held = {}

    def grab(name):
        def fn(x):
            if not held:
                x = x.detach().requires_grad_(True)
                held[name] = x
                return x
            held[name] = x
            return None

        return fn

    with torch.enable_grad():
        m = metric(model, p, {s.name: grab(s.name) for s in sites}).sum()
        grads = torch.autograd.grad(m, [held[s.name] for s in sites])
    return dict(zip([s.name for s in sites], grads, strict=True))


def attrib_effects(model, p: Pairs, sites: dict[str, Site]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Attribution patching's node effects {site: (features, error)}, aggregated as the stage does, and the
    gradients with respect to each site's output they come from."""
    grads = attrib_output_grads(model, p, list(sites.values()))
    want = {}
    for s, st in sites.items():
        ie = st.code_grads(grads[s]) * (st.fp - st.fc)
        want[s] = (ie.sum(1).mean(0), float((grads[s] * (st.ep - st.ec)).sum(-1).sum(1).mean(0)))
    return want, grads


H = 1e-5  # central finite differences' step, in float64


def edges_by_finite_differences(
    model, p: Pairs, up: Site, down: Site, g_down, js: list[int], ks: list[int], items=None
):
    """Edges from ``up``'s nodes ``js`` (-1: the error node) to ``down``'s nodes ``ks`` and to the metric y, summed
    over examples and positions, by central finite differences (every node and sign in one forward pass): up's output
    moved by +-h x ``direction(j)``, the edge to D_k the change of sum_{b,t} g_D[b,t,k] D_k[b,t] (``g_down``: the
    gradient of the metric with respect to down's output, held fixed; ``items``: {k: bool [B, T]} the (example,
    position) items that take part, None: all), the edge to y the change of sum_b m_b with down's output held at its
    clean value (the stop-gradient). Returns ([len(js), len(ks)], [len(js)])."""
    B, J = len(p), len(js)
    moves = torch.cat([sign * H * up.direction(j) for sign in (1, -1) for j in js])  # [2 J B, T, d]
    ids = p.clean.repeat(2 * J, 1)
    got = {}

    def grab(x):
        got["y"] = x

    with torch.no_grad():
        with plain_hooks(model, {up.name: lambda x: x + moves, down.name: grab}):
            model(ids)
        y = got["y"].view(2, J, B, *got["y"].shape[1:])
        f = down.d.encode(y)
        gf = down.code_grads(g_down)
        s = []
        for k in ks:
            val = (g_down * (y - down.d.decode(f))).sum(-1) if k < 0 else gf[..., k] * f[..., k]  # [2, J, B, T]
            s.append((val * (1.0 if items is None else items[k])).sum((2, 3)))
        s = torch.stack(s, -1)  # [2, J, K]
        frozen = down.xc.repeat(2 * J, 1, 1)
        m = metric(model, p, {up.name: lambda x: x + moves, down.name: lambda x: frozen}, ids).view(2, J, B).sum(-1)
    return (s[0] - s[1]) / (2 * H), (m[0] - m[1]) / (2 * H)


def keep_of(circuit: dict, site: str, width: int) -> tuple[torch.Tensor, bool]:
    """The circuit's kept features of ``site`` (bool [width]) and whether it keeps the site's error node."""
    mask = torch.zeros(width, dtype=torch.bool)
    for n in circuit["nodes"]:
        if n["site"] == site and n["feature"] is not None:
            mask[n["feature"]] = True
    return mask, any(n["site"] == site and n["feature"] is None for n in circuit["nodes"])


def f_of(model, p: Pairs, sites: dict, keep: dict, ablated: dict) -> torch.Tensor:
    """F per example (logit[clean answer] - logit[patch answer]) with every node outside ``keep`` ({site: (bool
    [F], keep error)}) set to ``ablated`` ({site: (codes, error)}, broadcast over [B, T]); each site re-encodes the
    stream the earlier sites changed."""

    def fn(name):
        d, (mask, keep_err), (fa, ea) = sites[name], keep[name], ablated[name]

        def f(x):
            f = d.encode(x)
            e = x - d.decode(f)
            return d.decode(torch.where(mask, f, fa.expand_as(f))) + (e if keep_err else ea.expand_as(e))

        return f

    with torch.no_grad():
        return -metric(model, p, {name: fn(name) for name in sites})


def ratios(f_m, f_empty, f_c, f_rest) -> tuple[float, float]:
    return (f_c - f_empty) / (f_m - f_empty), (f_rest - f_empty) / (f_m - f_empty)


def _fixed(v: torch.Tensor) -> Callable:
    """A hook function that sets a module's output to ``v`` (broadcast over the batch)."""
    return lambda x: v.expand_as(x)


def mean_ablated(model, q: Pairs, ev: dict[str, Site], circuit: dict) -> tuple[float, float, float, float]:
    """F(M), F(empty), F(C) and F(M \\ C) of ``circuit`` on the evaluation pairs ``q`` (``ev``: their sites), every
    node outside at its mean over the evaluation patch prefixes (F(empty): each module's output at its mean, no
    dictionary)."""
    with torch.no_grad():
        f_m = -metric(model, q)
        f_e = -metric(model, q, {s: _fixed(ev[s].xp.mean(0)) for s in ev})
    dicts = {s: ev[s].d for s in ev}
    means = {s: (ev[s].fp.mean(0), ev[s].ep.mean(0)) for s in ev}
    keep = {s: keep_of(circuit, s, dicts[s].d_sae) for s in ev}
    f_c = f_of(model, q, dicts, keep, means)
    f_rest = f_of(model, q, dicts, {s: (~mk, not ke) for s, (mk, ke) in keep.items()}, means)
    return float(f_m.mean()), float(f_e.mean()), float(f_c.mean()), float(f_rest.mean())


def stage(test_run, tmp_path: Path, name: str, *overrides: str) -> tuple[dict, dict, Path]:
    """``sfcd circuit`` on the shared run's resid.0 / mlp.1 SAEs, written to ``tmp_path/name`` (not into the run):
    (circuit.json, node_effects.safetensors, the folder)."""
    from sfcd.circuits.stage import find_circuit

    out = tmp_path / name
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={test_run.run_dir}",
            "circuit.sites=[resid.0,mlp.1]",
            f"circuit.out_dir={out}",
            *([] if any(o.startswith("circuit.baselines=") for o in overrides) else ["circuit.baselines=false"]),
            *overrides,
        ]
    )
    find_circuit(cfg)
    return json.loads((out / "circuit.json").read_text()), load_file(str(out / "node_effects.safetensors")), out


def sae_sites(test_run, model, p: Pairs) -> dict[str, Site]:
    from sfcd.sae.io import load_sae

    root = Path(test_run.run_dir) / "saes" / "step24"
    return {n: Site.of(model, p, n, load_sae(root / n).double().eval().requires_grad_(False)) for n in SITES}


def close(got, want, rel=2e-4, abs_=2e-7):
    return got == pytest.approx(want, rel=rel, abs=abs_)


def nid(site: str, j: int) -> str:
    return f"{site}/{'eps' if j < 0 else j}"


def effects_of(items: dict[int, torch.Tensor], width: int) -> tuple[torch.Tensor, float]:
    """Node effects as the stage aggregates them (sum): summed over positions, averaged over examples."""
    f = torch.zeros(width, dtype=torch.float64)
    for j, it in items.items():
        if j >= 0:
            f[j] = it.sum(1).mean(0)
    return f, float(items[-1].sum(1).mean(0))


def check_nodes(c: dict, eff: dict, want: dict[str, tuple[torch.Tensor, float]], tau: float) -> dict[str, list[int]]:
    """The written node effects (every node, and the circuit's) against ``want`` {site: (features, error)}; the
    circuit is every node above ``tau``. Returns the circuit's nodes per site (-1: the error node)."""
    kept = {}
    for s, (f, err) in want.items():
        # float32 through the stage against float64 here: effects of 1e-3 and below, to float32's rounding of logits
        torch.testing.assert_close(eff[f"{s}.features"].double(), f, rtol=1e-3, atol=5e-7)
        assert close(float(eff[f"{s}.error"]), err, rel=1e-3, abs_=5e-7), s
        kept[s] = [j for j in range(len(f)) if abs(f[j]) > tau] + ([-1] if abs(err) > tau else [])
    written = {n["id"]: n["effect"] for n in c["nodes"]}
    assert set(written) == {nid(s, j) for s, js in kept.items() for j in js} and len(written) > 4
    for s, js in kept.items():
        for j in js:
            assert close(written[nid(s, j)], float(want[s][0][j]) if j >= 0 else want[s][1], 1e-3, 5e-7), nid(s, j)
    return kept


def check_edges(c, model, p, sites, kept, g_down, n, items=None) -> dict:
    """Every edge between the circuit's nodes, and to y, against finite differences (divided by the number of
    examples); exact zeros are left out of circuit.json. Returns {(from, to): independent weight}."""
    js, ks = kept["resid.0"], kept["mlp.1"]
    w, w_y = edges_by_finite_differences(model, p, sites["resid.0"], sites["mlp.1"], g_down, js, ks, items)
    want = {
        (nid("resid.0", j), nid("mlp.1", k)): float(w[a, b]) / n for a, j in enumerate(js) for b, k in enumerate(ks)
    }
    want |= {(nid("resid.0", j), "y"): float(w_y[a]) / n for a, j in enumerate(js)}
    written = {(e["from"], e["to"]): e["weight"] for e in c["edges"] if e["to"] != "y" or e["from"][:7] == "resid.0"}
    assert set(written) <= set(want)
    assert all(abs(w) < 1e-12 for k, w in want.items() if k not in written)  # exact zeros, left out
    assert sum(e["to"] != "y" for e in c["edges"]) > 3
    for k, w in written.items():
        assert close(w, want[k], rel=1e-4, abs_=1e-9), (k, w, want[k])
    # mlp.1 -> y: nothing chosen after it, so its node effect (the paper's last resid -> y)
    node = {x["id"]: x["effect"] for x in c["nodes"]}
    assert {(e["from"], e["weight"]) for e in c["edges"] if e["from"][:5] == "mlp.1" and e["to"] == "y"} == {
        (nid("mlp.1", k), node[nid("mlp.1", k)]) for k in kept["mlp.1"]
    }
    return want


def test_exact_circuit_through_the_stage_equals_plain_hook_patching(test_run, test_saes, tmp_path):
    """``method=exact`` with edges (one batch: exact patching reruns the model once per batch, node and position).
    Bugs caught: node effects not the metric's change when one node is patched (a wrong sign, position or example),
    not averaged over the examples, the circuit not the nodes above the threshold; edges not divided by the number of
    examples (or twice), from the wrong downstream gradient (exact patching has none: IG's), resid.0 -> y without
    the stop at mlp.1; F(M), F(empty), F(C), faithfulness, completeness and the sweep's points not what setting the
    modules' outputs gives. Several batches of unequal size: the page's test (attribution, 3 + 3 + 2 pairs)."""
    from transformers import AutoTokenizer

    tau, steps = 0.0005, 4
    c, eff, out = stage(
        test_run,
        tmp_path,
        "exact",
        "circuit.task=nounpp",  # 6-token prefixes, a pair's codes differing at positions 2 to 5
        "circuit.method=exact",
        f"circuit.steps={steps}",
        "circuit.n_examples=6",
        "circuit.batch_size=6",
        f"circuit.node_threshold={tau}",
        "circuit.resolve_z=0",  # the micro model is near chance: report faithfulness wherever F(M) > F(empty)
        "circuit.resolve_floor=0",
        "circuit.sweep_points=3",
    )
    m = c["metadata"]
    folder = Path(test_run.run_dir) / "model" / "step24"
    model, tok = reference_model(folder), AutoTokenizer.from_pretrained(folder)
    p = task_rows(m["pairs"]["discovery"], tok)
    assert m["n_examples"] == len(p) == 6 and m["step"] == 24 and m["edge_gradients"] == "ig"
    sites = sae_sites(test_run, model, p)
    want = {s: effects_of(exact_items(model, p, sites[s]), sites[s].d.d_sae) for s in SITES}
    kept = check_nodes(c, eff, want, tau)
    check_edges(c, model, p, sites, kept, ig_output_grad(model, p, sites["mlp.1"], steps), len(p))

    # faithfulness on the evaluation pairs: every node outside the circuit at its mean over their patch prefixes
    q = task_rows(m["pairs"]["evaluation"], tok)
    ev = sae_sites(test_run, model, q)
    f_m, f_e, f_c, f_rest = mean_ablated(model, q, ev, c)
    for key, v in (("F_M", f_m), ("F_empty", f_e), ("F_C", f_c)):
        assert close(m[key], v, rel=1e-5, abs_=1e-6), key
    assert f_m - f_e > 0 and m["resolvable"] is True
    faith, compl = ratios(f_m, f_e, f_c, f_rest)
    assert close(m["faithfulness"], faith, rel=1e-3, abs_=1e-4) and close(m["completeness"], compl, 1e-3, 1e-4)
    dicts = {s: ev[s].d for s in SITES}
    means = {s: (ev[s].fp.mean(0), ev[s].ep.mean(0)) for s in SITES}
    # the sweep: each point's circuit is every node above its threshold
    points = json.loads((out / "faithfulness.json").read_text())["features"]
    assert len(points) == 3
    for pt in points:
        keep = {s: (want[s][0].abs() > pt["threshold"], abs(want[s][1]) > pt["threshold"]) for s in SITES}
        assert pt["n_nodes"] == sum(int(mk.sum()) + ke for mk, ke in keep.values())
        f_c = float(f_of(model, q, dicts, keep, means).mean())
        assert close(pt["faithfulness"], ratios(f_m, f_e, f_c, 0.0)[0], 1e-3, 1e-4)
    assert (out / "circuit.svg").read_text().lstrip().startswith("<?xml") and (out / "faithfulness.png").exists()


def test_paper_items_and_resample_ablation(test_run, test_saes, tmp_path):
    """``method=attrib``, ``edge_items=paper``, ``ablation=resample``. Bugs caught: paper edges summing over every
    item of a kept node, or over items picked by another rule than their own effect; resample ablation that leaves
    an example its own values, or takes them from an example other than the one it names."""
    from transformers import AutoTokenizer

    tau = 0.0005
    lines = (Path(test_run.run_dir) / "corpus" / "tasks" / "nounpp_test.jsonl").read_text().splitlines()
    evals = tmp_path / "two.jsonl"
    evals.write_text("\n".join(lines[:2]) + "\n")  # two pairs: the one derangement is the swap
    c, eff, _ = stage(
        test_run,
        tmp_path,
        "paper",
        "circuit.task=nounpp",  # 6-token prefixes: the downstream nodes' items differ over positions 2 to 5
        "circuit.method=attrib",
        "circuit.n_examples=6",
        "circuit.batch_size=6",
        f"circuit.node_threshold={tau}",
        "circuit.edge_items=paper",
        "circuit.ablation=resample",
        f"circuit.eval_task={evals}",
        "circuit.sweep_points=2",
    )
    m = c["metadata"]
    folder = Path(test_run.run_dir) / "model" / "step24"
    model, tok = reference_model(folder), AutoTokenizer.from_pretrained(folder)
    p = task_rows(m["pairs"]["discovery"], tok)
    assert len(p) == 6 and m["n_eval_examples"] == 2
    sites = sae_sites(test_run, model, p)
    want, grads = attrib_effects(model, p, sites)
    kept = check_nodes(c, eff, want, tau)
    # the paper's rule: a downstream node's (example, position) items whose own effect exceeds tau
    down = sites["mlp.1"]
    ie = down.code_grads(grads["mlp.1"]) * (down.fp - down.fc)
    ie_err = (grads["mlp.1"] * (down.ep - down.ec)).sum(-1)
    chosen = {k: (ie_err if k < 0 else ie[..., k]).abs() > tau for k in kept["mlp.1"]}
    assert any(0 < int(x.sum()) < x.numel() for x in chosen.values())  # some items in, some out
    paper = check_edges(c, model, p, sites, kept, grads["mlp.1"], len(p), chosen)
    js, ks = kept["resid.0"], kept["mlp.1"]
    w, _ = edges_by_finite_differences(model, p, sites["resid.0"], down, grads["mlp.1"], js, ks)
    every = {(nid("resid.0", j), nid("mlp.1", k)): float(w[a, b]) for a, j in enumerate(js) for b, k in enumerate(ks)}
    change = max(abs(paper[k] - every[k] / len(p)) for k in every)
    assert change > 0.05 * max(abs(w) for w in every.values()) / len(p), change  # the rule changes edges here

    # resample: each evaluation example's ablated nodes take the other example's values (its patch prefix)
    q = task_rows(m["pairs"]["evaluation"], tok)
    assert m["ablation_used"]["sources"] == [1, 0]
    ev = sae_sites(test_run, model, q)
    src = torch.tensor([1, 0])
    with torch.no_grad():
        f_e = -metric(model, q, {s: lambda x, v=ev[s].xp[src]: v for s in SITES})
    ablated = {s: (ev[s].fp[src], ev[s].ep[src]) for s in SITES}
    keep = {s: keep_of(c, s, ev[s].d.d_sae) for s in SITES}
    f_c = f_of(model, q, {s: ev[s].d for s in SITES}, keep, ablated)
    assert close(m["F_empty"], float(f_e.mean()), rel=1e-5, abs_=1e-6)
    assert close(m["F_C"], float(f_c.mean()), rel=1e-5, abs_=1e-6)
    assert abs(float(f_e.mean() + metric(model, q).mean())) > 1e-3  # the ablation moves the metric


class CheckpointAlone(torch.nn.Module):
    """Checkpoint m of a BatchTopK crosscoder, written here from its weights file (``crosscoders/io.py``'s layout):
    ``f = relu(pre) [relu(pre) sum_m' ||W_dec^m'|| > theta]`` with ``pre = a^m s_m W_enc^m + sum_{m' != m}
    mean(a^m') s_m' W_enc^m' + b_enc`` (the other checkpoints at their mean), decoded
    ``(f W_dec^m + b_dec^m) / s_m``."""

    def __init__(self, w: dict[str, torch.Tensor], m: int):
        super().__init__()
        w = {k: v.double() for k, v in w.items()}
        s = w["scales"]
        self.d_sae = w["b_enc"].numel()
        self.w_enc = w["W_enc"][m] * s[m]
        self.b = w["b_enc"] + sum(w["block_means"][i] * s[i] @ w["W_enc"][i] for i in range(len(s)) if i != m)
        self.norms, self.theta = w["W_dec"].norm(dim=2).sum(1), w["threshold"]
        self.w_dec, self.b_dec = w["W_dec"][:, m] / s[m], w["b_dec"][m] / s[m]

    def encode(self, x):
        r = torch.relu(x @ self.w_enc + self.b)
        return r * (r * self.norms > self.theta)

    def decode(self, f):
        return f @ self.w_dec + self.b_dec


def test_crosscoder_and_sae_circuit_with_ig_and_edges(test_run, test_saes, tmp_path):
    """A crosscoder over checkpoints 16 and 24 (fitted here in a moment) at resid.0, the run's SAE at mlp.1,
    ``method=ig`` with edges. Bugs caught: the crosscoder's view at the circuit's checkpoint not checkpoint 24
    alone (another block's encoder or decoder, the other checkpoint's tokens, its scale missed); IG node effects
    not the mean gradient along the path times the change (a wrong grid, divisor or sign); edges through a
    crosscoder node not the finite differences of the downstream node's IG-weighted value."""
    from safetensors.torch import load_file as load_tensors
    from transformers import AutoTokenizer

    from sfcd.crosscoders.io import save_crosscoder
    from sfcd.sae.io import load_sae
    from tests.crosscoders.quick import fit

    run = Path(test_run.run_dir)
    tok = AutoTokenizer.from_pretrained(run / "model" / "step24")
    rows = [json.loads(x) for x in (run / "corpus" / "tasks" / "nounpp_train.jsonl").read_text().splitlines()]
    ids = torch.tensor([tok(r[k])["input_ids"] for r in rows for k in ("clean_prefix", "patch_prefix")])
    acts = [
        outputs(reference_model(run / "model" / f"step{st}").float(), ids, ["resid.0"])["resid.0"] for st in (16, 24)
    ]
    x = torch.cat(acts, -1).flatten(0, 1)  # [tokens, 2 x 32]
    cc = fit(x, K=2, m=64, k=4, steps=100, batch=256)
    cc.block_mean.copy_(x.mean(0))
    dicts = tmp_path / "dicts"
    save_crosscoder(cc, dicts / "resid.0", {"steps": [16, 24], "site": "resid.0"})
    shutil.copytree(run / "saes" / "step24" / "mlp.1", dicts / "mlp.1")

    tau, steps = 5e-5, 4  # the latents of a crosscoder fitted in a moment carry less than the error node
    c, eff, out = stage(
        test_run,
        tmp_path,
        "cc",
        f"circuit.dictionaries={dicts}",
        "circuit.method=ig",
        f"circuit.steps={steps}",
        "circuit.n_examples=8",
        "circuit.batch_size=4",
        f"circuit.node_threshold={tau}",
        "circuit.sweep_points=3",
        "circuit.baselines=true",  # the curves of neurons and of the features without error nodes too
    )
    m = c["metadata"]
    assert m["dictionaries"]["resid.0"] == str(dicts / "resid.0") and all(n["label"] == "" for n in c["nodes"])
    model = reference_model(run / "model" / "step24")
    p = task_rows(m["pairs"]["discovery"], tok)

    view = CheckpointAlone(load_tensors(str(dicts / "resid.0" / "crosscoder_weights.safetensors")), m=1)
    sae = load_sae(dicts / "mlp.1").double().eval().requires_grad_(False)
    sites = {"resid.0": Site.of(model, p, "resid.0", view), "mlp.1": Site.of(model, p, "mlp.1", sae)}
    grads = {s: ig_output_grad(model, p, sites[s], steps) for s in SITES}
    want = {}
    for s, st in sites.items():
        ie = st.code_grads(grads[s]) * (st.fp - st.fc)
        want[s] = (ie.sum(1).mean(0), float((grads[s] * (st.ep - st.ec)).sum(-1).sum(1).mean(0)))
    assert int((sites["resid.0"].fc != 0).sum()) > 0  # latents fire
    kept = check_nodes(c, eff, want, tau)
    assert any(j >= 0 for j in kept["resid.0"])  # crosscoder latents in the circuit
    check_edges(c, model, p, sites, kept, grads["mlp.1"], len(p))
    # the baselines' curves: each point's circuit is every node above its threshold (neurons: IG through the
    # identity, no error nodes; features without error nodes: the latents and features alone)
    neurons = {s: (grads[s] * (st.xp - st.xc)).sum(1).mean(0) for s, st in sites.items()}
    curves = json.loads((out / "faithfulness.json").read_text())
    assert set(curves) == {"features", "features, no error nodes", "neurons"}
    for pt_f, pt_nf, pt_n in zip(*curves.values(), strict=True):
        tau_ = pt_f["threshold"]
        assert pt_nf["threshold"] == pt_n["threshold"] == tau_
        assert pt_nf["n_nodes"] == sum(int((f.abs() > tau_).sum()) for f, _ in want.values())
        assert pt_f["n_nodes"] == pt_nf["n_nodes"] + sum(abs(e) > tau_ for _, e in want.values())
        assert pt_n["n_nodes"] == sum(int((f.abs() > tau_).sum()) for f in neurons.values())


def test_nopair_neuron_circuit_on_a_float16_checkpoint(test_run, tmp_path):
    """A task without patch prefixes (the patch is zero), neurons as the dictionary, ``method=attrib``, on the
    run's last checkpoint stored in float16 (as Pythia's hub checkpoints are). Bugs caught: the stage computing in
    the stored float16 instead of float32; the lone task file not split into disjoint discovery and evaluation
    rows; nopair effects not the gradient times (0 - the activation); F(M) / F(empty) / F(C) not the answer's
    logit with the neurons outside the circuit at zero (``ablation=zero``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfcd.circuits.stage import find_circuit
    from sfcd.errors import ConfigError

    run = Path(test_run.run_dir)
    half = tmp_path / "fp16" / "step24"
    AutoModelForCausalLM.from_pretrained(run / "model" / "step24").half().save_pretrained(half)
    AutoTokenizer.from_pretrained(run / "model" / "step24").save_pretrained(half)
    rows = [json.loads(x) for x in (run / "corpus" / "tasks" / "nounpp_train.jsonl").read_text().splitlines()[:8]]
    task = tmp_path / "nopair.jsonl"
    task.write_text("".join(json.dumps({k: r[k] for k in ("clean_prefix", "clean_answer")}) + "\n" for r in rows))
    over = [f"model.source={half.parent}", "step=24", f"circuit.task={task}", "circuit.dictionary=neurons"]
    with pytest.raises(ConfigError, match="model.dtype=float16 cannot be used by the circuit stage"):
        find_circuit(compose(["experiment=test", f"run_dir={run}", *over, "model.dtype=float16"]))
    tau = 0.005
    c, eff, _ = stage(
        test_run,
        tmp_path,
        "nopair",
        *over,
        "circuit.method=attrib",
        "circuit.edges=false",
        "circuit.ablation=zero",
        f"circuit.node_threshold={tau}",
        "circuit.resolve_z=0",
        "circuit.resolve_floor=0",
        "circuit.sweep_points=2",
    )
    m = c["metadata"]
    assert (m["sfcd_model"]["stored_dtype"], m["sfcd_model"]["dtype"]) == ("float16", "float32")
    disc, evals = m["pairs"]["discovery"]["rows"], m["pairs"]["evaluation"]["rows"]
    assert len(disc) == len(evals) == 4 and sorted(disc + evals) == list(range(8)) and m["n_examples"] == 4

    model, tok = reference_model(half), AutoTokenizer.from_pretrained(half)  # the float16 weights, upcast
    p = task_rows(m["pairs"]["discovery"], tok)
    sites = [Site.of(model, p, s, Neurons()) for s in SITES]
    grads = attrib_output_grads(model, p, sites)
    want = {s.name: ((grads[s.name] * (0 - s.xc)).sum(1).mean(0), 0.0) for s in sites}
    assert max(float(f.abs().max()) for f, _ in want.values()) > 2 * tau
    written = {n["id"]: n["effect"] for n in c["nodes"]}
    assert set(written) == {nid(s, j) for s, (f, _) in want.items() for j in range(len(f)) if abs(f[j]) > tau}
    for s, (f, _) in want.items():  # float16 arithmetic would be off by 1e-3 of these
        torch.testing.assert_close(eff[f"{s}.features"].double(), f, rtol=1e-4, atol=1e-6)
        assert float(eff[f"{s}.error"]) == 0.0
    for node, v in written.items():
        s, j = node.split("/")
        assert close(v, float(want[s][0][int(j)]), rel=1e-4, abs_=1e-6), node

    q = task_rows(m["pairs"]["evaluation"], tok)
    with torch.no_grad():
        f_m = float(-metric(model, q).mean())  # the answer's logit
        f_e = float(-metric(model, q, {s: torch.zeros_like for s in SITES}).mean())
    n = {s: Neurons() for s in SITES}
    zeros = {s: (torch.zeros(()), torch.zeros(())) for s in SITES}
    keep = {s: keep_of(c, s, 32) for s in SITES}
    f_c = float(f_of(model, q, n, keep, zeros).mean())
    f_rest = float(f_of(model, q, n, {s: (~mk, True) for s, (mk, _) in keep.items()}, zeros).mean())
    assert (
        close(m["F_M"], f_m, 1e-5, 1e-5) and close(m["F_empty"], f_e, 1e-5, 1e-5) and close(m["F_C"], f_c, 1e-5, 1e-5)
    )
    assert f_m - f_e > 0 and m["resolvable"] is True  # barely: the micro model's answer logit hardly needs context
    faith, compl = ratios(f_m, f_e, f_c, f_rest)
    assert close(m["faithfulness"], faith, 1e-3, 1e-3) and close(m["completeness"], compl, 1e-3, 1e-3)
