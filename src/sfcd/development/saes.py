"""The SAE files a development analysis reads (``saes/step<N>/<name>``) and the matching of their live features:
the floor under :mod:`sfcd.development.analysis` and :mod:`sfcd.development.findings`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sfcd.development.matching import Matching, match_decoders
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


def match_live(fa: Path, fb: Path, device=None) -> Matching:
    """Match the live features of two SAEs; the result is indexed by the SAEs' full feature indices (dead
    features: no match). Dead features never fired, so their decoder rows say nothing about what was learned."""
    la, lb = live(fa), live(fb)
    m = match_decoders(decoder(fa)[la], decoder(fb)[lb], device=device)
    n_a = decoder(fa).shape[0]
    match, sim = np.full(n_a, -1), np.zeros(n_a)
    ok = m.match >= 0
    match[la[ok]] = lb[m.match[ok]]
    sim[la] = m.sim
    best = np.zeros(n_a)
    best[la] = m.best
    r, c, v = m.candidates
    return Matching(match, sim, best[la] if len(la) else best, (la[r], lb[c], v))


def sae_folder(run: RunDir, step: int, name: str) -> Path:
    f = run.root / "saes" / f"step{step}" / name
    if not (f / "metrics.json").exists():
        raise MissingArtifactError(f"no SAE {name} at step {step} ({f}); run the study's sae stage for that step")
    return f
