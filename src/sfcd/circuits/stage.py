"""The ``circuit`` stage: node effects, the circuit at a threshold, its edges, faithfulness and completeness over
a sweep of thresholds (features, features without error nodes, neurons), written to
``circuits/<task>/step<N>/``."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sfcd.circuits.data import PairBatch, batches
from sfcd.circuits.dictionaries import dictionary_folders, load_dictionaries
from sfcd.circuits.effects import (
    METHODS,
    compact,
    direct_activations,
    edge_effects,
    edge_pairs,
    node_effects,
    norm_scales,
    virtual_weights,
    y_edge_effects,
    y_pairs,
)
from sfcd.circuits.evaluate import ABLATIONS, Faithfulness
from sfcd.circuits.page import write_circuit_page
from sfcd.circuits.picture import draw_circuit, draw_curve
from sfcd.circuits.splice import is_transcoder
from sfcd.data.tasks import LENGTH_RULES, Task, TaskPair, load_task, select_pairs, split_rows
from sfcd.devices import work_device
from sfcd.errors import ConfigError, InputError
from sfcd.features.api import feature_notes
from sfcd.io import save_safetensors, write_json
from sfcd.models.eval_stage import task_path
from sfcd.models.loading import checkpoint, provenance
from sfcd.models.sites import Site, expand_sites, parallel_blocks
from sfcd.paths import RunDir

log = logging.getLogger(__name__)

#: node and edge effects are gradients and differences of small metric changes: float32 only (in bfloat16 the
#: attribution and exact effects differ by its rounding; float16 gradients overflow without loss scaling)
CIRCUIT_DTYPES = ("float32",)


def check_config(c: DictConfig) -> None:
    for name in ("node_threshold", "edge_threshold", "resolve_z", "resolve_floor"):
        v = c[name]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"circuit.{name}={v} is out of range; expected a finite number >= 0")
    if c.method not in METHODS:
        raise ConfigError(f"unknown circuit.method {c.method!r}; expected one of {list(METHODS)}")
    if c.aggregation not in ("sum", "none"):
        raise ConfigError(f"unknown circuit.aggregation {c.aggregation!r}; expected sum or none")
    if c.ablation not in ABLATIONS:
        raise ConfigError(f"unknown circuit.ablation {c.ablation!r}; expected one of {list(ABLATIONS)}")
    if c.edge_items not in ("all", "paper"):
        raise ConfigError(f"unknown circuit.edge_items {c.edge_items!r}; expected all or paper")
    if c.dictionary not in ("sae", "neurons"):
        raise ConfigError(f"unknown circuit.dictionary {c.dictionary!r}; expected sae or neurons")
    if c.get("transcoders") and c.dictionary != "sae":
        raise ConfigError("circuit.transcoders=true needs circuit.dictionary=sae (neurons have no transcoders)")
    if c.n_examples < 1 or c.batch_size < 1 or c.steps < 1:
        raise ConfigError("circuit.n_examples, circuit.batch_size and circuit.steps must be >= 1")


def all_effects(
    model, dicts, bs: list[PairBatch], c: DictConfig, for_edges: bool = True
) -> tuple[list[dict], dict, int]:
    """Node effects aggregated batch by batch: {site: (features [F] or [T, F], error [] or [T])}; and, when
    edges follow (``for_edges``), each batch's effects in the compact form edges read (:func:`compact`: the
    sparse activations, deltas and gradients), so memory does not hold four dense [B, T, F] tensors per site
    and batch."""
    edge_grads = bool(c.get("edges")) and c.method == "exact"
    per_batch, sums = [], {}
    for b in bs:
        eff = node_effects(model, dicts, b, c.method, c.steps, edge_grads, c.get("ig_batch"))
        dims = (0, 1) if c.aggregation == "sum" else 0
        for s, e in eff.items():
            f, err = e.ie_f.sum(dims), e.ie_err.sum(dims)
            old = sums.get(s)
            sums[s] = (f.detach(), err.detach()) if old is None else (old[0] + f.detach(), old[1] + err.detach())
        per_batch.append(compact(eff) if for_edges and c.get("edges") else None)
        del eff
    n = sum(len(b) for b in bs)
    return per_batch, {s: (f / n, err / n) for s, (f, err) in sums.items()}, n


def keep_masks(agg: dict, tau: float, error_nodes: bool) -> dict:
    """{site: (features kept, error nodes kept)}: bool [F] and a 0-d bool, or per position [T, F] and [T]."""
    return {s: (f.abs() > tau, (err.abs() > tau) & error_nodes) for s, (f, err) in agg.items()}


def n_nodes(keep: dict) -> int:
    return sum(int(m.sum()) + int(e.sum()) for m, e in keep.values())


def sweep(evaluator: Faithfulness, agg: dict, c: DictConfig, error_nodes: bool) -> list[dict]:
    top = max([float(f.abs().max()) for f, _ in agg.values()] + [float(e.abs().max()) for _, e in agg.values()] + [1.0])
    taus = np.logspace(-4, math.log10(top) + 0.01, c.sweep_points)
    pts = []
    for tau in taus:
        keep = keep_masks(agg, float(tau), error_nodes)
        r = evaluator(keep)
        pts.append(
            {
                "threshold": float(tau),
                "n_nodes": n_nodes(keep),
                "faithfulness": r["faithfulness"],
                "completeness": r["completeness"],
            }
        )
    return pts


def find_circuit(cfg: DictConfig) -> Path:
    c = cfg.circuit
    check_config(c)
    run = RunDir(cfg.run_dir)
    model, tokenizer, step = checkpoint(cfg, cfg.step, "circuit", CIRCUIT_DTYPES)
    device = work_device(cfg.trainer)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    sites = sorted(expand_sites(list(c.sites), model), key=lambda s: s.order)
    folders = (
        dictionary_folders(c.dictionaries, run, step, sites, c.get("transcoders", False))
        if c.dictionary == "sae"
        else None
    )
    dicts = load_dictionaries(model, sites, folders, step)
    same = c.aggregation == "none"
    task, eval_task, disc, evals, pairs_info = circuit_pairs(run, c, tokenizer, c.task)
    path = Path(task.file)
    bs = batches(task, c.n_examples, c.batch_size, same, device, disc)
    eval_bs = batches(eval_task, c.n_examples, c.batch_size, same, device, evals)
    if same and eval_bs[0].clean.shape[1] != bs[0].clean.shape[1]:
        raise InputError(
            f"task {task.name}: per-position circuits are found on {bs[0].clean.shape[1]}-token prefixes but "
            f"evaluated on {eval_bs[0].clean.shape[1]}-token ones ({eval_task.file}); positions would not match. "
            "Use circuit.aggregation=sum or task files of one template"
        )
    positions = [tokenizer.decode([int(i)]) for i in bs[0].clean[0]] if same else None

    t0 = time.perf_counter()
    per_batch, agg, n = all_effects(model, dicts, bs, c)
    t_nodes = time.perf_counter() - t0
    features_dir = run.root / "features" / f"step{step}"
    # the run's dashboards describe the run's own dictionaries: its SAEs at features/step<N>/<site>, its
    # transcoders (circuit.transcoders, at the mlp sites) at features/step<N>/transcoders/<site>
    own = c.dictionary == "sae" and c.dictionaries is None
    tc_sites = {s.name for s in sites if s.kind == "mlp"} if c.get("transcoders") else set()
    notes = (
        {s.name: feature_notes(features_dir / ("transcoders" if s.name in tc_sites else "") / s.name) for s in sites}
        if own
        else {}
    )
    keep = keep_masks(agg, c.node_threshold, c.error_nodes)
    nodes = []
    for s in sites:
        f, err = agg[s]
        mask, keep_err = keep[s]
        for idx in mask.nonzero().tolist():
            feat, pos = (idx[0], None) if len(idx) == 1 else (idx[1], idx[0])
            nid = f"{s.name}/{feat}" + ("" if pos is None else f"@{pos}")
            nodes.append(
                {
                    "id": nid,
                    "site": s.name,
                    "feature": feat,
                    "position": pos,
                    "effect": float(f[tuple(idx)]),
                    "label": notes.get(s.name, {}).get(feat, {}).get("label", ""),
                }
            )
        for idx in keep_err.nonzero().tolist():  # [] for the one error node, [t] per position
            pos = idx[0] if idx else None
            nodes.append(
                {
                    "id": f"{s.name}/eps" + ("" if pos is None else f"@{pos}"),
                    "site": s.name,
                    "feature": None,
                    "position": pos,
                    "effect": float(err[tuple(idx)]),
                    "label": "",
                }
            )
    edges, t_edges = [], 0.0
    if c.edges:
        t1 = time.perf_counter()
        items = c.node_threshold if c.edge_items == "paper" else None
        edges = circuit_edges(model, dicts, bs, per_batch, sites, keep, n, c.reference_edges, nodes, items)
        t_edges = time.perf_counter() - t1
        n_zero = sum(e["weight"] == 0 for e in edges)
        edges = [e for e in edges if e["weight"] != 0]
    evaluator = evaluator_for(model, dicts, eval_bs, c)
    result = evaluator(keep)
    curves = {"features": sweep(evaluator, agg, c, c.error_nodes)}
    if c.baselines and c.dictionary == "sae":
        curves["features, no error nodes"] = sweep(evaluator, agg, c, False)
        neurons = load_dictionaries(model, sites, None)
        _, nagg, _ = all_effects(model, neurons, bs, c, for_edges=False)
        curves["neurons"] = sweep(evaluator_for(model, neurons, eval_bs, c), nagg, c, True)
    needed = {
        k: min(
            [p for p in v if p["faithfulness"] is not None and p["faithfulness"] >= 0.8],
            key=lambda p: p["n_nodes"],
            default=None,
        )
        for k, v in curves.items()
    }  # the smallest swept circuit with faithfulness >= 0.8, and its completeness (None where unresolvable)
    meta = {
        "task": task.name,
        "task_file": str(path),
        "step": step,
        "sfcd_model": provenance(model),
        "method": c.method,
        "aggregation": c.aggregation,
        "node_threshold": c.node_threshold,
        "edge_threshold": c.edge_threshold,
        "dictionary": c.dictionary,
        "dictionaries": {s.name: str(f) for s, f in folders.items()} if folders is not None else "neurons",
        "transcoders": [s.name for s in sites if is_transcoder(dicts[s])],
        "edge_split": EDGE_SPLIT if any(is_transcoder(d) for d in dicts.values()) else None,
        "error_nodes": c.error_nodes,
        "ablation": c.ablation,
        "ablation_used": evaluator.ablation_info,
        "parallel_blocks": parallel_blocks(model),
        "edge_gradients": "ig" if c.method == "exact" else c.method,
        "edge_items": {
            "all": "a kept node's edges sum over all of its (example, position) items",
            "paper": f"a kept node's edges sum over its (example, position) items whose own effect exceeds "
            f"{c.node_threshold} (feature-circuits' rule)",
        }[c.edge_items],
        "edges_kept": "every non-zero edge between kept nodes (and to y); exact zeros left out"
        + (", and per position only from a position to itself or a later one" if same else ""),
        "edges_zero_left_out": n_zero if c.edges else 0,
        "positions": positions,
        "n_examples": n,
        "n_eval_examples": evaluator.n,
        "dropped": dict(task.dropped),
        "pairs": pairs_info,
        "F_M": result["F_M"],
        "F_empty": result["F_empty"],
        "F_C": result["F_C"],
        "faithfulness": result["faithfulness"],
        "completeness": result["completeness"],
        "resolvable": result["resolvable"],
        "resolution": evaluator.resolution(),
        "nodes_for_faithfulness_0.8": needed,
        "seconds_node_effects": t_nodes,
        "seconds_edges": t_edges,
        "config": OmegaConf.to_container(c, resolve=True),
    }
    circuit = {"metadata": meta, "sites": [s.name for s in sites], "nodes": nodes, "edges": edges}
    out = Path(c.out_dir) if c.out_dir else run.root / "circuits" / task.name / f"step{step}"
    save_safetensors(
        out / "node_effects.safetensors",
        {f"{s.name}.{k}": v for s in sites for k, v in zip(("features", "error"), agg[s], strict=True)},
    )
    write_json(out / "faithfulness.json", curves)
    draw_curve(curves, out / "faithfulness", f"{task.name} @ step {step}")
    draw_circuit(circuit, out / "circuit", c.edge_threshold)
    write_circuit_page(out, circuit, features_dir if own else out / "no-dashboards", notes)
    write_json(out / "circuit.json", circuit)  # last: marks the circuit complete
    log.info(
        "circuit %s @ step %d: %d nodes, %d edges, faithfulness %s, completeness %s",
        task.name,
        step,
        len(nodes),
        len(edges),
        _fmt(result["faithfulness"]),
        _fmt(result["completeness"]),
    )
    return out


#: what circuit.json's split of an edge between transcoder features means (its metadata "edge_split")
EDGE_SPLIT = (
    "an edge from transcoder feature i' of mlp.<l'> to feature i of mlp.<l> (l' < l) also has 'direct': its part "
    "through the residual stream alone (no attention or MLP between; the downstream layer norm's scale 1/sigma "
    "held at its value at each token), = 'virtual_weight' x 'activation'. virtual_weight (input-invariant, "
    "Dunefsky et al.): (W_dec[i'] - its mean) . (gamma * W_enc[:, i]), raw units, gamma the layer norm's weight; "
    "activation: the upstream feature's clean -> patch change summed over tokens, each weighted by the downstream "
    "feature's gradient (zero where it is inactive) and 1/sigma, averaged over examples. weight - direct is "
    "what passes through attention, other MLPs' skip paths, and the layer norm's sigma"
)


def _fmt(v: float | None) -> str:
    return "unresolvable" if v is None else f"{v:.3f}"


def evaluator_for(model, dicts, eval_bs: list[PairBatch], c: DictConfig) -> Faithfulness:
    return Faithfulness(model, dicts, eval_bs, c.ablation, c.seed, c.resolve_z, c.resolve_floor)


def _part(task: Task, pairs: list[TaskPair], info: dict) -> dict:
    return {"file": task.file, "sha256": task.sha256, "rows": sorted(p.index for p in pairs), "n": len(pairs), **info}


def circuit_pairs(
    run: RunDir, c: DictConfig, tokenizer, task_arg: str
) -> tuple[Task, Task, list[TaskPair], list[TaskPair], dict]:
    """The discovery and evaluation pairs of a task, disjoint, and where they come from: (discovery task, evaluation
    task, discovery pairs, evaluation pairs, metadata). Evaluation reads ``circuit.eval_task`` when given, else the
    run's other split (``<task>_test.jsonl`` for a circuit found on ``_train``), else a seeded split of the one
    file (``circuit.eval_fraction`` of its usable pairs, by row). Each part then keeps up to ``n_examples`` pairs
    by ``circuit.lengths`` (:func:`sfcd.data.tasks.select_pairs`). The metadata names the files (path, sha256) and
    the rows of each part, and the length rule's counts."""
    if c.lengths not in LENGTH_RULES:
        raise ConfigError(f"unknown circuit.lengths {c.lengths!r}; expected one of {list(LENGTH_RULES)}")
    path = task_path(run, task_arg, c.split)
    name = Path(task_arg).stem
    task = load_task(path, tokenizer, name)
    if not task.pairs:
        raise InputError(f"{task.summary()}: no usable pairs")
    other = run.task_file(task_arg, "test" if c.split == "train" else "train")
    if c.get("eval_task"):
        other = task_path(run, c.eval_task, "test" if c.split == "train" else "train")
    elif Path(task_arg).exists() or Path(task_arg).suffix in (".json", ".jsonl"):
        other = None  # a file given by path: no split of the run's beside it
    if other is not None and other.exists() and other.resolve() != path.resolve():
        eval_task = load_task(other, tokenizer, name)
        disc_rows = eval_rows = None
        how = f"separate files: discovery {path}, evaluation {other}"
    else:
        eval_task = task
        disc_rows, eval_rows = split_rows(task, c.eval_fraction, c.seed)
        how = (
            f"one file split by row (seed {c.seed}): {len(eval_rows)} of its {len(task.pairs)} usable pairs held out "
            f"for evaluation (circuit.eval_fraction={c.eval_fraction}), the rest for discovery"
        )
        if not eval_rows:
            raise InputError(
                f"task {name}: {len(task.pairs)} usable pair(s) in {path}, too few to hold any out for evaluation; "
                "give more pairs or a separate evaluation file (circuit.eval_task=...)"
            )
    disc, disc_info = select_pairs(task, c.n_examples, c.lengths, c.seed, disc_rows)
    evals, eval_info = select_pairs(eval_task, c.n_examples, c.lengths, c.seed, eval_rows)
    info = {"split": how, "discovery": _part(task, disc, disc_info), "evaluation": _part(eval_task, evals, eval_info)}
    log.info(
        "task %s: %d discovery pairs (lengths %s), %d evaluation pairs (lengths %s); %s",
        name,
        len(disc),
        disc_info["lengths_kept"],
        len(evals),
        eval_info["lengths_kept"],
        how,
    )
    return task, eval_task, disc, evals, info


def _node_id(site: Site, k: int, t: int | None) -> str:
    return f"{site.name}/{'eps' if k < 0 else k}" + ("" if t is None else f"@{t}")


def _kept(keep: dict, site: Site) -> list[tuple[int, int | None]]:
    """The kept nodes of ``site`` as (feature or -1 for the error node, position or None)."""
    mask, err = keep[site]
    if mask.ndim == 1:
        return [(int(k), None) for k in mask.nonzero().flatten()] + ([(-1, None)] if bool(err) else [])
    return [(int(k), int(t)) for t, k in mask.nonzero().tolist()] + [(-1, int(t)) for t in err.nonzero().flatten()]


def circuit_edges(
    model, dicts, bs, per_batch, sites, keep, n: int, reference: bool, nodes: list[dict], items: float | None = None
) -> list[dict]:
    """Edges between the circuit's nodes (:func:`edge_pairs`) and to the metric y (:func:`y_pairs`), averaged
    over examples: summed over positions, or per position (``keep`` masks of shape [T, F]: from each upstream
    (node, position) to each downstream (node, position), the downstream position at or after the upstream one)."""
    out = []
    parallel = parallel_blocks(model)
    per_pos = next(iter(keep.values()))[0].ndim == 2
    for up, stop in y_pairs(sites, parallel):
        mine = [nd for nd in nodes if nd["site"] == up.name]
        if not mine:
            continue
        if not stop:  # nothing chosen after it: the edge to y is its node effect (the paper's last resid -> y)
            out += [{"from": nd["id"], "to": "y", "weight": nd["effect"]} for nd in mine]
            continue
        w = sum(y_edge_effects(model, dicts, b, up, stop, eff, per_pos) for b, eff in zip(bs, per_batch, strict=True))
        w = w / n
        for nd in mine:
            j = -1 if nd["feature"] is None else nd["feature"]
            out.append({"from": nd["id"], "to": "y", "weight": float(w[nd["position"], j] if per_pos else w[j])})
    for up, down, stop in edge_pairs(sites, parallel):
        down_nodes, up_nodes = _kept(keep, down), _kept(keep, up)
        if not down_nodes or not up_nodes:
            continue
        w = sum(
            edge_effects(model, dicts, b, up, down, stop, eff, down_nodes, reference, per_pos, items)
            for b, eff in zip(bs, per_batch, strict=True)
        )
        w = w / n
        split = _split(model, dicts, bs, per_batch, up, down, down_nodes, up_nodes, n, per_pos, items)
        for r, (k, t) in enumerate(down_nodes):
            to = _node_id(down, k, t)
            for j, tu in up_nodes:
                if per_pos and tu > t:
                    continue  # a later position cannot reach an earlier one
                weight = float(w[r, tu, j] if per_pos else w[r, j])
                edge = {"from": _node_id(up, j, tu), "to": to, "weight": weight}
                if split is not None and k >= 0 and j >= 0:
                    vw, act, col = split
                    a = float(act[r, tu, col[j]] if per_pos else act[r, col[j]])
                    v = float(vw[r, col[j]])
                    edge |= {"virtual_weight": v, "activation": a, "direct": v * a}
                out.append(edge)
    return out


def _split(model, dicts, bs, per_batch, up, down, down_nodes, up_nodes, n, per_pos, items):
    """For an edge pair of transcoders (``mlp.<l'>`` -> ``mlp.<l>``): (virtual weights [D, U], activations [D, U]
    or [D, T, U] averaged over examples, {upstream feature: column}) of the kept nodes (:data:`EDGE_SPLIT`);
    else None."""
    if not (is_transcoder(dicts[up]) and is_transcoder(dicts[down]) and up.layer < down.layer):
        return None
    feats = sorted({j for j, _ in up_nodes if j >= 0})
    if not feats:
        return None
    col = {j: c for c, j in enumerate(feats)}
    vw = virtual_weights(model, dicts, up, down, [max(k, 0) for k, _ in down_nodes], feats)
    act = sum(
        direct_activations(
            norm_scales(model, b.clean, [down.layer])[down.layer], up, down, eff, down_nodes, feats, per_pos, items
        )
        for b, eff in zip(bs, per_batch, strict=True)
    )
    return vw, act / n, col


def faithfulness_of(cfg: DictConfig, step: int, task: str, node_ids: set[str]) -> dict[str, float]:
    """Faithfulness and completeness at checkpoint ``step`` of the circuit whose nodes are ``node_ids``
    (``<site>/<feature>`` or ``<site>/eps``, in that checkpoint's feature indices; a per-position id counts at
    every position), on the task's evaluation pairs (:func:`circuit_pairs`); ``faithfulness`` and
    ``completeness`` are None where F(M) - F(empty) is not resolvable (``resolvable`` false)."""
    c = cfg.circuit
    run = RunDir(cfg.run_dir)
    model, tokenizer, step = checkpoint(cfg, step, "circuit", CIRCUIT_DTYPES)
    device = work_device(cfg.trainer)
    model.to(device)
    sites = sorted(expand_sites(list(c.sites), model), key=lambda x: x.order)
    folders = (
        dictionary_folders(c.dictionaries, run, step, sites, c.get("transcoders", False))
        if c.dictionary == "sae"
        else None
    )
    dicts = load_dictionaries(model, sites, folders, step)
    _, eval_task, _, evals, _ = circuit_pairs(run, c, tokenizer, task)
    bs = batches(eval_task, c.n_examples, c.batch_size, device=device, pairs=evals)
    keep = {}
    for s_ in sites:
        mask = torch.zeros(dicts[s_].d_sae, dtype=torch.bool, device=device)
        for nid in node_ids:
            site, _, feat = nid.partition("/")
            if site == s_.name and feat != "eps":
                mask[int(feat.split("@")[0])] = True
        keep[s_] = (mask, any(nid.split("@")[0] == f"{s_.name}/eps" for nid in node_ids))  # @pos summed
    return evaluator_for(model, dicts, bs, c)(keep)
