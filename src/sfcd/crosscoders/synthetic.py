"""A synthetic checkpoint series with known features: the crosscoder's ground truth (tests and benchmarks).

Each planted feature has a direction per checkpoint and a lifetime: present throughout, appearing at a known
checkpoint, dying after a known one, or present throughout while its direction rotates slowly. A token's sparse
code (which features fire, how strongly) is the same at every checkpoint, as a token is the same text in every
checkpoint's model; checkpoint m's activation is ``sum_i c_i(x) d_i^m`` over the features present at m, plus noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sfcd.crosscoders.model import Crosscoder
from sfcd.crosscoders.reading import decoder_stats

KINDS = ("persistent", "emerging", "dying", "rotating")


@dataclass
class Truth:
    directions: np.ndarray  # [n, K, d], zero where absent
    present: np.ndarray  # [n, K] bool
    kind: list[str]
    emerged: np.ndarray  # [n]: first index present to the end (-1: dies)
    died: np.ndarray  # [n]: first index absent after its life (-1: persists)


def plant_series(
    n_tokens: int = 65_536,
    K: int = 4,
    d: int = 48,
    per_kind: int = 16,
    p_fire: float = 0.04,
    rotation: float = 0.15,
    noise: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, Truth]:
    """``x`` [n_tokens, K*d] float32 and the planted :class:`Truth`. Emerging features appear at checkpoints
    1..K-1, dying ones die at 1..K-1 (spread evenly); rotating ones turn by ``rotation`` radians per checkpoint."""
    rng = np.random.default_rng(seed)
    n = per_kind * len(KINDS)
    base = rng.standard_normal((n, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    other = rng.standard_normal((n, d))
    other -= (other * base).sum(1, keepdims=True) * base
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    dirs = np.repeat(base[:, None, :], K, axis=1)
    present = np.ones((n, K), dtype=bool)
    kind, emerged, died = [], np.zeros(n, dtype=int), np.full(n, -1)
    for i in range(n):
        kd = KINDS[i // per_kind]
        kind.append(kd)
        j = i % per_kind
        if kd == "emerging":
            e = 1 + j % (K - 1)
            present[i, :e] = False
            emerged[i] = e
        elif kd == "dying":
            t = 1 + j % (K - 1)
            present[i, t:] = False
            emerged[i], died[i] = -1, t
        elif kd == "rotating":
            for m in range(K):
                dirs[i, m] = math.cos(rotation * m) * base[i] + math.sin(rotation * m) * other[i]
    dirs = dirs * present[..., None]
    fires = rng.random((n_tokens, n)) < p_fire
    mags = rng.uniform(0.5, 2.0, (n_tokens, n)) * fires
    x = np.einsum("tn,nkd->tkd", mags, dirs) + noise * rng.standard_normal((n_tokens, K, d))
    truth = Truth(dirs.astype(np.float32), present, kind, emerged, died)
    return x.reshape(n_tokens, K * d).astype(np.float32), truth


@torch.no_grad()
def recovery(cc: Crosscoder, truth: Truth, presence: float = 0.3) -> dict:
    """Per planted feature the latent whose decoder directions best match it (mean cosine over the checkpoints
    where it is present); the mean of those best cosines, and the share of features whose latent's emergence (and
    death) index is the planted one."""
    K, d = cc.n_blocks, cc.d
    W = cc.W_dec.float().cpu().view(cc.d_sae, K, d)
    unit = W / W.norm(dim=2, keepdim=True).clamp_min(1e-12)
    D = torch.from_numpy(truth.directions)
    pres = torch.from_numpy(truth.present).float()
    cos = torch.einsum("ikd,jkd->ijk", D, unit)  # [n, m, K]; zero where absent
    mean_cos = (cos * pres[:, None]).sum(2) / pres.sum(1)[:, None]
    best_cos, best = mean_cos.max(1)
    stats = decoder_stats(cc, presence)
    em_ok = stats["emerged"][best].numpy() == truth.emerged
    died_ok = stats["died"][best].numpy() == truth.died
    exact = em_ok & died_ok
    by_kind = {
        k: float(np.mean(exact[[i for i, kk in enumerate(truth.kind) if kk == k]])) for k in dict.fromkeys(truth.kind)
    }
    return {
        "mean_max_cos": float(best_cos.mean()),
        "min_max_cos": float(best_cos.min()),
        "emergence_exact": float(exact.mean()),
        "emergence_exact_by_kind": by_kind,
        "latent_of_feature": best.tolist(),
    }
