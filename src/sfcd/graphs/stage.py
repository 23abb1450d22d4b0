"""The ``graph`` stage: the attribution graph of ``graph.prompt`` at each checkpoint with transcoders at every MLP
(or at ``step=``), pruned, scored and written to ``graphs/<name>/step<N>/graph.json`` and ``graph.html``."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from sfcd.devices import work_device
from sfcd.errors import ConfigError, InputError, MissingArtifactError
from sfcd.features.api import feature_notes
from sfcd.graphs.attribution import Graph, attribute, tokenize
from sfcd.graphs.page import write_graph_page
from sfcd.graphs.prune import Pruned, graph_scores, prune_graph
from sfcd.io import write_json
from sfcd.models.loading import checkpoint, provenance
from sfcd.models.sites import n_layers
from sfcd.paths import RunDir, steps_in
from sfcd.sae.io import load_transcoder

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step(\d+)$")


class IncompleteTranscoders(MissingArtifactError):
    """Some MLP of the model has no complete transcoder at a step."""


def slug(prompt: str, limit: int = 60) -> str:
    """A folder name for a prompt: lower case, runs of anything but letters and digits as one ``-``."""
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-")
    return s or "prompt"


def check_config(c: DictConfig) -> None:
    for name in ("node_threshold", "edge_threshold", "logit_probability"):
        v = c[name]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1):
            raise ConfigError(f"graph.{name}={v} is out of range; expected a share between 0 and 1")
    if c.max_logits < 1 or c.batch_size < 1:
        raise ConfigError("graph.max_logits and graph.batch_size must be >= 1")
    if c.max_feature_nodes is not None and c.max_feature_nodes < 0:
        raise ConfigError(f"graph.max_feature_nodes={c.max_feature_nodes}; expected >= 0 or null (all)")
    if not str(c.prompt).strip():
        raise ConfigError("graph.prompt is empty; set graph.prompt='...'")


def transcoder_root(cfg: DictConfig, run: RunDir) -> Path:
    """The folder that holds ``step<N>/mlp.<l>/`` (the run's ``transcoders/``) or ``mlp.<l>/`` directly."""
    return Path(cfg.graph.transcoders) if cfg.graph.transcoders else run.root / "transcoders"


def _complete(folder: Path, own: bool) -> bool:
    # the run's own transcoders are complete once metrics.json is written (the sae stage writes it last)
    return (folder / ("metrics.json" if own else "cfg.json")).exists()


def transcoder_steps(cfg: DictConfig, run: RunDir) -> list[int]:
    """The steps to graph: ``step=`` when given; else the steps with a transcoder folder (limited to
    ``study.steps`` when set); a folder of ``mlp.<l>/`` alone stands for the last checkpoint."""
    if cfg.step is not None:
        return [int(cfg.step)]
    root = transcoder_root(cfg, run)
    if cfg.graph.transcoders and any(root.glob("mlp.*")):
        return [run.resolve_step(None)] if not cfg.model.source else _need_step(root)
    steps = sorted(int(m.group(1)) for p in (root.iterdir() if root.is_dir() else []) if (m := _STEP.match(p.name)))
    study = [int(s) for s in cfg.study.get("steps", []) or []]
    if study:
        steps = [s for s in steps if s in study]
    if not steps:
        raise MissingArtifactError(
            f"no transcoders in {root}/step<N>/mlp.<l>/"
            + (f" at study.steps={study}" if study else "")
            + f"; train them with `sfcd sae run_dir={run.root} step=<N> sae.transcoders=[mlp]` "
            "(or point graph.transcoders=<folder> at a folder of mlp.<l>/ transcoders)"
        )
    return steps


def _need_step(root: Path) -> list[int]:
    raise ConfigError(f"graph.transcoders={root} holds mlp.<l>/ folders for one model; name its checkpoint: step=<N>")


def transcoder_folders(cfg: DictConfig, run: RunDir, step: int, layers: int) -> list[Path]:
    """``mlp.<l>/`` for every layer, checked complete; a missing one names what is missing and how to make it."""
    root = transcoder_root(cfg, run)
    base = root if cfg.graph.transcoders and any(root.glob("mlp.*")) else root / f"step{step}"
    own = not cfg.graph.transcoders
    folders = [base / f"mlp.{layer}" for layer in range(layers)]
    missing = [f.name for f in folders if not _complete(f, own)]
    if missing:
        what = "metrics.json (complete training)" if own else "cfg.json and sae.safetensors"
        raise IncompleteTranscoders(
            f"attribution graphs need a transcoder at every MLP: {base} lacks {missing} (each folder with {what}) "
            f"of the model's {layers} layers; train them with "
            f"`sfcd sae run_dir={run.root} step={step} sae.transcoders=[mlp]`"
            + ("" if own else " or fill the folder given as graph.transcoders")
        )
    return folders


def transcoder_notes(run: RunDir, step: int, layers: int) -> dict[int, object]:
    """{layer: feature notes} from ``features/step<N>/transcoders/mlp.<l>/`` where ``sfcd features`` described
    the transcoders (empty mappings elsewhere: the page then shows feature ids only)."""
    return {
        layer: feature_notes(run.root / "features" / f"step{step}" / "transcoders" / f"mlp.{layer}")
        for layer in range(layers)
    }


def graph_record(graph: Graph, pruned: Pruned, tokens: list[str], logit_tokens: list[str], meta: dict) -> dict:
    """The data of ``graph.json``: the pruned graph's nodes (id, kind, layer, position, latent, activation,
    influence and its cumulative share) and links (source, target, weight = the target's row, the source's
    column of the adjacency matrix), and ``meta``."""
    lay = graph.layout
    adj = graph.adjacency
    influence, cumulative = pruned.influence.tolist(), pruned.cumulative.tolist()
    feats, acts = graph.features.tolist(), graph.activations.tolist()
    ids: dict[int, str] = {}
    nodes = []
    for i in pruned.node_mask.nonzero(as_tuple=True)[0].tolist():
        node: dict = {"influence": influence[i], "cumulative": cumulative[i]}
        if i < lay.n_features:
            layer, pos, lat = feats[i]
            node.update(id=f"F{layer}.{lat}@{pos}", kind="feature", layer=layer, position=pos, latent=lat)
            node["activation"] = acts[i]
        elif i < lay.token_start:
            layer, pos = divmod(i - lay.error_start, lay.n_pos)
            node.update(id=f"E{layer}@{pos}", kind="error", layer=layer, position=pos, latent=None, activation=None)
        elif i < lay.logit_start:
            pos = i - lay.token_start
            node.update(id=f"T@{pos}", kind="token", layer=None, position=pos, latent=None, activation=None)
            node.update(token=tokens[pos], token_id=int(graph.token_ids[pos]))
        else:
            k = i - lay.logit_start
            vocab = int(graph.logit_ids[k])
            node.update(id=f"L{vocab}", kind="logit", layer=lay.n_layers, position=lay.n_pos - 1, latent=None)
            node.update(activation=None, token=logit_tokens[k], token_id=vocab)
            node["probability"] = float(graph.probabilities[k])
        ids[i] = node["id"]
        nodes.append(node)
    links = []
    edges = pruned.edge_mask & pruned.node_mask[:, None] & pruned.node_mask[None, :]
    for t, s in edges.nonzero().tolist():
        links.append({"source": ids[s], "target": ids[t], "weight": float(adj[t, s])})
    return {"metadata": meta, "nodes": nodes, "links": links}


def pruned_scores(graph: Graph, pruned: Pruned) -> tuple[float, float]:
    """The replacement and completeness scores of the pruned graph (its kept edges only)."""
    kept = graph.adjacency * pruned.edge_mask.to(graph.adjacency.dtype)
    return graph_scores(kept, graph.layout, graph.probabilities)


def graph_one(cfg: DictConfig, run: RunDir, step: int, name: str) -> Path:
    c = cfg.graph
    model, tokenizer, step = checkpoint(cfg, step, "graph")
    device = work_device(cfg.trainer)
    model.to(device)
    layers = n_layers(model)
    folders = transcoder_folders(cfg, run, step, layers)
    tcs = [load_transcoder(f) for f in folders]
    for f, tc in zip(folders, tcs, strict=True):
        if tc.d_in != model.config.hidden_size:
            raise InputError(
                f"{f}: a transcoder of width {tc.d_in}, but the model at step {step} has hidden size "
                f"{model.config.hidden_size}; these transcoders belong to another model"
            )
    ids = tokenize(tokenizer, str(c.prompt))
    log.info("graph %r at step %d: %d tokens, transcoders %s", c.prompt, step, len(ids), folders[0].parent)
    graph = attribute(
        model,
        tcs,
        ids,
        max_logits=int(c.max_logits),
        logit_probability=float(c.logit_probability),
        batch_size=int(c.batch_size),
        max_feature_nodes=None if c.max_feature_nodes is None else int(c.max_feature_nodes),
    )
    pruned = prune_graph(graph.adjacency, graph.layout, graph.probabilities, c.node_threshold, c.edge_threshold)
    replacement_score, completeness_score = graph_scores(graph.adjacency, graph.layout, graph.probabilities)
    pr, pc = pruned_scores(graph, pruned)
    tokens = [tokenizer.decode([int(i)]) for i in ids]
    logit_tokens = [tokenizer.decode([int(i)]) for i in graph.logit_ids]
    meta = {
        "prompt": str(c.prompt),
        "tokens": tokens,
        "token_ids": [int(i) for i in ids],
        "step": step,
        "n_layers": layers,
        "node_threshold": float(c.node_threshold),
        "edge_threshold": float(c.edge_threshold),
        "max_logits": int(c.max_logits),
        "logit_probability": float(c.logit_probability),
        "max_feature_nodes": c.max_feature_nodes,
        "logits": [
            {"token": t, "token_id": int(i), "probability": float(p)}
            for t, i, p in zip(logit_tokens, graph.logit_ids, graph.probabilities, strict=True)
        ],
        "n_active_features": graph.n_active,
        "n_features_attributed": graph.layout.n_features,
        "n_nodes_kept": int(pruned.node_mask.sum()),
        "replacement_score": replacement_score,
        "completeness_score": completeness_score,
        "pruned_replacement_score": pr,
        "pruned_completeness_score": pc,
        "transcoders": [str(f) for f in folders],
        "model": provenance(model),
        "method": "circuit-tracer (Ameisen et al. 2025): transcoders + error nodes, frozen attention patterns and "
        "LayerNorm scales, demeaned logit targets, BOS position zeroed; edges are direct effects",
        "timing": graph.timing,
    }
    record = graph_record(graph, pruned, tokens, logit_tokens, meta)
    out = run.root / "graphs" / name / f"step{step}"
    write_json(out / "graph.json", record)
    write_graph_page(out, record, transcoder_notes(run, step, layers))
    del model, graph
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def build_graphs(cfg: DictConfig) -> list[Path]:
    """``graphs/<name>/step<N>/`` for each step with transcoders at every MLP (or ``step=``)."""
    check_config(cfg.graph)
    run = RunDir(cfg.run_dir)
    if not cfg.model.source:
        run.require()
    name = cfg.graph.name or slug(str(cfg.graph.prompt))
    steps = transcoder_steps(cfg, run)
    model_steps = set(steps_in(run.model)) if not cfg.model.source else None
    outs, skipped = [], []
    for step in steps:
        if model_steps is not None and step not in model_steps:
            raise MissingArtifactError(
                f"transcoders at step {step} but no model checkpoint {run.model_step(step)}; "
                f"the checkpoints are {sorted(model_steps)}"
            )
        try:
            outs.append(graph_one(cfg, run, step, name))
        except IncompleteTranscoders as e:
            if cfg.step is not None:  # the step asked for: its transcoders must be complete
                raise
            log.warning("skipping step %d: %s", step, e)
            skipped.append(e)
    if not outs:
        raise skipped[-1]
    return outs
