"""A seeded generator of English-like text with subject-verb agreement, and of the contrastive task pairs.

Sentence kinds (the main verb always agrees with the subject N):
``simple``  The N V C.                    ``pp``   The N P the N2 V C.
``orc``     The N that the N2 V2 V C.     ``src``  The N that V2 the N2 V C.
(V2 agrees with N2 in ``orc`` and with N in ``src``.) ``copy`` segments hold a random span of words
that repeats, which rewards in-context copying (induction).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from sfcd.data import vocab as V

SENTENCE_KINDS = ("simple", "pp", "orc", "src")
TASKS = ("simple", "nounpp", "rc", "within_rc")
NUMBERS = ("singular", "plural")


@dataclass(frozen=True)
class Sentence:
    """A generated sentence with what it agrees on: ``subject_number`` governs ``verb``."""

    text: str
    kind: str
    subject_number: str
    verb: str


def _pick(pair: tuple[str, str], number: str) -> str:
    return pair[0] if number == "singular" else pair[1]


def _num(rng: random.Random) -> str:
    return rng.choice(NUMBERS)


def _verb_phrase(rng: random.Random, number: str) -> tuple[str, str]:
    pair = rng.choice(V.ANSWER_VERBS if rng.random() < 0.7 else V.EXTRA_VERBS)
    verb = _pick(pair, number)
    return verb, f"{verb} {rng.choice(V.COMPLEMENTS[pair[0]])}"


def sentence(rng: random.Random, kind: str) -> Sentence:
    """One sentence of ``kind`` (one of :data:`SENTENCE_KINDS`)."""
    n = _num(rng)
    subj = _pick(rng.choice(V.SUBJECTS), n)
    if kind == "simple":
        head = f"The {subj}"
    elif kind == "pp":
        head = f"The {subj} {rng.choice(V.PREPOSITIONS)} the {_pick(rng.choice(V.PP_NOUNS), _num(rng))}"
    elif kind == "orc":
        n2 = _num(rng)
        head = f"The {subj} that the {_pick(rng.choice(V.RC_NOUNS), n2)} {_pick(rng.choice(V.RC_VERBS), n2)}"
    elif kind == "src":
        obj = _pick(rng.choice(V.RC_NOUNS), _num(rng))
        head = f"The {subj} that {_pick(rng.choice(V.RC_VERBS), n)} the {obj}"
    else:
        raise ValueError(f"unknown sentence kind {kind!r}; expected one of {SENTENCE_KINDS}")
    verb, vp = _verb_phrase(rng, n)
    return Sentence(f"{head} {vp}.", kind, n, verb)


def copy_span(rng: random.Random, length: int) -> str:
    """A span of ``length`` random corpus words, each with its leading space."""
    return "".join(" " + rng.choice(V.ALL_WORDS) for _ in range(length))


def documents(
    seed: int,
    mixture: dict[str, float],
    sentences_per_doc: tuple[int, int] = (1, 6),
    copy_len: tuple[int, int] = (6, 16),
) -> Iterator[str]:
    """An endless, deterministic stream of documents.

    ``mixture`` weighs the sentence kinds and ``copy`` (a repeated random span, which appears in a document
    as its own line: ``span span``). Lines are joined by newlines, so every sentence starts with ``The``.
    """
    unknown = set(mixture) - set(SENTENCE_KINDS) - {"copy"}
    if unknown:
        raise ValueError(f"unknown mixture keys {sorted(unknown)}; expected {list(SENTENCE_KINDS) + ['copy']}")
    kinds = [k for k, w in mixture.items() if w > 0]
    weights = [mixture[k] for k in kinds]
    if not kinds:
        raise ValueError("the corpus mixture has no positive weight")
    rng = random.Random(seed)
    while True:
        lines = []
        for _ in range(rng.randint(*sentences_per_doc)):
            kind = rng.choices(kinds, weights)[0]
            if kind == "copy":
                span = copy_span(rng, rng.randint(*copy_len)).lstrip()
                lines.append(f"{span} {span}")
            else:
                lines.append(sentence(rng, kind).text)
        yield "\n".join(lines)


# ---------------------------------------------------------------------------------------------- task pairs
def _pair(task: str, rng: random.Random) -> dict[str, str]:
    n1, n2 = _num(rng), _num(rng)
    flip = {"singular": "plural", "plural": "singular"}
    noun = rng.choice(V.SUBJECTS)
    if task == "within_rc":
        rc_noun, rc_verb = rng.choice(V.RC_NOUNS), rng.choice(V.RC_VERBS)
        s = _pick(noun, n1)
        clean = f"The {s} that the {_pick(rc_noun, n2)}"
        patch = f"The {s} that the {_pick(rc_noun, flip[n2])}"
        return dict(
            clean_prefix=clean,
            patch_prefix=patch,
            clean_answer=" " + _pick(rc_verb, n2),
            patch_answer=" " + _pick(rc_verb, flip[n2]),
            case=f"{n1}_{n2}",
        )
    answer = rng.choice(V.ANSWER_VERBS)
    if task == "simple":
        tail, case = "", n1
    elif task == "nounpp":
        tail, case = f" {rng.choice(V.PREPOSITIONS)} the {_pick(rng.choice(V.PP_NOUNS), n2)}", f"{n1}_{n2}"
    elif task == "rc":
        tail = f" that the {_pick(rng.choice(V.RC_NOUNS), n2)} {_pick(rng.choice(V.RC_VERBS), n2)}"
        case = f"{n1}_{n2}"
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return dict(
        clean_prefix=f"The {_pick(noun, n1)}{tail}",
        patch_prefix=f"The {_pick(noun, flip[n1])}{tail}",
        clean_answer=" " + _pick(answer, n1),
        patch_answer=" " + _pick(answer, flip[n1]),
        case=case,
    )


def task_pairs(task: str, n: int, seed: int) -> list[dict[str, str]]:
    """Up to ``n`` distinct contrastive pairs of ``task`` (fewer when the task has fewer distinct pairs)."""
    rng = random.Random(f"{seed}:{task}")
    seen: dict[tuple[str, str], dict[str, str]] = {}
    tries = 0
    while len(seen) < n and tries < 50 * n:
        p = _pair(task, rng)
        seen.setdefault((p["clean_prefix"], p["clean_answer"]), p)
        tries += 1
    return list(seen.values())


def split_pairs(pairs: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded train/test split with no pair in both."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(pairs) * test_fraction))
    test = [pairs[i] for i in sorted(order[:n_test])]
    train = [pairs[i] for i in sorted(order[n_test:])]
    return train, test


def induction_spans(n: int, length: int, seed: int) -> list[dict[str, str]]:
    """Rows of the induction task: a random span, read as ``span + " " + span`` (like the corpus's copy lines)."""
    rng = random.Random(f"{seed}:induction")
    return [{"span": copy_span(rng, length).lstrip()} for _ in range(n)]
