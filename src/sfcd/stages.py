"""The stages behind ``sfcd <stage>``: each takes the composed config and reads/writes the run directory."""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def corpus(cfg: DictConfig) -> None:
    """Generate (or read) the corpus, train its tokenizer, write token files and task files."""
    from sfcd.data.corpus import build_corpus
    from sfcd.models.loading import named_tokenizer

    run = build_corpus(cfg, named_tokenizer(cfg))
    print(f"corpus: {run.corpus}")


def model(cfg: DictConfig) -> None:
    """Train the built-in model with checkpoints (builds the corpus first when missing); resumes."""
    from sfcd.models.train import train_model

    run = train_model(cfg)
    print(f"model checkpoints: {run.model} (steps {run.model_steps()}); log: {run.train_log}")


def sae(cfg: DictConfig) -> None:
    """Train SAEs on a checkpoint's activations (sae.sites, sae.architecture), evaluate them, write SAELens files."""
    from sfcd.sae.stage import train_saes

    for folder in train_saes(cfg):
        print(f"SAE: {folder}")


def features(cfg: DictConfig) -> None:
    """Feature statistics, top contexts, logit effects and an offline dashboard for a checkpoint's SAEs."""
    from sfcd.features.stage import build_features

    for folder in build_features(cfg):
        print(f"features: {folder / 'index.html'}")


def circuit(cfg: DictConfig) -> None:
    """A sparse feature circuit for a task at a checkpoint: node/edge effects, faithfulness, pictures."""
    from sfcd.circuits.stage import find_circuit

    out = find_circuit(cfg)
    print(f"circuit: {out / 'circuit.json'} (picture {out / 'circuit.svg'}, curve {out / 'faithfulness.png'})")


def graph(cfg: DictConfig) -> None:
    """Attribution graphs of graph.prompt (transcoders at every MLP; circuit-tracer's method): graph.json, .html."""
    from sfcd.graphs.stage import build_graphs

    for folder in build_graphs(cfg):
        print(f"graph: {folder / 'graph.json'} (page {folder / 'graph.html'})")


def crosscoder(cfg: DictConfig) -> None:
    """Crosscoders over K checkpoints (crosscoder.steps, default study.steps) at crosscoder.sites; latents read."""
    from sfcd.crosscoders.stage import train_crosscoders

    for folder in train_crosscoders(cfg):
        print(f"crosscoder: {folder} (latents {folder / 'latents.json'}, plot {folder / 'latents.png'})")


def study(cfg: DictConfig) -> None:
    """The whole study over study.steps: model, SAEs, features, circuits, development analysis, report.html."""
    from sfcd.study import run_study

    print(f"report: {run_study(cfg)}")


def reference(cfg: DictConfig) -> None:
    """The one-layer reference (use experiment=one_layer_reference): 1l model, its SAEs, a comparison table."""
    from sfcd.models.train import train_model
    from sfcd.sae.reference import write_comparison
    from sfcd.sae.stage import train_saes

    train_model(cfg)  # skipped when complete
    folders = [f for f in train_saes(cfg) if f.parent.parent.name != "transcoders"]  # (the SAEs are compared)
    md = write_comparison(folders, folders[0].parent)
    print(md.read_text())
    print(f"comparison: {md}")


def eval(cfg: DictConfig) -> None:  # noqa: A001 - the stage's name
    """Score a checkpoint (step=N; a run's or model.source's) on task files: agreement and induction."""
    from sfcd.io import dumps
    from sfcd.models.eval_stage import evaluate_checkpoint

    print(dumps(evaluate_checkpoint(cfg), indent=2))


def demo(cfg: DictConfig) -> None:
    """The whole study on the embedded default: corpus, model, SAEs, features, circuits, development, report."""
    from sfcd.paths import RunDir
    from sfcd.study import run_study

    page = run_study(cfg)
    run = RunDir(cfg.run_dir)
    print(f"demo run directory: {run.root}")
    print(f"  model checkpoints: {run.model} (steps {run.model_steps()}); curves {run.model / 'train_log.png'}")
    print(f"  SAEs:             {run.root / 'saes'}/step<N>/<site>/ (SAELens layout, metrics.json)")
    print(f"  dashboards:       {run.root / 'features'}/step<N>/<site>/index.html")
    print(f"  circuits:         {run.root / 'circuits'}/<task>/step<N>/circuit.svg, faithfulness.png")
    print(f"  development:      {run.root / 'development'}/ (CSV, JSON and PNG)")
    print(f"report: {page}")


STAGES: dict[str, Callable[[DictConfig], None]] = {
    "corpus": corpus,
    "model": model,
    "sae": sae,
    "features": features,
    "circuit": circuit,
    "graph": graph,
    "crosscoder": crosscoder,
    "study": study,
    "reference": reference,
    "eval": eval,
    "demo": demo,
}
