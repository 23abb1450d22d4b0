"""The stages behind ``sfcd <stage>``: each takes the composed config and reads/writes the run directory."""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def corpus(cfg: DictConfig) -> None:
    """Generate (or read) the corpus, train its tokenizer, write token files and task files."""
    from sfcd.data.corpus import build_corpus

    run = build_corpus(cfg)
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


def reference(cfg: DictConfig) -> None:
    """The one-layer reference (use experiment=one_layer_reference): 1l model, its SAEs, a comparison table."""
    from sfcd.models.train import train_model
    from sfcd.sae.reference import write_comparison
    from sfcd.sae.stage import train_saes

    train_model(cfg)  # skipped when complete
    folders = train_saes(cfg)
    md = write_comparison(folders, folders[0].parent)
    print(md.read_text())
    print(f"comparison: {md}")


def eval(cfg: DictConfig) -> None:  # noqa: A001 - the stage's name
    """Score a checkpoint (step=N; a run's or model.source's) on task files: agreement and induction."""
    import json

    from sfcd.models.eval_stage import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(cfg), indent=2))


def demo(cfg: DictConfig) -> None:
    """The whole study on the embedded default (so far: corpus, model, SAEs at the last checkpoint)."""
    from sfcd.models.train import train_model
    from sfcd.sae.stage import train_saes

    run = train_model(cfg)
    folders = train_saes(cfg)
    print(f"demo run directory: {run.root}")
    print(f"  model checkpoints: {run.model} (steps {run.model_steps()})")
    print(f"  training curves:  {run.train_log} and {run.model / 'train_log.png'}")
    print(f"  SAEs:             {folders[0].parent} ({', '.join(f.name for f in folders)}; metrics.json in each)")


STAGES: dict[str, Callable[[DictConfig], None]] = {
    "corpus": corpus,
    "model": model,
    "sae": sae,
    "features": features,
    "reference": reference,
    "eval": eval,
    "demo": demo,
}
