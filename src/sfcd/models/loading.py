"""Loading models and tokenizers: a hub id at ``revision="step<N>"``, a local run's ``model/step<N>/``, or any
folder made by ``save_pretrained``; all through the same ``from_pretrained`` call."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sfcd.errors import MissingArtifactError, OfflineError
from sfcd.paths import RunDir

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads from: a local folder, or a hub id and revision."""

    path: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve(name_or_path: str | os.PathLike[str], step: int | None = None) -> ModelSource:
    """Turn a run directory, a model folder or a hub id (+ step) into a :class:`ModelSource`.

    - a run directory (has ``model/``): its ``model/step<N>/``, the last one when ``step`` is None;
    - a folder with ``config.json``: that folder (``step`` must be None);
    - anything else: a hub id, at revision ``step<N>`` when ``step`` is given (Pythia's naming).
    """
    p = Path(name_or_path)
    if (p / "model").is_dir():
        run = RunDir(p)
        return ModelSource(str(run.model_step(run.resolve_step(step))))
    if p.is_dir():
        if (p / "config.json").exists() or (p / "tokenizer_config.json").exists():
            if step is not None:
                raise MissingArtifactError(
                    f"{p} is one checkpoint folder; step={step} applies to run directories and hub ids only"
                )
            return ModelSource(str(p))
        raise MissingArtifactError(
            f"{p} is a folder but holds neither config.json nor model/; expected a "
            "save_pretrained folder or an sfcd run directory"
        )
    if str(name_or_path).startswith((".", "/", "~")) or os.sep in str(name_or_path).rstrip(os.sep).split(os.sep, 1)[-1]:
        raise MissingArtifactError(
            f"{name_or_path} does not exist; expected a run directory, a save_pretrained "
            "folder or a hub id such as EleutherAI/pythia-70m-deduped"
        )
    return ModelSource(str(name_or_path), None if step is None else f"step{step}")


def _from_pretrained(loader, source: ModelSource, what: str, **kwargs):
    try:
        return loader.from_pretrained(source.path, revision=source.revision, **kwargs)
    except OSError as e:
        if source.is_local:
            raise MissingArtifactError(f"cannot load the {what} from {source.path}: {e}") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        rev = f" at revision {source.revision}" if source.revision else ""
        raise OfflineError(
            f"cannot load the {what} {source.path!r}{rev} from the Hugging Face hub: it needs the network "
            f"and is not in the local cache{' (HF offline mode is set)' if offline else ''}. "
            "Offline, pass a local folder made by save_pretrained or an sfcd run directory."
        ) from None


def load_model(name_or_path: str | os.PathLike[str], step: int | None = None, **kwargs):
    """A causal LM in eval mode from a hub id (at ``revision=f"step{step}"``), run directory or folder."""
    from transformers import AutoModelForCausalLM

    source = resolve(name_or_path, step)
    log.info("loading model %s%s", source.path, f" @ {source.revision}" if source.revision else "")
    model = _from_pretrained(AutoModelForCausalLM, source, "model", **kwargs)
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike[str], step: int | None = None):
    """The tokenizer that belongs with :func:`load_model`'s model."""
    from transformers import AutoTokenizer

    source = resolve(name_or_path, step)
    if source.is_local and not any((Path(source.path) / f).exists() for f in TOKENIZER_FILES):
        # AutoTokenizer would quietly build an empty tokenizer from config.json alone
        raise MissingArtifactError(
            f"no tokenizer in {source.path}: none of {list(TOKENIZER_FILES)} is there; "
            "save the tokenizer beside the model (tokenizer.save_pretrained)"
        )
    return _from_pretrained(AutoTokenizer, source, "tokenizer")


def checkpoint(cfg, step: int | None):
    """(model, tokenizer, step) for a stage: ``cfg.model.source`` when set (a hub id at revision ``step<N>``, or a
    local ``save_pretrained`` folder, for which ``step`` only names the outputs), else the run's checkpoint."""
    from sfcd.errors import ConfigError

    source = cfg.model.source
    if source:
        if step is None:
            raise ConfigError(f"model.source={source} needs step=<N> (the checkpoint, revision step<N> on the hub)")
        folder = Path(source)
        load_step = None if folder.is_dir() and (folder / "config.json").exists() else step
        return load_model(source, load_step), load_tokenizer(source, load_step), step
    run = RunDir(cfg.run_dir).require()
    step = run.resolve_step(step)
    return load_model(run.root, step), load_tokenizer(run.root, step), step
