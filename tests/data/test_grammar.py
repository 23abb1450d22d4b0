import itertools
import random

import pytest

from sfcd.data import grammar
from sfcd.data import vocab as V

MIX = {"simple": 1, "pp": 1, "orc": 1, "src": 1, "copy": 1}
ALL_KINDS = {k: 1 for k in grammar.SENTENCE_KINDS}
_VOCAB = (V.SUBJECTS, V.RC_NOUNS, V.PP_NOUNS, V.RC_VERBS, V.ANSWER_VERBS, V.EXTRA_VERBS)
SING = {s for pairs in _VOCAB for s, _ in pairs}
PLUR = {p for pairs in _VOCAB for _, p in pairs}
AUX = {w for pair in V.ANSWER_VERBS for w in pair}
SINGULAR_OF = {w: pair[0] for pair in V.ANSWER_VERBS for w in pair}  # an answer verb's singular form


def number(word: str) -> str:
    assert (word in SING) != (word in PLUR), word
    return "singular" if word in SING else "plural"


def parse(text: str) -> dict:
    """Parse a generated sentence with a hand-written reading of the templates (independent of the generator):
    the subject, the clause's agreeing noun and verb (if any), the attractors and the main verb."""
    w = text.rstrip(".").split()
    assert w[0] == "The", text
    out = {"subject": w[1], "clause_noun": None, "clause_verb": None, "attractors": [], "kind": "simple"}

    def skip_pps(i: int) -> int:  # P the N, repeated
        while w[i] in V.PREPOSITIONS:
            assert w[i + 1] == "the", text
            out["attractors"].append(w[i + 2])
            i += 3
        return i

    def clause_verb(i: int) -> int:  # a transitive verb, or an answer verb and its continuation
        out["clause_verb"] = w[i]
        if w[i] in AUX:
            conts = V.CLAUSE_CONTINUATIONS[SINGULAR_OF[w[i]]]
            assert w[i + 1] in conts, text
            return i + 2
        return i + 1

    if w[2] == "that" and w[3] == "the":  # object relative clause: The N that the N2 (P the N3)* CV V ...
        out["kind"], out["clause_noun"] = "orc", w[4]
        i = clause_verb(skip_pps(5))
    elif w[2] == "that":  # subject relative clause: The N that CV the N2 V ...
        out["kind"], out["clause_noun"] = "src", w[1]
        i = clause_verb(3)
        assert w[i] == "the", text
        out["attractors"].append(w[i + 1])
        i += 2
    elif w[2] == "and":  # a coordinated subject: The N and the N2 V ... (V plural)
        assert w[3] == "the", text
        out["kind"], i = "conj", 5
    else:
        i = skip_pps(2)
        out["kind"] = "pp" if out["attractors"] else "simple"
    out["verb"] = w[i]
    return out


def check_agreement(text: str) -> dict:
    """Every verb of a sentence agrees with its subject (parsed by :func:`parse`)."""
    p = parse(text)
    if p["clause_verb"] is not None:
        assert number(p["clause_verb"]) == number(p["clause_noun"]), text
    assert number(p["verb"]) == ("plural" if p["kind"] == "conj" else number(p["subject"])), text
    return p


def test_documents_are_deterministic_and_seeded():
    a = list(itertools.islice(grammar.documents(3, MIX), 50))
    b = list(itertools.islice(grammar.documents(3, MIX), 50))
    c = list(itertools.islice(grammar.documents(4, MIX), 50))
    assert a == b
    assert a != c


def test_every_generated_sentence_agrees():
    n_checked = 0
    for doc in itertools.islice(grammar.documents(0, ALL_KINDS), 2000):
        for line in doc.split("\n"):
            check_agreement(line)
            n_checked += 1
    assert n_checked > 4000


def test_the_answer_verbs_fill_every_verb_slot():
    """The paper's answers (is/are, has/have, does/do, goes/go) in the main verb and in both relative clauses,
    each form in each slot: a model trained on the corpus meets the paper's within_rc answers in the clause."""
    seen: dict[str, set] = {"main": set(), "orc": set(), "src": set()}
    for doc in itertools.islice(grammar.documents(1, ALL_KINDS), 3000):
        for line in doc.split("\n"):
            p = parse(line)
            seen["main"].add(p["verb"])
            if p["clause_verb"] is not None:
                seen[p["kind"]].add(p["clause_verb"])
    for slot, verbs in seen.items():
        assert verbs >= AUX, (slot, AUX - verbs)


def test_heldout_subjects_never_head_an_object_relative_clause():
    """The held-out subjects are subjects elsewhere, but never of ``The N that the N2 ...`` (rc_heldout's form)."""
    held = {w for pair in V.HELDOUT_SUBJECTS for w in pair}
    where: dict[str, int] = {}
    for doc in itertools.islice(grammar.documents(2, ALL_KINDS), 4000):
        for line in doc.split("\n"):
            p = parse(line)
            if p["subject"] in held:
                where[p["kind"]] = where.get(p["kind"], 0) + 1
    assert "orc" not in where
    assert where.get("simple", 0) > 20 and where.get("pp", 0) > 20 and where.get("src", 0) > 20


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


def complete(prefix: str, answer: str, task: str) -> str:
    """The pair's prefix and answer made a whole sentence: the clause verb's continuation and a main verb
    agreeing with the subject for the within-clause tasks, a complement for the others."""
    if not task.startswith("within_rc"):
        return f"{prefix}{answer} home."
    subject = prefix.split()[1]
    cont = ""
    if answer.strip() in AUX:
        cont = " " + V.CLAUSE_CONTINUATIONS[SINGULAR_OF[answer.strip()]][0]
    main = "is" if number(subject) == "singular" else "are"
    return f"{prefix}{answer}{cont} {main} here."


@pytest.mark.parametrize("task", grammar.TASKS)
def test_task_pairs_agree_and_their_patch_does_not(task):
    """The clean prefix with the clean answer is a grammatical sentence of the corpus (parsed independently),
    the clean prefix with the patch answer is not; the patch changes only the agreeing noun (with, in the
    attractor tasks, the attractors and the clause verb), and every attractor has the other number."""
    pairs = grammar.task_pairs(task, 100, seed=0)
    assert len(pairs) == len({(p["clean_prefix"], p["clean_answer"]) for p in pairs}) > 50
    if task == "conj":  # the connective is what changes: "and" (plural) against a preposition (N's number)
        for p in pairs:
            c, q = p["clean_prefix"].split(), p["patch_prefix"].split()
            assert [i for i in range(len(c)) if c[i] != q[i]] == [2] and c[2] == "and" and q[2] in V.PREPOSITIONS
            assert check_agreement(complete(p["clean_prefix"], p["clean_answer"], task))["kind"] == "conj"
            assert check_agreement(complete(p["patch_prefix"], p["patch_answer"], task))["kind"] == "pp"
            with pytest.raises(AssertionError):
                check_agreement(complete(p["clean_prefix"], p["patch_answer"], task))
            with pytest.raises(AssertionError):
                check_agreement(complete(p["patch_prefix"], p["clean_answer"], task))
        return
    agreeing = 4 if task.startswith("within_rc") else 1
    for p in pairs:
        c, q = p["clean_prefix"].split(), p["patch_prefix"].split()
        assert len(c) == len(q) and c[agreeing] != q[agreeing]
        assert p["clean_answer"].startswith(" ") and p["patch_answer"].startswith(" ")
        parsed = check_agreement(complete(p["clean_prefix"], p["clean_answer"], task))
        with pytest.raises(AssertionError):
            check_agreement(complete(p["clean_prefix"], p["patch_answer"], task))
        check_agreement(complete(p["patch_prefix"], p["patch_answer"], task))
        noun = c[agreeing]
        assert number(noun) == number(p["clean_answer"].strip()) != number(p["patch_answer"].strip())
        if task in ("nounpp2", "rc_pp", "within_rc_pp"):
            attractors = parsed["attractors"] + ([parsed["clause_noun"]] if task == "rc_pp" else [])
            assert attractors and all(number(a) != number(noun) for a in attractors)
        else:  # only the agreeing noun changes
            assert [i for i in range(len(c)) if c[i] != q[i]] == [agreeing]
        subjects = V.HELDOUT_SUBJECTS if task == "rc_heldout" else V.PAPER_SUBJECTS
        assert c[1] in {w for pair in subjects for w in pair}
        if task in grammar.PAPER_TASKS:  # the paper's answers and vocabulary
            assert p["clean_answer"].strip() in AUX


def test_split_is_disjoint_and_complete():
    pairs = grammar.task_pairs("nounpp", 80, seed=1)
    train, test = grammar.split_pairs(pairs, 0.25, seed=1)
    assert len(test) == 20 and len(train) == 60
    key = lambda p: p["clean_prefix"] + p["clean_answer"]  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}


def test_copy_span_uses_corpus_words():
    span = grammar.copy_span(random.Random(0), 30)
    assert all(w in V.ALL_WORDS for w in span.split())
