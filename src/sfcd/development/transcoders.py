"""Transcoders through training (issue 23, item 4): each MLP's transcoder beside the SAE of its output at every
studied step, its latents matched across steps, and the attribution graph of an agreement prompt read back
through the steps: which of the last graph's nodes carry the subject's number, which paths join them, and at
which studied step each node's feature appears.

A transcoder latent has an encoder direction (what it reads) and a decoder direction (what it writes); two
latents are the same feature when both agree: they are matched by the mean of the two cosines (the cosine of
the concatenated unit directions), one to one (:func:`sfcd.development.matching.match_decoders`), live latents
only. A latent of the last step is *present* at an earlier step when its match there has mean cosine >= the
study's ``shared_threshold``; its *onset* is the first studied step from which it is present at every later one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sfcd.development.matching import match_decoders
from sfcd.development.saes import live
from sfcd.errors import MissingArtifactError
from sfcd.io import read_json
from sfcd.paths import RunDir


def transcoder_folder(run: RunDir, step: int, site: str) -> Path:
    f = run.transcoders(step) / site
    if not (f / "metrics.json").exists():
        raise MissingArtifactError(
            f"no transcoder {site} at step {step} ({f}); train it with "
            f"`sfcd sae run_dir={run.root} step={step} sae.transcoders=[{site}]`"
        )
    return f


def directions(folder: Path) -> torch.Tensor:
    """[F, 2 d]: each latent's unit encoder and unit decoder direction side by side, over sqrt(2), so that the
    dot product of two rows is the mean of the encoder and decoder cosines."""
    t = load_file(str(folder / "sae.safetensors"))
    enc, dec = t["encoder.weight"].float(), t["W_dec"].float()
    unit = [w / w.norm(dim=1, keepdim=True).clamp_min(1e-12) for w in (enc, dec)]
    return torch.cat(unit, 1) / math.sqrt(2)


def match_to(da: torch.Tensor, la: np.ndarray, other: Path, device=None) -> tuple[np.ndarray, np.ndarray]:
    """For each latent of the last transcoder (its :func:`directions` ``da`` and live latents ``la``, read once
    for every step): its one-to-one match among ``other``'s live latents (-1: none, or dead in the last) and the
    mean cosine of the pair."""
    lb = live(other)
    m = match_decoders(da[la], directions(other)[lb], device=device)
    match, sim = np.full(len(da), -1), np.zeros(len(da))
    ok = m.match >= 0
    match[la[ok]] = lb[m.match[ok]]
    sim[la] = m.sim
    return match, sim


def site_development(run: RunDir, steps: list[int], site: str, threshold: float, device=None) -> dict:
    """One MLP's transcoders through ``steps``: per step the share of the last step's live latents present
    there, and each live last-step latent's onset."""
    folders = [transcoder_folder(run, s, site) for s in steps]
    last, alive = directions(folders[-1]), live(folders[-1])
    present, matches = [], []
    for f in folders[:-1]:
        match, sim = match_to(last, alive, f, device)
        present.append((match >= 0) & (sim >= threshold))
        matches.append(np.where(present[-1], match, -1))
    present.append(np.isin(np.arange(len(last)), alive))
    shares = [float(p[alive].mean()) if len(alive) else 0.0 for p in present]
    onset: dict[int, int | None] = {}
    for j in alive:
        k = len(steps) - 1
        while k > 0 and present[k - 1][j]:
            k -= 1
        onset[int(j)] = steps[k]
    # matches: per earlier step, each last latent's present match there (-1: absent); not written out
    return {"shared_with_final": shares, "onset": onset, "live": len(alive), "matches": matches}


def metric_rows(run: RunDir, steps: list[int], sites: list[str]) -> list[dict]:
    """Per (MLP, step): the transcoder's FVE of the MLP output, CE loss score spliced in place of the MLP, L0
    and dead fraction, beside the SAE of the same MLP's output when the run has one."""
    rows = []
    keys = ("fve", "ce_loss_score", "l0", "dead_fraction", "d_sae")
    for site in sites:
        for step in steps:
            m = read_json(transcoder_folder(run, step, site) / "metrics.json")
            sae = run.root / "saes" / f"step{step}" / site / "metrics.json"
            s = read_json(sae) if sae.exists() else {}
            rows.append(
                {"site": site, "step": step, **{k: m.get(k) for k in keys}, **{f"sae_{k}": s.get(k) for k in keys}}
            )
    return rows


@torch.no_grad()
def activations_at(model, tokenizer, transcoders: dict[int, object], prompt: str) -> dict[int, torch.Tensor]:
    """Each layer's transcoder latents [positions, d_sae] on ``prompt`` (tokenised as the graphs are)."""
    from sfcd.graphs.attribution import tokenize
    from sfcd.models.sites import parse_site, run_with_cache

    device = next(model.parameters()).device
    ids = tokenize(tokenizer, prompt).to(device)
    sites = [parse_site(f"mlp_in.{layer}", model) for layer in transcoders]
    cache = run_with_cache(model, ids[None], sites)
    return {layer: tc.encode(cache[f"mlp_in.{layer}"][0].float()) for layer, tc in transcoders.items()}


def number_nodes(graph: dict, other: dict[int, torch.Tensor], change: float = 0.5) -> list[dict]:
    """The kept feature nodes of ``graph`` (a graph.json record) whose activation changes by more than
    ``change`` of itself when the subject's number is flipped (``other``: the latents on the flipped prompt,
    position by position): the nodes that carry the subject's number."""
    out = []
    for n in graph["nodes"]:
        if n["kind"] != "feature":
            continue
        a = float(n["activation"])
        b = float(other[n["layer"]][n["position"], n["latent"]])
        if abs(a - b) > change * abs(a):
            out.append({**{k: n[k] for k in ("id", "layer", "position", "latent", "activation")}, "flipped": b})
    return out


def strongest_paths(graph: dict, source: str, target: str, through: set[str], n: int = 3) -> list[dict]:
    """The ``n`` paths from node ``source`` to ``target`` over the kept links with the largest product of
    absolute edge weights among those that pass through a node of ``through``: dynamic programming over the
    links in topological order (a graph's links go forward), keeping the best ``n`` partial paths per node and
    per "through reached yet" state, so the cost is linear in the links."""
    out_edges: dict[str, list[tuple[str, float]]] = {}
    indegree: dict[str, int] = {}
    for e in graph["links"]:
        out_edges.setdefault(e["source"], []).append((e["target"], abs(float(e["weight"]))))
        indegree[e["target"]] = indegree.get(e["target"], 0) + 1
        indegree.setdefault(e["source"], 0)
    order, ready = [], [v for v, d in indegree.items() if d == 0]
    while ready:
        v = ready.pop()
        order.append(v)
        for w, _ in out_edges.get(v, []):
            indegree[w] -= 1
            if indegree[w] == 0:
                ready.append(w)
    # best[node][state]: up to n (score, path) pairs; state 1 once the path has met a node of ``through``
    best: dict[str, list[list[tuple[float, list[str]]]]] = {v: [[], []] for v in order}
    if source not in best or target not in best:
        return []
    best[source][int(source in through)] = [(1.0, [source])]
    for v in order:
        for state in (0, 1):
            for score, path in best[v][state]:
                for w, weight in out_edges.get(v, []):
                    if weight > 0:
                        st = 1 if state or w in through else 0
                        best[w][st] = sorted([*best[w][st], (score * weight, [*path, w])], key=lambda t: -t[0])[:n]
    return [{"path": p, "score": sc} for sc, p in best[target][1]]


def agreement_pair(run: RunDir, task: str, tokenizer, index: int = 0) -> dict:
    """The ``index``-th pair of ``task``'s test file whose clean and patch prompts tokenise to the same length
    (only the subject's number differs): the prompts, the subject's position (the first that differs) and the
    clean answer's token id."""
    from sfcd.data.tasks import read_rows
    from sfcd.graphs.attribution import tokenize

    found = 0
    for row in read_rows(run.task_file(task)):
        a, b = tokenize(tokenizer, row["clean_prefix"]), tokenize(tokenizer, row["patch_prefix"])
        if len(a) != len(b) or torch.equal(a, b):
            continue
        if found == index:
            answer = tokenizer(row["clean_answer"], add_special_tokens=False)["input_ids"]
            return {
                "task": task,
                "clean": row["clean_prefix"],
                "patch": row["patch_prefix"],
                "subject_position": int((a != b).nonzero()[0]),
                "answer": row["clean_answer"],
                "answer_id": int(answer[0]) if len(answer) == 1 else None,
            }
        found += 1
    raise MissingArtifactError(f"{run.task_file(task)} has no pair of prompts of equal length to draw a graph of")


def graph_development(cfg, run: RunDir, steps: list[int], pair: dict, name: str, sites_dev: dict) -> dict:
    """The attribution graph of ``pair["clean"]`` (``graphs/<name>/step<N>/graph.json``) at each step: its
    nodes that carry the subject's number (their activation changes by more than half when the subject's number
    flips, ``pair["patch"]``), the strongest paths from the subject token through them to the clean answer's
    logit at the last step, and for each of the last step's number nodes its feature's onset (``sites_dev``)
    and the steps at whose graph its matched feature is a kept node at the same position."""
    from sfcd.devices import work_device
    from sfcd.models.loading import checkpoint
    from sfcd.sae.io import load_transcoder

    device = work_device(cfg.trainer)  # the model and transcoders where the work runs
    per_step, graphs = [], {}
    for step in steps:
        g = read_json(run.root / "graphs" / name / f"step{step}" / "graph.json")
        graphs[step] = g
        model, tokenizer, _ = checkpoint(cfg, step)
        model.to(device)
        layers = g["metadata"]["n_layers"]
        tcs = {
            layer: load_transcoder(transcoder_folder(run, step, f"mlp.{layer}")).to(device) for layer in range(layers)
        }
        flipped = activations_at(model.eval(), tokenizer, tcs, pair["patch"])
        nodes = number_nodes(g, flipped)
        per_step.append(
            {
                "step": step,
                "nodes": sum(n["kind"] == "feature" for n in g["nodes"]),
                "number_nodes": nodes,
                "replacement_score": g["metadata"].get("replacement_score"),
                "completeness_score": g["metadata"].get("completeness_score"),
                "answer_probability": next(
                    (x["probability"] for x in g["metadata"]["logits"] if x["token_id"] == pair["answer_id"]), None
                ),
            }
        )
    last = per_step[-1]
    kept = {
        s: {(n["layer"], n["position"], n["latent"]) for n in graphs[s]["nodes"] if n["kind"] == "feature"}
        for s in steps
    }
    named = []
    for n in last["number_nodes"]:
        site = f"mlp.{n['layer']}"
        d = sites_dev[site]
        in_graph = [
            s
            for k, s in enumerate(steps)
            if (j := (d["matches"][k][n["latent"]] if k < len(steps) - 1 else n["latent"])) >= 0
            and (n["layer"], n["position"], int(j)) in kept[s]
        ]
        named.append({**n, "site": site, "onset": d["onset"].get(str(n["latent"])), "in_graph_at": in_graph})
    through = {n["id"] for n in last["number_nodes"]}
    paths = strongest_paths(graphs[steps[-1]], f"T@{pair['subject_position']}", f"L{pair['answer_id']}", through)
    return {"pair": pair, "name": name, "per_step": per_step, "number_nodes": named, "paths": paths}


def graph_names(pair: dict) -> tuple[str, str]:
    """The graphs/ folder names of a pair's clean and flipped prompts."""
    return f"{pair['task']}-clean", f"{pair['task']}-flipped"


def transcoder_development(cfg, run: RunDir, steps: list[int], pair: dict | None, device=None) -> dict:
    """Everything of the transcoders' part of development.json (and ``development/transcoders.csv``): metrics
    per MLP and step beside the SAEs, per MLP the share of the last latents present at each step, and (given
    ``pair``) the agreement graph read through the steps."""
    from sfcd.io import write_csv

    root = run.transcoders(steps[-1])
    sites = sorted(p.name for p in root.iterdir() if (p / "metrics.json").exists()) if root.is_dir() else []
    if not sites:
        raise MissingArtifactError(f"no transcoders in {root}; the study trains them with study.transcoders=true")
    threshold = float(cfg.study.shared_threshold)
    sites_dev = {s: site_development(run, steps, s, threshold, device) for s in sites}
    for d in sites_dev.values():  # JSON keys are strings
        d["onset"] = {str(k): v for k, v in d["onset"].items()}
    rows = metric_rows(run, steps, sites)
    for r in rows:
        r["shared_with_final"] = sites_dev[r["site"]]["shared_with_final"][steps.index(r["step"])]
    write_csv(run.root / "development" / "transcoders.csv", rows, list(rows[0]))
    graph = graph_development(cfg, run, steps, pair, graph_names(pair)[0], sites_dev) if pair else None
    return {
        "steps": steps,
        "rows": rows,
        "sites": {s: {k: v for k, v in d.items() if k != "matches"} for s, d in sites_dev.items()},
        "graph": graph,
    }
