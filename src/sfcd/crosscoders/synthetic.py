"""A synthetic checkpoint series with known features: the crosscoder's ground truth (tests and benchmarks).

Each planted feature has a direction per checkpoint and a lifetime. Kinds: ``persistent`` (present throughout),
``emerging`` (appears at a known checkpoint and stays), ``dying`` (present until a known checkpoint), ``rotating``
(present throughout while its direction turns slowly), and, for the whole lifecycle (K >= 8 recommended):
``transient`` (absent at the first and the last checkpoint, present in between), ``ramp`` (its norm grows over
several checkpoints, 0.12, 0.55, 0.8, 1, so it is present from the 0.55 step on under the 0.3 rule) and ``gap``
(present throughout except two checkpoints in the middle). A token's sparse code (which features fire, how
strongly) is the same at every checkpoint, as a token is the same text in every checkpoint's model; checkpoint m's
activation is ``sum_i c_i(x) g_i^m d_i^m`` over the features (``g`` the planted norm: 0 where absent), plus noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sfcd.crosscoders.model import Crosscoder
from sfcd.crosscoders.reading import decoder_stats

KINDS = ("persistent", "emerging", "dying", "rotating")
LIFECYCLE_KINDS = (*KINDS, "transient", "ramp", "gap")
RAMP = (0.12, 0.55, 0.8, 1.0)  # a ramp's norms from its start; present (>= 0.3 x its largest) from 0.55 on


@dataclass
class Truth:
    directions: np.ndarray  # [n, K, d], scaled by the planted norm, zero where absent
    present: np.ndarray  # [n, K] bool
    kind: list[str]
    emerged: np.ndarray  # [n]: first index present to the end (-1: absent at the last)
    died: np.ndarray  # [n]: first index absent after its last present one (-1: present at the last)
    onset: np.ndarray  # [n]: first index present
    offset: np.ndarray  # [n]: last present index + 1 (-1: present at the last); equals died
    transient: np.ndarray  # [n] bool: absent at the first and the last checkpoint
    gaps: np.ndarray  # [n]: absent checkpoints between two present ones


def lifecycle(present: np.ndarray) -> dict[str, np.ndarray]:
    """The lifecycle of each row of a presence matrix [n, K] (the rules of :func:`sfcd.crosscoders.reading.
    decoder_stats`, written out here in numpy)."""
    n, K = present.shape
    out = {k: np.full(n, -1) for k in ("emerged", "died", "onset", "offset", "gaps")}
    out["transient"] = np.zeros(n, dtype=bool)
    for i, p in enumerate(present):
        idx = np.flatnonzero(p)
        first, last = idx[0], idx[-1]
        out["onset"][i] = first
        out["offset"][i] = -1 if last == K - 1 else last + 1
        out["died"][i] = out["offset"][i]
        out["gaps"][i] = int((~p[first : last + 1]).sum())
        out["transient"][i] = not p[0] and not p[-1]
        if p[-1]:
            j = K - 1
            while j > 0 and p[j - 1]:
                j -= 1
            out["emerged"][i] = j
    return out


def plant_series(
    n_tokens: int = 65_536,
    K: int = 4,
    d: int = 48,
    per_kind: int = 16,
    p_fire: float = 0.04,
    rotation: float = 0.15,
    noise: float = 0.01,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
) -> tuple[np.ndarray, Truth]:
    """``x`` [n_tokens, K*d] float32 and the planted :class:`Truth`, ``per_kind`` features of each of ``kinds``.
    Emerging features appear at checkpoints 1..K-1, dying ones die at 1..K-1 (spread evenly); rotating ones turn by
    ``rotation`` radians per checkpoint; transients live over one to three middle checkpoints, ramps start at
    0..K-4, gaps miss two middle checkpoints (spread evenly)."""
    unknown = [k for k in kinds if k not in LIFECYCLE_KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; expected some of {LIFECYCLE_KINDS}")
    if K < 2 or (set(kinds) & {"transient", "gap"} and K < 4) or ("ramp" in kinds and len(RAMP) > K):
        raise ValueError(f"K={K} is too few checkpoints for kinds {kinds}")
    rng = np.random.default_rng(seed)
    n = per_kind * len(kinds)
    base = rng.standard_normal((n, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    other = rng.standard_normal((n, d))
    other -= (other * base).sum(1, keepdims=True) * base
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    dirs = np.repeat(base[:, None, :], K, axis=1)
    gain = np.ones((n, K))
    kind = []
    for i in range(n):
        kd = kinds[i // per_kind]
        kind.append(kd)
        j = i % per_kind
        if kd == "emerging":
            gain[i, : 1 + j % (K - 1)] = 0
        elif kd == "dying":
            gain[i, 1 + j % (K - 1) :] = 0
        elif kd == "rotating":
            for m in range(K):
                dirs[i, m] = math.cos(rotation * m) * base[i] + math.sin(rotation * m) * other[i]
        elif kd == "transient":
            a = 1 + j % (K - 2)
            b = min(K - 2, a + j % 3)  # one to three checkpoints, none at either end
            gain[i] = 0
            gain[i, a : b + 1] = 1
        elif kd == "ramp":
            a = j % (K - len(RAMP) + 1)
            gain[i, :a] = 0
            gain[i, a : a + len(RAMP)] = RAMP
        elif kd == "gap":
            a = 1 + j % (K - 3)
            gain[i, a : a + 2] = 0
    present = gain >= 0.3 * gain.max(1, keepdims=True)
    dirs = dirs * gain[..., None]
    fires = rng.random((n_tokens, n)) < p_fire
    mags = rng.uniform(0.5, 2.0, (n_tokens, n)) * fires
    x = np.einsum("tn,nkd->tkd", mags, dirs) + noise * rng.standard_normal((n_tokens, K, d))
    life = lifecycle(present)
    truth = Truth(dirs.astype(np.float32), present, kind, **life)
    return x.reshape(n_tokens, K * d).astype(np.float32), truth


@torch.no_grad()
def recovery(cc: Crosscoder, truth: Truth, presence: float = 0.3) -> dict:
    """Per planted feature the latent whose decoder directions best match it (mean cosine over the checkpoints
    where it is present); the mean of those best cosines, the share of features whose latent's emergence (and
    death) index is the planted one, and per kind the share whose latent has the planted onset, offset, transient
    flag and gap count (``lifecycle_by_kind``: each, and all four at once)."""
    K, d = cc.n_blocks, cc.d
    W = cc.W_dec.float().cpu().view(cc.d_sae, K, d)
    unit = W / W.norm(dim=2, keepdim=True).clamp_min(1e-12)
    D = torch.from_numpy(truth.directions)
    D = D / D.norm(dim=2, keepdim=True).clamp_min(1e-12)
    pres = torch.from_numpy(truth.present).float()
    cos = torch.einsum("ikd,jkd->ijk", D, unit)  # [n, m, K]; zero where absent
    mean_cos = (cos * pres[:, None]).sum(2) / pres.sum(1)[:, None]
    best_cos, best = mean_cos.max(1)
    stats = decoder_stats(cc, presence)
    em_ok = stats["emerged"][best].numpy() == truth.emerged
    died_ok = stats["died"][best].numpy() == truth.died
    exact = em_ok & died_ok
    checks = {
        "onset": stats["onset"][best].numpy() == truth.onset,
        "offset": stats["offset"][best].numpy() == truth.offset,
        "transient": stats["transient"][best].numpy() == truth.transient,
        "gaps": stats["gaps"][best].numpy() == truth.gaps,
    }
    checks["all"] = checks["onset"] & checks["offset"] & checks["transient"] & checks["gaps"]
    kinds = list(dict.fromkeys(truth.kind))
    rows = {k: np.array([kk == k for kk in truth.kind]) for k in kinds}
    return {
        "mean_max_cos": float(best_cos.mean()),
        "min_max_cos": float(best_cos.min()),
        "emergence_exact": float(exact.mean()),
        "emergence_exact_by_kind": {k: float(np.mean(exact[r])) for k, r in rows.items()},
        "lifecycle_by_kind": {k: {c: float(np.mean(v[r])) for c, v in checks.items()} for k, r in rows.items()},
        "lifecycle_exact": float(checks["all"].mean()),
        "latent_of_feature": best.tolist(),
    }
