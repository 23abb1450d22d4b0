"""The SAE files a development analysis reads (``saes/step<N>/<name>``) and the matching of their live features:
the floor under :mod:`sfcd.development.analysis` and :mod:`sfcd.development.findings`.

A feature takes part in matching when it is live: by decoder cosine, when it fired on the SAE's evaluation tokens
(``sparsity.safetensors``); by activation correlation, when it fired at least ``min_fires`` times on the
signatures' token sample (a feature seen less often has no correlation to speak of)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sfcd.development.matching import Features, Matching, match_features, unit_rows
from sfcd.development.signatures import Signatures
from sfcd.errors import MissingArtifactError
from sfcd.paths import RunDir


def decoder(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "sae_weights.safetensors"))["W_dec"]


def live(folder: Path) -> np.ndarray:
    """Indices of the features that fired on the SAE's evaluation tokens (all, when no density was saved)."""
    p = folder / "sparsity.safetensors"
    if not p.exists():
        return np.arange(decoder(folder).shape[0])
    return np.nonzero(load_file(str(p))["sparsity"].numpy() > -9.99)[0]  # log10(density + 1e-10) > -10


@dataclass
class LiveFeatures:
    """The live features of one SAE: their indices among its ``n`` features, and their rows for matching (unit
    decoder rows [len(idx), d], or activation signatures)."""

    idx: np.ndarray
    rows: Features
    n: int


#: the fewest firings on the signatures' sample for a feature to be matched by activation correlation
MIN_FIRES = 5


def live_features(folder: Path, signatures: Signatures | None = None, min_fires: int = MIN_FIRES) -> LiveFeatures:
    """The SAE's live features, as decoder rows, or (``signatures``: its features' signatures on a token sample)
    as the signatures of the features that fired at least ``min_fires`` times there."""
    if signatures is None:
        idx = live(folder)
        return LiveFeatures(idx, unit_rows(decoder(folder)[idx].float()), int(decoder(folder).shape[0]))
    idx = np.nonzero(signatures.fires.cpu().numpy() >= min_fires)[0]
    return LiveFeatures(idx, signatures.select(idx), len(signatures))


def match_sets(a: LiveFeatures, b: LiveFeatures, device=None) -> Matching:
    """Match A's live features to B's; the result is indexed by A's full feature indices (a feature that is not
    live: no match, similarity 0) and names B's features by their full indices."""
    m = match_features(a.rows.to(device), b.rows) if device is not None else match_features(a.rows, b.rows)
    la, lb = a.idx, b.idx
    match, sim = np.full(a.n, -1), np.zeros(a.n)
    ok = m.match >= 0
    match[la[ok]] = lb[m.match[ok]]
    sim[la] = m.sim
    best = np.zeros(a.n)
    best[la] = m.best
    r, c, v = m.candidates
    return Matching(match, sim, best[la] if len(la) else best, (la[r], lb[c], v))


def match_live(fa: Path, fb: Path, device=None) -> Matching:
    """Match the live features of two SAEs by decoder cosine (see :func:`match_sets`). Dead features never
    fired, so their decoder rows say nothing about what was learned."""
    return match_sets(live_features(fa), live_features(fb), device)


def sae_folder(run: RunDir, step: int, name: str) -> Path:
    f = run.root / "saes" / f"step{step}" / name
    if not (f / "metrics.json").exists():
        raise MissingArtifactError(f"no SAE {name} at step {step} ({f}); run the study's sae stage for that step")
    return f
