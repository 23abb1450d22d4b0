"""Feature lineage over a chain of checkpoints (one site): for each feature of the last SAE, the step it first
appears and whether it persisted; births, deaths, splits and merges per step."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from sfcd.development.matching import SHARED, Matching


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
