"""Feature lineage over a chain of checkpoints (one site): for each feature of the last SAE, the step it first
appears and whether it persisted; births, deaths, splits and merges per step, raw and beyond the noise floor.

Raw counts (:func:`lineage`) compare one SAE per checkpoint with the next; two SAEs of the *same* activations
(two seeds) already differ by some of those counts, so raw counts mix development with the SAEs' own variance.

The noise floor (:func:`floor`): at each studied checkpoint, the same statistics between its two SAEs (the main
one and the seed baseline, ``<site>@seed=<s>``) as if they were two steps, with a 95% interval over features
(the bootstrap over features of a count of features is Binomial(n, count / n); its quantiles are used exactly).

Changes beyond the floor (:func:`beyond_floor`), per feature, with A/B the two seeds of a checkpoint and "present
in an SAE" meaning that some live feature of it has similarity >= threshold with the feature (decoder cosine, or
the correlation of their activation signatures: :mod:`sfcd.development.matching`):
- a feature of A at step k+1 is **born** when it is present in B at k+1 (reproducible: both seeds learned it) and
  present in neither A nor B at step k;
- a feature of A at step k **dies** at k+1 when it is present in B at k and in neither SAE at k+1;
- a feature of A at step k **splits** at k+1 when it is reproducible at k, not already split in its own
  checkpoint (fewer than 2 partners in B at k), and has >= 2 partners in both A and B at k+1;
- a feature of A at step k+1 is a **merge** symmetrically (reproducible at k+1, < 2 partners in B at k+1, >= 2
  partners in both SAEs at step k).
A feature only one seed learned, or one that one seed of a step misses, is seed variance and never counts.
With two seeds a step the rule can still be fooled (a feature both seeds of k+1 learned and both of k missed);
``beyond_floor(..., null=True)`` gives the rule's own null, the seeds paired across the steps.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from sfcd.development.matching import SHARED, Matching, Presence, presence


@dataclass
class StepChange:
    step: int
    births: int  # features here with no match >= threshold in the previous SAE
    deaths: int  # features of the previous SAE with no match >= threshold here
    splits: int  # previous features with >= 2 features here above threshold
    merges: int  # features here with >= 2 previous features above threshold
    shared_fraction: float  # of the previous SAE's features, matched one-to-one here at >= threshold
    mmcs: float


def lineage(steps: list[int], matchings: list[Matching], sizes: list[int], threshold: float = SHARED):
    """``matchings[k]`` matches the SAE at ``steps[k+1]`` (as A) to the one at ``steps[k]`` (as B); ``sizes`` are
    the numbers of features that count at each step (e.g. the live ones) for births, deaths and shares.

    Returns (per-step changes, first_step [F_last], persisted [F_last]): a feature of the last SAE first appears
    at the earliest step from which an unbroken chain of one-to-one matches >= threshold reaches it; it
    persisted if that chain starts at the first step."""
    if len(matchings) != len(steps) - 1:
        raise ValueError("one matching per pair of adjacent steps")
    changes = []
    for k, m in enumerate(matchings):
        r, c = m.above(threshold)  # r: features at steps[k+1], c: features at steps[k]
        ok = m.sim >= threshold
        back = Counter(r.tolist())
        fwd = Counter(c.tolist())
        changes.append(
            StepChange(
                step=steps[k + 1],
                births=int(sizes[k + 1] - len(set(r.tolist()))),
                deaths=int(sizes[k] - len(set(c.tolist()))),
                splits=sum(1 for v in fwd.values() if v >= 2),
                merges=sum(1 for v in back.values() if v >= 2),
                shared_fraction=float(ok.sum() / sizes[k]),
                mmcs=m.mmcs,
            )
        )
    n_last = len(matchings[-1].match) if matchings else sizes[-1]  # indexed like the last SAE's features
    first = np.full(n_last, steps[-1])
    current = np.arange(n_last)  # the ancestor of each last feature at the step being looked at
    alive = np.ones(n_last, dtype=bool)
    for k in range(len(matchings) - 1, -1, -1):
        m = matchings[k]
        idx = np.where(alive)[0]
        prev = m.match[current[idx]]
        good = (prev >= 0) & (m.sim[current[idx]] >= threshold)
        alive[idx[~good]] = False
        current[idx[good]] = prev[good]
        first[idx[good]] = steps[k]
    persisted = first == steps[0]
    return changes, first, persisted


FLOOR_STATS = ("births", "deaths", "splits", "merges", "shared")


def interval(count: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The bootstrap-over-features interval of a count of ``count`` features among ``n``: resampling n features
    with replacement makes the count Binomial(n, count / n), whose quantiles are exact (no random draws)."""
    if n == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    return (float(binom.ppf(a, n, count / n)), float(binom.ppf(1 - a, n, count / n)))


def floor(
    a: torch.Tensor,
    b: torch.Tensor,
    match_sim: np.ndarray,
    threshold: float = SHARED,
    device=None,
    within: Presence | None = None,
) -> dict:
    """The noise floor at one checkpoint: its two SAEs' live decoder rows ``a`` (the main SAE, read as the later
    step) and ``b`` (the seed baseline, as the earlier one), compared as :func:`lineage` compares two steps.
    ``match_sim``: the one-to-one matching's similarity of each row of ``a`` (for the shared fraction).
    Returns each statistic, its interval (``<stat>_lo``, ``<stat>_hi``) and the sizes. ``within``: the
    :func:`presence` of ``a`` in ``b``, when already computed."""
    p = within if within is not None else presence(a, b, threshold, device)
    n_a, n_b = len(a), len(b)
    counts = {
        "births": (int((p.best_a < threshold).sum()), n_a),
        "deaths": (int((p.best_b < threshold).sum()), n_b),
        "splits": (int((p.count_b >= 2).sum()), n_b),
        "merges": (int((p.count_a >= 2).sum()), n_a),
        "shared": (int((np.asarray(match_sim) >= threshold).sum()), n_a),
    }
    out: dict = {"n_a": n_a, "n_b": n_b}
    for k, (c, n) in counts.items():
        lo, hi = interval(c, n)
        if k == "shared":  # a fraction of the main SAE's live features, as seed_baseline
            c, lo, hi = (x / n if n else float("nan") for x in (c, lo, hi))
        out[k], out[f"{k}_lo"], out[f"{k}_hi"] = c, lo, hi
    return out


def band(floors: list[dict]) -> dict:
    """The floor over a site's studied steps as one band per statistic: [lowest lower bound, highest upper
    bound], and the range of the point values."""
    out = {}
    for k in FLOOR_STATS:
        vals = [f for f in floors if f is not None]
        if not vals:
            continue
        out[k] = {
            "lo": min(f[f"{k}_lo"] for f in vals),
            "hi": max(f[f"{k}_hi"] for f in vals),
            "min": min(f[k] for f in vals),
            "max": max(f[k] for f in vals),
        }
    return out


def beyond_floor(
    a0: torch.Tensor,
    b0: torch.Tensor,
    a1: torch.Tensor,
    b1: torch.Tensor,
    threshold: float = SHARED,
    device=None,
    within: tuple[Presence, Presence] | None = None,
    null: bool = False,
) -> dict:
    """Changes from step k to k+1 beyond the seed noise (see the module docstring): ``a0``/``b0`` the live
    decoder rows of the main SAE and the seed baseline at step k, ``a1``/``b1`` at step k+1; ``within``: the
    :func:`presence` of a0 in b0 and of a1 in b1 when already computed (the floor's). Returns the row indices
    (into ``a1`` for births and merges, into ``a0`` for deaths and splits).

    ``null=True`` also returns ``"null"``: the same counts with the seeds paired across the steps ((a0, a1) read
    as one step and (b0, b1) as the other, and the three other such pairings). Under no development the four
    SAEs are exchangeable, so each pairing is a draw of what the rule counts from seed variance alone; a real
    change (in both seeds of one step, in neither of the other) is in both "steps" of a crossed pairing and
    drops out. ``null`` maps each statistic to its four counts."""
    names = {"a0": a0, "b0": b0, "a1": a1, "b1": b1}
    pres: dict[tuple[str, str], Presence] = {}
    if within is not None:
        pres[("a0", "b0")], pres[("a1", "b1")] = within

    def look(u: str, v: str) -> tuple[np.ndarray, np.ndarray]:
        """(best cosine, partners >= threshold) of u's rows in v."""
        if (u, v) in pres:
            p = pres[(u, v)]
            return p.best_a, p.count_a
        if (v, u) in pres:
            p = pres[(v, u)]
            return p.best_b, p.count_b
        pres[(u, v)] = presence(names[u], names[v], threshold, device)
        return look(u, v)

    t = threshold

    def rule(x0: str, y0: str, x1: str, y1: str) -> dict[str, np.ndarray]:
        x1y1, x1x0, x1y0 = look(x1, y1), look(x1, x0), look(x1, y0)
        x0y0, x0x1, x0y1 = look(x0, y0), look(x0, x1), look(x0, y1)
        born = (x1y1[0] >= t) & (x1x0[0] < t) & (x1y0[0] < t)
        died = (x0y0[0] >= t) & (x0x1[0] < t) & (x0y1[0] < t)
        split = (x0y0[0] >= t) & (x0y0[1] < 2) & (x0x1[1] >= 2) & (x0y1[1] >= 2)
        merge = (x1y1[0] >= t) & (x1y1[1] < 2) & (x1x0[1] >= 2) & (x1y0[1] >= 2)
        return {
            k: np.nonzero(v)[0] for k, v in {"births": born, "deaths": died, "splits": split, "merges": merge}.items()
        }

    out: dict = rule("a0", "b0", "a1", "b1")
    if null:
        crossed = [
            rule("a0", "a1", "b0", "b1"),
            rule("a0", "b1", "b0", "a1"),
            rule("b0", "b1", "a0", "a1"),
            rule("b0", "a1", "a0", "b1"),
        ]
        out["null"] = {k: [int(len(c[k])) for c in crossed] for k in ("births", "deaths", "splits", "merges")}
    return out
