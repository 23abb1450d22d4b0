"""Loading models and tokenizers: a hub id at ``revision="step<N>"``, a local run's ``model/step<N>/``, or any
folder made by ``save_pretrained``; all through the same ``from_pretrained`` call."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from sfcd.errors import ConfigError, MissingArtifactError, OfflineError
from sfcd.paths import RunDir, steps_in

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

#: the dtypes a model can be loaded in (``model.dtype``), whatever dtype its checkpoint is stored in
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def model_dtype(name: str | None, stage: str | None = None, allowed: tuple[str, ...] = MODEL_DTYPES):
    """``model.dtype`` as a torch dtype, checked against what ``stage`` can use (a one-line error otherwise)."""
    import torch

    name = str(name or "float32")
    if name not in MODEL_DTYPES:
        raise ConfigError(f"model.dtype={name!r}; expected one of {list(MODEL_DTYPES)}")
    if name not in allowed:
        raise ConfigError(
            f"model.dtype={name} cannot be used by the {stage} stage (it can use {list(allowed)}); "
            f"pass model.dtype={allowed[0]}"
        )
    return getattr(torch, name)


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
    - a checkpoint series, a folder of ``step<N>/`` checkpoint folders (as the hub's revisions, laid out on
      disk): its ``step<N>/``, the last one when ``step`` is None;
    - anything else: a hub id, at revision ``step<N>`` when ``step`` is given (Pythia's naming).
    """
    p = Path(name_or_path)
    if (p / "model").is_dir():
        run = RunDir(p)
        return ModelSource(str(run.model_step(run.resolve_step(step))))
    if p.is_dir() and not (p / "config.json").exists() and steps_in(p):
        steps = steps_in(p)
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise MissingArtifactError(f"no checkpoint step{step} in the series {p}; the steps there are {steps}")
        return ModelSource(str(p / f"step{step}"))
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


def source_steps(name_or_path: str | os.PathLike[str]) -> list[int] | None:
    """The checkpoint steps a ``model.source`` holds: a run directory's or a checkpoint series folder's; None for
    a hub id (its revisions are only known online) or a single checkpoint folder (any step names it)."""
    p = Path(name_or_path)
    if (p / "model").is_dir():
        return RunDir(p).model_steps()
    if p.is_dir() and not (p / "config.json").exists():
        return steps_in(p)
    return None


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


def load_model(name_or_path: str | os.PathLike[str], step: int | None = None, dtype="float32", **kwargs):
    """A causal LM in eval mode from a hub id (at ``revision=f"step{step}"``), run directory or folder, with its
    weights in ``dtype`` (float32 by default) whatever dtype the checkpoint is stored in (Pythia's hub
    checkpoints are float16, and transformers would otherwise keep the stored dtype).

    ``model.sfcd_source`` records where it came from (see :func:`provenance`)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = model_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    source = resolve(name_or_path, step)
    log.info("loading model %s%s", source.path, f" @ {source.revision}" if source.revision else "")
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, source, "model config")
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # before loading rewrites it
    model = _from_pretrained(AutoModelForCausalLM, source, "model", config=config, dtype=torch_dtype, **kwargs)
    model.sfcd_source = {
        "source": str(name_or_path),
        "path": source.path,
        "revision": source.revision,
        "step": step,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "stored_dtype": str(stored).removeprefix("torch.") if stored is not None else None,
    }
    return model.eval()


def weights_hash(model) -> str:
    """sha256 of the model's weights as loaded: every state-dict tensor in name order (its name, dtype, shape and
    bytes). Two checkpoints with identical weights loaded in the same dtype get the same hash. Cached on the
    model (``model.sfcd_weights_sha256``); computed on the CPU one tensor at a time."""
    import torch

    cached = getattr(model, "sfcd_weights_sha256", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    model.sfcd_weights_sha256 = h.hexdigest()
    return model.sfcd_weights_sha256


def provenance(model) -> dict:
    """Which checkpoint a model is: the source given (hub id, run directory, folder or series), the folder or
    hub id loaded, its revision and step, the dtype used and the stored one, and :func:`weights_hash`. Every
    artifact trained on a model records this (``sfcd_model`` in an SAE's or crosscoder's cfg.json)."""
    info = dict(getattr(model, "sfcd_source", None) or {"source": getattr(model, "name_or_path", None)})
    info["weights_sha256"] = weights_hash(model)
    return info


def warn_identical(named: dict) -> list[list]:
    """Groups of names (e.g. steps) whose :func:`provenance` hashes are equal, each warned about by name:
    Pythia's step0 and step1 on the hub hold identical weights, so their "development" is no change at all."""
    by_hash: dict[str, list] = {}
    for name, info in named.items():
        h = info.get("weights_sha256") if isinstance(info, dict) else info
        if h:
            by_hash.setdefault(h, []).append(name)
    groups = [g for g in by_hash.values() if len(g) > 1]
    for g in groups:
        msg = (
            f"checkpoints {', '.join(map(str, g))} have identical weights; what differs between them is the "
            "dictionaries' own noise, not the model's development"
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return groups


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


def named_tokenizer(cfg):
    """The tokenizer a corpus config names (``corpus.tokenizer``, else ``model.source``'s), None for the built-in
    corpus, which trains its own: what :func:`sfcd.data.corpus.build_corpus` takes."""
    name = cfg.corpus.tokenizer or cfg.model.source
    return load_tokenizer(name) if name else None


def checkpoint(cfg, step: int | None, stage: str | None = None, dtypes: tuple[str, ...] = MODEL_DTYPES):
    """(model, tokenizer, step) for a stage: ``cfg.model.source`` when set (a hub id at revision ``step<N>``, a
    checkpoint series folder's ``step<N>/``, or one local ``save_pretrained`` folder, for which ``step`` only names
    the outputs), else the run's checkpoint; the weights in ``cfg.model.dtype``, which must be one of ``dtypes``
    (what ``stage`` can use)."""
    dtype = model_dtype(cfg.model.get("dtype", "float32"), stage, dtypes)
    source = cfg.model.source
    if source:
        folder = Path(source)
        single = folder.is_dir() and (folder / "config.json").exists()
        if step is None and not (single and stage == "eval"):  # eval names a lone folder's output by the folder
            raise ConfigError(f"model.source={source} needs step=<N> (the checkpoint, revision step<N> on the hub)")
        load_step = None if single else step
        tokenizer = load_tokenizer(source, load_step)  # first: a folder without one fails before the weights load
        return load_model(source, load_step, dtype=dtype), tokenizer, step
    run = RunDir(cfg.run_dir).require()
    step = run.resolve_step(step)
    return load_model(run.root, step, dtype=dtype), load_tokenizer(run.root, step), step
