"""A seeded generator of English-like text with subject-verb agreement, and of the contrastive task pairs.

Sentence kinds (the main verb V always agrees with the subject N):
``simple``  The N V C.                          ``pp``      The N P the N2 V C.
``pp2``     The N P the N2 P the N3 V C.        ``src``     The N that CV the N2 V C.
``orc``     The N that the N2 CV V C.           ``orc_pp``  The N that the N2 P the N3 CV V C.
``conj``    The N and the N2 V C. (V is plural: a coordinated subject)
The clause verb CV agrees with N2 in ``orc``/``orc_pp`` and with N in ``src``; it is a transitive verb
(``praises``) or, as often, one of the paper's answer verbs with a continuation (``has met``, ``is watching``),
so every verb slot holds is/are, has/have, does/do and goes/go. The subjects of ``orc``/``orc_pp`` are never
:data:`~sfcd.data.vocab.HELDOUT_SUBJECTS`. ``copy`` segments hold a random span of words that repeats, which
rewards in-context copying (induction).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from sfcd.data import planted
from sfcd.data import vocab as V

SENTENCE_KINDS = ("simple", "pp", "pp2", "orc", "orc_pp", "src", "conj")
#: The paper's four tasks (its templates, vocabulary and answers), then sfcd's own: the transitive within_rc,
#: and harder agreement (two attractors, a PP inside the clause, an attractor inside the clause, held-out
#: subjects, a coordinated subject).
PAPER_TASKS = ("simple", "nounpp", "rc", "within_rc")
TASKS = (*PAPER_TASKS, "within_rc_transitive", "nounpp2", "rc_pp", "within_rc_pp", "rc_heldout", "conj")
NUMBERS = ("singular", "plural")
FLIP = {"singular": "plural", "plural": "singular"}


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


def _clause_verb(rng: random.Random, number: str) -> str:
    """The verb of a relative clause: a transitive verb, or an answer verb and its continuation."""
    if rng.random() < 0.5:
        return _pick(rng.choice(V.RC_VERBS), number)
    pair = rng.choice(V.ANSWER_VERBS)
    return f"{_pick(pair, number)} {rng.choice(V.CLAUSE_CONTINUATIONS[pair[0]])}"


def _np(rng: random.Random, nouns: list[tuple[str, str]], number: str | None = None) -> str:
    return f"the {_pick(rng.choice(nouns), number or _num(rng))}"


def _pp(rng: random.Random, number: str | None = None) -> str:
    return f"{rng.choice(V.PREPOSITIONS)} {_np(rng, V.PP_NOUNS, number)}"


def sentence(rng: random.Random, kind: str) -> Sentence:
    """One sentence of ``kind`` (one of :data:`SENTENCE_KINDS`)."""
    if kind not in SENTENCE_KINDS:
        raise ValueError(f"unknown sentence kind {kind!r}; expected one of {SENTENCE_KINDS}")
    n = _num(rng)
    subjects = V.PAPER_SUBJECTS if kind in ("orc", "orc_pp") else V.SUBJECTS
    head = f"The {_pick(rng.choice(subjects), n)}"
    if kind == "pp":
        head += f" {_pp(rng)}"
    elif kind == "pp2":
        head += f" {_pp(rng)} {_pp(rng)}"
    elif kind in ("orc", "orc_pp"):
        n2 = _num(rng)
        pp = f" {_pp(rng)}" if kind == "orc_pp" else ""
        head += f" that {_np(rng, V.RC_NOUNS, n2)}{pp} {_clause_verb(rng, n2)}"
    elif kind == "src":
        head += f" that {_clause_verb(rng, n)} {_np(rng, V.RC_NOUNS)}"
    elif kind == "conj":
        head, n = f"{head} and {_np(rng, V.PP_NOUNS)}", "plural"
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
    as its own line: ``span span``), and, when planted (sfcd/data/planted.py), ``planted`` and ``control``.
    Lines are joined by newlines, so every sentence starts with ``The``.
    """
    known = [*SENTENCE_KINDS, "copy", *planted.KINDS]
    unknown = set(mixture) - set(known)
    if unknown:
        raise ValueError(f"unknown mixture keys {sorted(unknown)}; expected {known}")
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
            elif kind in planted.KINDS:
                lines.append(planted.sentence(rng, kind))
            else:
                lines.append(sentence(rng, kind).text)
        yield "\n".join(lines)


# ---------------------------------------------------------------------------------------------- task pairs
def _prefix(task: str, rng: random.Random, n1: str, n2: str):
    """The prefix of ``task`` at numbers (n1, n2) as a function of them, so a patch re-renders it with the
    agreeing noun's number flipped (and, in the attractor tasks, every attractor's with it); the choice of
    words is drawn once. Returns (render, the answer verb pair, which number the answer agrees with, case)."""
    noun = rng.choice(V.HELDOUT_SUBJECTS if task == "rc_heldout" else V.PAPER_SUBJECTS)
    answer = rng.choice(V.ANSWER_VERBS)
    prep, prep2 = rng.choice(V.PREPOSITIONS), rng.choice(V.PREPOSITIONS)
    pp_noun, pp_noun2, rc_noun = rng.choice(V.PP_NOUNS), rng.choice(V.PP_NOUNS), rng.choice(V.RC_NOUNS)
    rc_verb = rng.choice(V.RC_VERBS)
    if task == "simple":
        return (lambda a, b: f"The {_pick(noun, a)}"), answer, 1, n1
    if task == "nounpp":
        return (lambda a, b: f"The {_pick(noun, a)} {prep} the {_pick(pp_noun, b)}"), answer, 1, f"{n1}_{n2}"
    if task in ("rc", "rc_heldout"):

        def rc(a, b):
            return f"The {_pick(noun, a)} that the {_pick(rc_noun, b)} {_pick(rc_verb, b)}"

        return rc, answer, 1, f"{n1}_{n2}"
    if task == "within_rc":
        return (lambda a, b: f"The {_pick(noun, a)} that the {_pick(rc_noun, b)}"), answer, 2, f"{n1}_{n2}"
    if task == "within_rc_transitive":
        return (lambda a, b: f"The {_pick(noun, a)} that the {_pick(rc_noun, b)}"), rc_verb, 2, f"{n1}_{n2}"
    # the attractor tasks: every attractor has the other number than the noun the answer agrees with
    if task == "nounpp2":

        def nounpp2(a, b):
            return f"The {_pick(noun, a)} {prep} the {_pick(pp_noun, FLIP[a])} {prep2} the {_pick(pp_noun2, FLIP[a])}"

        return nounpp2, answer, 1, f"{n1}_{FLIP[n1]}_{FLIP[n1]}"
    if task == "rc_pp":

        def rc_pp(a, b):
            o = FLIP[a]
            return (
                f"The {_pick(noun, a)} that the {_pick(rc_noun, o)} {prep} the {_pick(pp_noun, o)} {_pick(rc_verb, o)}"
            )

        return rc_pp, answer, 1, f"{n1}_{FLIP[n1]}_{FLIP[n1]}"
    if task == "within_rc_pp":

        def within_rc_pp(a, b):
            return f"The {_pick(noun, a)} that the {_pick(rc_noun, b)} {prep} the {_pick(pp_noun, FLIP[b])}"

        return within_rc_pp, answer, 2, f"{n1}_{n2}_{FLIP[n2]}"
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _conj_pair(rng: random.Random) -> dict[str, str]:
    """``The N and the N2`` (plural verb) against ``The N P the N2`` (N's number, singular): the connective is
    what the patch changes, so the first-noun rule that solves the other tasks gets it wrong."""
    noun, other, answer = rng.choice(V.PAPER_SUBJECTS)[0], rng.choice(V.PP_NOUNS), rng.choice(V.ANSWER_VERBS)
    n2 = _num(rng)
    return dict(
        clean_prefix=f"The {noun} and the {_pick(other, n2)}",
        patch_prefix=f"The {noun} {rng.choice(V.PREPOSITIONS)} the {_pick(other, n2)}",
        clean_answer=" " + answer[1],
        patch_answer=" " + answer[0],
        case=f"conj_{n2}",
    )


def _pair(task: str, rng: random.Random) -> dict[str, str]:
    if task == "conj":
        return _conj_pair(rng)
    n1, n2 = _num(rng), _num(rng)
    render, answer, agrees, case = _prefix(task, rng, n1, n2)
    n = n1 if agrees == 1 else n2
    clean = render(n1, n2)
    patch = render(FLIP[n1], n2) if agrees == 1 else render(n1, FLIP[n2])
    return dict(
        clean_prefix=clean,
        patch_prefix=patch,
        clean_answer=" " + _pick(answer, n),
        patch_answer=" " + _pick(answer, FLIP[n]),
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
