"""Feature data for notebooks: ``sfcd.features.api.feature(run_dir, step, sae, id)``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sfcd.errors import MissingArtifactError
from sfcd.io import read_json


@lru_cache(maxsize=8)
def _load(path: str) -> dict:
    return read_json(path)


def features_file(run_dir: str | Path, step: int, sae: str) -> Path:
    p = Path(run_dir) / "features" / f"step{step}" / sae / "features.json"
    if not p.exists():
        raise MissingArtifactError(f"{p} does not exist; run `sfcd features run_dir={run_dir} step={step}` first")
    return p


def summary(run_dir: str | Path, step: int, sae: str) -> dict:
    """The SAE's feature summary: dead and ultra-low-density counts, the cluster flag, token features."""
    return _load(str(features_file(run_dir, step, sae)))["summary"]


def feature(run_dir: str | Path, step: int, sae: str, feature_id: int, text: bool = True) -> dict:
    """One feature's statistics, contexts (token text included when ``text``) and logit effects."""
    data = _load(str(features_file(run_dir, step, sae)))
    feats = data["features"]
    if not 0 <= feature_id < len(feats):
        raise MissingArtifactError(f"feature {feature_id} is out of range: {sae} has {len(feats)} features")
    rec = dict(feats[feature_id])
    if text:
        tok = data["tokens"]
        for key in ("top", "samples"):
            rec[key] = [{**c, "tokens": [tok.get(str(i), f"#{i}") for i in c["ids"]]} for c in rec[key]]
        for key in ("logits_pos", "logits_neg"):
            rec[key] = [(tok.get(str(i), f"#{i}"), v) for i, v in rec[key]]
    return rec


def feature_notes(sae_dir: Path) -> dict[int, dict]:
    """What a circuit shows of each live feature of ``features/step<N>/<sae>/`` (empty when the features stage
    has not run there): its label (the top context's activating token), density and top 3 contexts as text,
    the activating token in brackets."""
    path = sae_dir / "features.json"
    if not path.exists():
        return {}
    data = read_json(path)
    tokens, out = data["tokens"], {}
    for f in data["features"]:
        if not f["top"]:
            continue
        contexts = []
        for c in f["top"][:3]:
            words = [tokens.get(str(i), f"#{i}") for i in c["ids"]]
            words[c["at"]] = "[" + words[c["at"]] + "]"
            contexts.append("".join(words))
        top = f["top"][0]
        label = tokens.get(str(top["ids"][top["at"]]), "")
        out[f["id"]] = {"label": label, "density": float(f["density"]), "contexts": contexts}
    return out
