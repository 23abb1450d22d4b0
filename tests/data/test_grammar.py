import itertools
import random

import pytest

from sfcd.data import grammar
from sfcd.data import vocab as V

MIX = {"simple": 1, "pp": 1, "orc": 1, "src": 1, "copy": 1}
SING = {
    s for pairs in (V.SUBJECTS, V.RC_NOUNS, V.PP_NOUNS, V.RC_VERBS, V.ANSWER_VERBS, V.EXTRA_VERBS) for s, _ in pairs
}
PLUR = {
    p for pairs in (V.SUBJECTS, V.RC_NOUNS, V.PP_NOUNS, V.RC_VERBS, V.ANSWER_VERBS, V.EXTRA_VERBS) for _, p in pairs
}


def number(word: str) -> str:
    assert (word in SING) != (word in PLUR), word
    return "singular" if word in SING else "plural"


def check_agreement(text: str) -> None:
    """Parse a generated sentence independently of the generator and check every verb agrees."""
    w = text.rstrip(".").split()
    assert w[0] == "The"
    if w[2] == "that" and w[3] == "the":  # object relative clause: The N that the N2 V2 V ...
        assert number(w[5]) == number(w[4]), text
        verb = w[6]
    elif w[2] == "that":  # subject relative clause: The N that V2 the N2 V ...
        assert number(w[3]) == number(w[1]), text
        verb = w[6]
    elif w[2] in V.PREPOSITIONS:  # The N P the N2 V ...
        verb = w[5]
    else:
        verb = w[2]
    assert number(verb) == number(w[1]), text


def test_documents_are_deterministic_and_seeded():
    a = list(itertools.islice(grammar.documents(3, MIX), 50))
    b = list(itertools.islice(grammar.documents(3, MIX), 50))
    c = list(itertools.islice(grammar.documents(4, MIX), 50))
    assert a == b
    assert a != c


def test_every_generated_sentence_agrees():
    n_checked = 0
    for doc in itertools.islice(grammar.documents(0, {"simple": 1, "pp": 1, "orc": 1, "src": 1}), 2000):
        for line in doc.split("\n"):
            check_agreement(line)
            n_checked += 1
    assert n_checked > 4000


def test_copy_lines_repeat_their_span():
    docs = itertools.islice(grammar.documents(1, {"copy": 1}, copy_len=(5, 5)), 100)
    for doc in docs:
        for line in doc.split("\n"):
            words = line.split()
            assert len(words) == 10 and words[:5] == words[5:]


def test_mixture_is_respected():
    kinds = {"simple": 0, "pp": 0}
    for doc in itertools.islice(grammar.documents(0, {"simple": 3, "pp": 1}), 3000):
        for line in doc.split("\n"):
            kinds["pp" if line.split()[2] in V.PREPOSITIONS else "simple"] += 1
    assert 2.5 < kinds["simple"] / kinds["pp"] < 3.5


def test_unknown_mixture_key_is_an_error():
    with pytest.raises(ValueError, match="unknown mixture keys"):
        next(grammar.documents(0, {"poems": 1}))


@pytest.mark.parametrize("task", grammar.TASKS)
def test_task_pairs_flip_exactly_the_agreeing_noun(task):
    pairs = grammar.task_pairs(task, 100, seed=0)
    assert len(pairs) == len({(p["clean_prefix"], p["clean_answer"]) for p in pairs}) > 50
    for p in pairs:
        c, q = p["clean_prefix"].split(), p["patch_prefix"].split()
        diff = [i for i in range(len(c)) if c[i] != q[i]]
        assert len(c) == len(q) and len(diff) == 1
        noun = c[diff[0]]
        assert diff[0] == (4 if task == "within_rc" else 1)
        assert number(noun) == number(p["clean_answer"].strip()) != number(p["patch_answer"].strip())
        assert p["clean_answer"].startswith(" ")
        if task != "within_rc":  # the answer is the main verb: the whole sentence must parse and agree
            check_agreement(p["clean_prefix"] + p["clean_answer"] + " home.")


def test_split_is_disjoint_and_complete():
    pairs = grammar.task_pairs("nounpp", 80, seed=1)
    train, test = grammar.split_pairs(pairs, 0.25, seed=1)
    assert len(test) == 20 and len(train) == 60
    key = lambda p: p["clean_prefix"] + p["clean_answer"]  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}


def test_copy_span_uses_corpus_words():
    span = grammar.copy_span(random.Random(0), 30)
    assert all(w in V.ALL_WORDS for w in span.split())
