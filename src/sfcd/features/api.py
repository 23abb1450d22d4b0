"""Feature data for notebooks: ``sfcd.features.api.feature(run_dir, step, sae, id)``.

Reads a dashboard folder ``features/step<N>/<sae>/`` (see :mod:`sfcd.features.dashboard`): the small
``index.json`` whole, and a feature's shard file only when that feature is asked for."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path

from sfcd.errors import MissingArtifactError
from sfcd.features.dashboard import read_shard, shard_name
from sfcd.io import read_json


@lru_cache(maxsize=8)
def _index(folder: str, mtime: float) -> dict:
    return read_json(Path(folder) / "index.json")


@lru_cache(maxsize=64)
def _shard(folder: str, name: str, mtime: float) -> dict:
    return read_shard(Path(folder) / name)


def _stamp(path: Path) -> float:
    return path.stat().st_mtime_ns  # cache keys: a rewritten folder is read again


def load_index(folder: str | Path) -> dict:
    """The index of a dashboard folder: summary, and per feature (lists in id order) density, max, mean, label
    (token id, -1 for none), flags and key tokens, with the text of those tokens (``tokens``)."""
    folder = Path(folder)
    return _index(str(folder), _stamp(folder / "index.json"))


def load_record(folder: str | Path, feature_id: int) -> tuple[dict, dict[str, str]]:
    """One feature's record in a dashboard folder and the text of the tokens of its shard."""
    folder = Path(folder)
    idx = load_index(folder)
    name = shard_name(feature_id // idx["shard_size"], idx["shard_digits"])
    path = folder / name
    if not path.exists():
        raise MissingArtifactError(f"{path} does not exist; rerun the features stage to rebuild {folder}")
    data = _shard(str(folder), name, _stamp(path))
    return data["features"][feature_id - data["first"]], data["tokens"]


def features_dir(run_dir: str | Path, step: int, sae: str) -> Path:
    p = Path(run_dir) / "features" / f"step{step}" / sae
    if not (p / "index.json").exists():
        raise MissingArtifactError(
            f"{p / 'index.json'} does not exist; run `sfcd features run_dir={run_dir} step={step}` first"
        )
    return p


def summary(run_dir: str | Path, step: int, sae: str) -> dict:
    """The SAE's feature summary: dead and ultra-low-density counts, the cluster flag, token features."""
    return load_index(features_dir(run_dir, step, sae))["summary"]


def feature(run_dir: str | Path, step: int, sae: str, feature_id: int, text: bool = True) -> dict:
    """One feature's statistics, contexts (token text included when ``text``) and logit effects."""
    folder = features_dir(run_dir, step, sae)
    n = load_index(folder)["d_sae"]
    if not 0 <= feature_id < n:
        raise MissingArtifactError(f"feature {feature_id} is out of range: {sae} has {n} features")
    rec, tok = load_record(folder, feature_id)
    rec = dict(rec)
    if text:
        for key in ("top", "samples"):
            rec[key] = [{**c, "tokens": [tok.get(str(i), f"#{i}") for i in c["ids"]]} for c in rec[key]]
        for key in ("logits_pos", "logits_neg"):
            rec[key] = [(tok.get(str(i), f"#{i}"), v) for i, v in rec[key]]
    return rec


class FeatureNotes(Mapping):
    """{feature id: {"label", "density", "contexts"}} for the live features (those with a top context) of a
    dashboard folder; a feature's shard is read when that feature is looked up."""

    def __init__(self, folder: Path):
        self.folder = folder
        idx = load_index(folder)
        self.ids = [i for i, lab in enumerate(idx["label"]) if lab >= 0]
        self._live = set(self.ids)

    def __getitem__(self, f) -> dict:
        try:
            f = operator.index(f)  # ints, numpy and torch integers
        except TypeError:
            raise KeyError(f) from None
        if f not in self._live:
            raise KeyError(f)
        rec, tokens = load_record(self.folder, f)
        contexts = []
        for c in rec["top"][:3]:
            words = [tokens.get(str(i), f"#{i}") for i in c["ids"]]
            words[c["at"]] = "[" + words[c["at"]] + "]"
            contexts.append("".join(words))
        top = rec["top"][0]
        label = tokens.get(str(top["ids"][top["at"]]), "")
        return {"label": label, "density": float(rec["density"]), "contexts": contexts}

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def feature_notes(sae_dir: Path) -> Mapping[int, dict]:
    """What a circuit shows of each live feature of ``features/step<N>/<sae>/`` (empty when the features stage
    has not run there): its label (the top context's activating token), density and top 3 contexts as text,
    the activating token in brackets. A mapping that reads a feature's shard when it is looked up."""
    if not (Path(sae_dir) / "index.json").exists():
        return {}
    return FeatureNotes(Path(sae_dir))
