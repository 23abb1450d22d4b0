"""The agreement vocabulary: the Sparse Feature Circuits tasks' words plus a few more of sfcd's own."""

from __future__ import annotations

_IRREGULAR = {"man": "men", "woman": "women"}


def _plural(noun: str) -> str:
    return _IRREGULAR.get(noun, noun + "s")


def _pairs(words: list[str]) -> list[tuple[str, str]]:
    return [(w, _plural(w)) for w in words]


#: Subjects N (singular, plural): the paper's list.
PAPER_SUBJECTS = _pairs(
    [
        "athlete",
        "aunt",
        "boy",
        "carpenter",
        "doctor",
        "farmer",
        "father",
        "friend",
        "girl",
        "guy",
        "kid",
        "lawyer",
        "man",
        "mother",
        "poet",
        "singer",
        "teacher",
        "uncle",
        "victim",
        "woman",
    ]
)
#: sfcd's own subjects, held out of the object relative clause constructions: the corpus never has one as the
#: subject N of ``The N that the N2 ...``, so the ``rc_heldout`` task tells a rule from memorised combinations.
HELDOUT_SUBJECTS = _pairs(["student", "pilot", "nurse", "painter"])
SUBJECTS = PAPER_SUBJECTS + HELDOUT_SUBJECTS
#: N2 inside a relative clause.
RC_NOUNS = _pairs(
    [
        "guard",
        "chef",
        "architect",
        "skater",
        "dancer",
        "minister",
        "driver",
        "assistant",
        "executive",
        "parent",
    ]
)
#: Prepositions and the nouns after them.
PREPOSITIONS = ["behind", "beside", "near"]
PP_NOUNS = _pairs(["bike", "car", "cat", "chair", "desk", "dog", "table", "tree", "truck", "window"])
#: Transitive verbs in the clause (singular, plural).
RC_VERBS = [
    ("praises", "praise"),
    ("calls", "call"),
    ("describes", "describe"),
    ("follows", "follow"),
    ("influences", "influence"),
    ("forgives", "forgive"),
    ("protects", "protect"),
    ("informs", "inform"),
    ("visits", "visit"),
    ("likes", "like"),
    ("hates", "hate"),
]
#: The task answers (singular, plural), as in the paper: in every verb slot, the relative clauses' included.
ANSWER_VERBS = [("is", "are"), ("does", "do"), ("has", "have"), ("goes", "go")]
#: What follows an answer verb in a relative clause (``that the chefs have met``, ``that is watching the dog``).
CLAUSE_CONTINUATIONS: dict[str, list[str]] = {
    "is": ["watching", "helping"],
    "has": ["met", "seen"],
    "does": ["like", "know"],
    "goes": ["with", "to"],
}
#: More main verbs of sfcd's own, so the corpus is not only the four answers.
EXTRA_VERBS = [("was", "were"), ("walks", "walk"), ("sleeps", "sleep"), ("smiles", "smile")]

#: What may follow each main verb (the verb's singular form is the key).
COMPLEMENTS: dict[str, list[str]] = {
    "is": ["happy", "tired", "old", "young", "here", "ready", "tall", "kind"],
    "was": ["happy", "tired", "late", "here", "ready", "kind"],
    "does": ["the work", "it well", "nothing", "the dishes"],
    "has": ["a car", "a dog", "the keys", "a bike", "a plan", "two cats"],
    "goes": ["home", "to the park", "out", "to work", "away"],
    "walks": ["home", "slowly", "to the park", "quickly"],
    "sleeps": ["well", "late", "today", "again"],
    "smiles": ["often", "again", "today", "warmly"],
}

#: Every word the corpus can emit, for random copy spans.
ALL_WORDS: list[str] = sorted(
    {w for pairs in (SUBJECTS, RC_NOUNS, PP_NOUNS, RC_VERBS, ANSWER_VERBS, EXTRA_VERBS) for p in pairs for w in p}
    | set(PREPOSITIONS)
    | {w for comps in COMPLEMENTS.values() for c in comps for w in c.split()}
    | {w for conts in CLAUSE_CONTINUATIONS.values() for w in conts}
    | {"the", "that", "and"}
)

# ------------------------------------------------------------------------------ the planted constructions
# Two agreement constructions of the same kind, each with its own nouns and verbs (made-up words, none of them in
# ALL_WORDS, so no other sentence kind or copy span ever emits one): ``planted`` enters the training batches at a
# chosen step (corpus.planted.step), ``control`` is there from the start (sfcd/data/planted.py).
PLANTED_NOUNS = _pairs(["wug", "dax", "fep", "zib"])
PLANTED_VERBS = [("blicks", "blick"), ("glorps", "glorp"), ("mipes", "mipe")]
CONTROL_NOUNS = _pairs(["tove", "rath", "jub", "vorp"])
CONTROL_VERBS = [("gimbles", "gimble"), ("frabs", "frab"), ("snarks", "snark")]
#: What follows a planted or control verb (words every other construction uses too).
PLANTED_COMPLEMENTS = ["today", "again", "well", "home", "often", "slowly"]
