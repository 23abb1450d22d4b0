"""Scoring a study against a planted construction (sfcd/data/planted.py): which dictionary features are the
construction's, at which studied checkpoint they first appear, and whether its circuit appears there too.

A feature (an SAE's or a crosscoder's latent) is the construction's when its activation is concentrated on the
construction's own words: ``precision`` (its activation mass on those tokens over its whole mass) and ``recall``
(the share of those tokens' positions where it fires) are both above thresholds; it is a feature of the
construction, not of one token: it fires on at least ``WORDS`` of its words, each at ``WORD_RECALL`` of their
occurrences; it reads the construction's structure: the words it fires on are whole classes of the ones the
construction gives them (noun or verb, singular or plural: :func:`sfcd.data.planted.word_classes`), at least half
of every class it fires on, and not all of the classes; and those words share a direction in the model there
(``coherence``: the mean cosine between their mean activations, less the mean over all positions, >= ``COHERENCE``).

The last three rules are what keep a checkpoint before the planted step clean. There the construction's words
are tokens the model never saw, whose embeddings are still their random initialisation: a dictionary that meets
them may spend a latent on one of them (a token latent of an untrained embedding), on all of them alike (after the
first layer, untrained embeddings are one kind of input, a "never-seen token": measured at resid.0 and resid.1
before the step, one latent on all 14 planted words, nouns and verbs of both numbers), on two of them that happen
to lie close (random embeddings in a narrow model: a plural noun and a singular one, a noun and a verb), or, in a
crosscoder, on words of their classes whose random embeddings its encoder block for that checkpoint learned to
recognise from what the later checkpoints give the latent (tests/development/test_planted_stages.py, without
coherence). None of these needs the model to have learned anything about the construction; what training on it
teaches is the roles and the number the verb agrees with (latents on its nouns only, on its plural nouns, on its
verbs, whose words share a direction). All sums are streamed over held-out windows one batch at a time, on the
model's device (memory: a few d_sae vectors and a few vectors of the activations' width per word).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from sfcd.errors import ConfigError
from sfcd.io import read_json
from sfcd.models.sites import parse_site, run_with_cache
from sfcd.paths import RunDir

#: a feature is a construction's when both hold (see the module docstring)
PRECISION = 0.5
RECALL = 0.05
WORDS = 2
WORD_RECALL = 0.2
COHERENCE = 0.5


def planted_meta(run: RunDir) -> dict:
    """The corpus's planted construction (step, words, token ids); an error when the corpus plants none."""
    meta = read_json(run.corpus_meta) if run.corpus_meta.exists() else {}
    if "planted" not in meta:
        raise ConfigError(
            f"the corpus of {run.root} plants no construction; build it with corpus.planted.step=<S> in another run_dir"
        )
    return meta["planted"]


def planted_classes(kinds) -> dict[str, list[str]]:
    """The word classes (:func:`sfcd.data.planted.word_classes`) of each planted kind, in its token ids' order."""
    from sfcd.data.planted import word_classes

    return {k: word_classes(k) for k in kinds}


def held_out_windows(tokens: np.ndarray, seq_len: int, n_tokens: int) -> np.ndarray:
    n = min(len(tokens) // seq_len, max(1, n_tokens // seq_len))
    return np.asarray(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


class Concentration:
    """Per-feature sums over streamed batches: activation mass overall and on each construction's tokens, and
    firings on each construction's tokens."""

    def __init__(self, kinds: dict[str, list[int]], device, classes: dict[str, list[str]] | None = None):
        self.ids = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in kinds.items()}
        # each word's class (its role and number); a kind without classes has one class, so no feature of it
        # can leave one out: the structure rule is then off
        self.classes = {k: list((classes or {}).get(k) or []) for k in kinds}
        for k, c in self.classes.items():
            if c and len(c) != len(kinds[k]):
                raise ValueError(f"{len(c)} word classes for the {len(kinds[k])} words of {k!r}")
        self.mass: torch.Tensor | None = None
        self.mass_on: dict[str, torch.Tensor] = {}
        self.fires_on: dict[str, torch.Tensor] = {}
        self.n_on = dict.fromkeys(kinds, 0)
        self.n = 0
        # per word: firings [n_words, d_sae] and occurrences, for the coverage rule
        self.word_fires: dict[str, torch.Tensor] = {}
        self.word_n = {k: torch.zeros(len(v), dtype=torch.float64, device=device) for k, v in kinds.items()}
        # per word: the sum of the model's activations at its positions, and over all positions (coherence)
        self.word_act: dict[str, torch.Tensor] = {}
        self.act_sum: torch.Tensor | None = None

    def add(self, f: torch.Tensor, token_ids: torch.Tensor, a: torch.Tensor | None = None) -> None:
        """``f`` [n, d_sae] feature activations at positions whose tokens are ``token_ids`` [n]; ``a`` [n, d] the
        model's activations there (what the dictionary encoded), for :meth:`coherence`."""
        if a is not None:  # float64 sums; only the construction's positions are copied (not the whole batch)
            if self.act_sum is None:
                z = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
                self.act_sum = z
                self.word_act = {k: z.expand(len(v), -1).clone() for k, v in self.ids.items()}
            self.act_sum += a.sum(0, dtype=torch.float64)
            for k, ids in self.ids.items():
                on = torch.isin(token_ids, ids)
                onehot = (token_ids[on, None] == ids[None, :]).to(torch.float64)
                self.word_act[k] += onehot.T @ a[on].to(torch.float64)
        f = f.float().clamp_min(0)
        if self.mass is None:
            z = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.mass = z.clone()
            self.mass_on = {k: z.clone() for k in self.ids}
            self.fires_on = {k: z.clone() for k in self.ids}
            self.word_fires = {
                k: torch.zeros(len(v), f.shape[1], dtype=torch.float64, device=f.device) for k, v in self.ids.items()
            }
        self.mass += f.sum(0, dtype=torch.float64)
        self.n += len(f)
        for k, ids in self.ids.items():
            on = torch.isin(token_ids, ids)
            self.mass_on[k] += f[on].sum(0, dtype=torch.float64)
            self.fires_on[k] += (f[on] > 0).sum(0, dtype=torch.float64)
            self.n_on[k] += int(on.sum())
            onehot = (token_ids[on, None] == ids[None, :]).to(torch.float64)  # [n_on, n_words]
            self.word_fires[k] += onehot.T @ (f[on] > 0).to(torch.float64)
            self.word_n[k] += onehot.sum(0)

    def scores(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) of every feature for ``kind``'s tokens."""
        precision = (self.mass_on[kind] / self.mass.clamp_min(1e-12)).cpu().numpy()
        recall = (self.fires_on[kind] / max(1, self.n_on[kind])).cpu().numpy()
        return precision, recall

    def _fires(self, kind: str, word_recall: float) -> torch.Tensor:
        """[n_words, d_sae]: whether each feature fires on each of ``kind``'s words at ``word_recall`` of their
        occurrences (a word never seen counts for none)."""
        rate = self.word_fires[kind] / self.word_n[kind].clamp_min(1)[:, None]
        return (rate >= word_recall) & (self.word_n[kind] > 0)[:, None]

    def words(self, kind: str, word_recall: float = WORD_RECALL) -> np.ndarray:
        """How many of ``kind``'s words each feature fires on at ``word_recall`` of their occurrences (or more)."""
        return self._fires(kind, word_recall).sum(0).cpu().numpy()

    def structured(self, kind: str, word_recall: float = WORD_RECALL) -> np.ndarray:
        """Per feature: its words (those it fires on at ``word_recall``) follow ``kind``'s word classes: in every
        class it fires on, at least half of that class's words, and at least one class left out entirely (always
        True for a kind without classes)."""
        fires = self._fires(kind, word_recall).cpu().numpy()
        labels = self.classes[kind]
        if not labels:
            return np.ones(fires.shape[1], dtype=bool)
        ok = np.ones(fires.shape[1], dtype=bool)
        left_out = np.zeros(fires.shape[1], dtype=bool)
        for cls in dict.fromkeys(labels):
            hits = fires[[i for i, c in enumerate(labels) if c == cls]].sum(0)
            size = labels.count(cls)
            left_out |= hits == 0
            ok &= (hits == 0) | (2 * hits >= size)
        return ok & left_out

    def coherence(self, kind: str, word_recall: float = WORD_RECALL) -> np.ndarray:
        """Per feature: the mean cosine between the words it fires on, each word as the model's mean activation at
        its positions less the mean over all positions (NaN below two words; all NaN without activations). Words
        the model has learned as one kind share a direction; untrained embeddings are random directions."""
        fires = self._fires(kind, word_recall).to(torch.float64)
        if self.act_sum is None:
            return np.full(fires.shape[1], np.nan)
        means = self.word_act[kind] / self.word_n[kind].clamp_min(1)[:, None] - self.act_sum / max(1, self.n)
        u = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = u @ u.T  # [n_words, n_words]
        n = fires.sum(0)
        pairs = ((cos @ fires) * fires).sum(0) - n  # sum over ordered pairs of distinct words
        out = pairs / (n * (n - 1)).clamp_min(1)
        return torch.where(n >= 2, out, torch.nan).cpu().numpy()

    def coherent(self, kind: str) -> np.ndarray:
        """Per feature: :meth:`coherence` >= ``COHERENCE`` (all True when no activations were summed)."""
        if self.act_sum is None:
            return np.ones(len(self.mass), dtype=bool)
        return np.nan_to_num(self.coherence(kind), nan=-1.0) >= COHERENCE

    def concentrated(
        self, kind: str, precision: float = PRECISION, recall: float = RECALL, words: int = WORDS
    ) -> np.ndarray:
        """Per feature: precision and recall above the thresholds, on ``words`` of ``kind``'s words."""
        p, r = self.scores(kind)
        return (p >= precision) & (r >= recall) & (self.words(kind) >= words)

    def features(
        self, kind: str, precision: float = PRECISION, recall: float = RECALL, words: int = WORDS
    ) -> list[int]:
        """The construction's features: :meth:`concentrated`, following its word classes (:meth:`structured`), and
        on words that share a direction (:meth:`coherent`)."""
        keep = self.concentrated(kind, precision, recall, words) & self.structured(kind) & self.coherent(kind)
        return [int(i) for i in np.nonzero(keep)[0]]

    def summary(self, kind: str) -> dict:
        p, r = self.scores(kind)
        feats = self.features(kind)
        best = int(np.argmax(p * r)) if len(p) else -1
        several, structured = self.concentrated(kind), self.structured(kind)
        return {
            "features": feats,
            "n_features": len(feats),
            "best_feature": best,
            "best_precision": float(p[best]) if best >= 0 else 0.0,
            "best_recall": float(r[best]) if best >= 0 else 0.0,
            "best_words": int(self.words(kind)[best]) if best >= 0 else 0,
            "token_features": int(((p >= PRECISION) & (r >= RECALL)).sum()),  # the precision rule alone
            # concentrated on several words, but on every class of them alike (a never-seen token)
            "unstructured_features": int((several & ~structured).sum()),
            # ... following their classes, but on words that share no direction in the model (random embeddings)
            "incoherent_features": int((several & structured & ~self.coherent(kind)).sum()),
            "tokens": self.n_on[kind],
        }


def stream(
    models: list, site: str, windows: np.ndarray, exclude: Iterable[int], batch: int = 32
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(activations, token ids) per batch of windows: each model's activations at ``site`` at the same positions,
    concatenated along the last axis (one model: an SAE's input; K checkpoints: a crosscoder's), the positions of
    ``exclude`` (BOS/EOS) left out as the SAEs' training leaves them out."""
    device = next(models[0].parameters()).device
    excl = torch.tensor(sorted(exclude), dtype=torch.long, device=device)
    s = parse_site(site, models[0])
    with torch.no_grad():
        for b in range(0, len(windows), batch):
            x = torch.from_numpy(windows[b : b + batch]).to(device)
            acts = [run_with_cache(m, x, [s])[s.name].flatten(0, 1).float() for m in models]
            keep = ~torch.isin(x.flatten(), excl)
            yield torch.cat(acts, -1)[keep], x.flatten()[keep]


def concentration(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    kinds: dict[str, list[int]],
    classes: dict[str, list[str]] | None = None,
) -> Concentration:
    """Stream ``batches`` through ``encode`` and accumulate each feature's concentration on ``kinds``' tokens
    (``classes``: each word's class, in the order of ``kinds``; see :class:`Concentration`)."""
    acc = None
    with torch.no_grad():
        for a, ids in batches:
            if acc is None:
                acc = Concentration(kinds, a.device, classes)
            acc.add(encode(a), ids, a)
    if acc is None:
        raise ConfigError("no held-out tokens to score the planted construction on; raise corpus.val_tokens")
    return acc


def onset(steps: list[int], present: list[bool]) -> int | None:
    """The first studied step from which something is present at every later studied step (None: never)."""
    for i, s in enumerate(steps):
        if all(present[i:]):
            return s
    return None


def first_after(steps: list[int], planted_step: int) -> int | None:
    """The first studied checkpoint that has seen the planted construction: checkpoint N is after N optimizer
    steps, i.e. the batches of steps 0..N-1, so the first N > S."""
    return next((s for s in steps if s > planted_step), None)
