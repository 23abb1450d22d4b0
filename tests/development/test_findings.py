"""The study's findings (development/findings.py) on planted matchings and circuits whose answers are known by
hand, and their section at the top of report.html."""

from __future__ import annotations

import numpy as np

from sfcd.development.findings import first_steps, task_findings
from sfcd.development.matching import Matching


def _matching(pairs: dict[int, tuple[int, float]], n: int) -> Matching:
    match, sim = np.full(n, -1), np.zeros(n)
    for i, (j, s) in pairs.items():
        match[i], sim[i] = j, s
    return Matching(match, sim, sim.copy(), (np.array([], int), np.array([], int), np.array([])))


STEPS = [10, 20, 40, 80]
# matchings[k]: the SAE at STEPS[k+1] (A) to the one at STEPS[k] (B). Last-SAE features:
#  0 -> chain 80:0 -> 40:3 -> 20:1 -> 10:2 (first 10)
#  1 -> 40:0 -> 20:2 (0.69 < 0.7 at 20 -> 10: first 20)
#  2 -> 40:1, then no match at 20 (first 40)
#  3 -> matched at 0.65 only (first 80)
#  4 -> 40:2 -> 20:0 -> 10:0 (first 10, but not in the circuit)
MATCHINGS = [
    _matching({1: (2, 0.9), 2: (3, 0.69), 0: (0, 0.95)}, 4),  # 20 -> 10
    _matching({3: (1, 0.8), 0: (2, 0.9), 2: (0, 0.99)}, 4),  # 40 -> 20
    _matching({0: (3, 0.75), 1: (0, 0.71), 2: (1, 0.9), 3: (2, 0.65), 4: (2, 0.8)}, 5),  # 80 -> 40
]


def test_first_steps_follow_unbroken_chains_at_the_threshold():
    # bugs caught: a chain that skips a broken link, ">" vs ">=" at the threshold, an off-by-one step
    assert first_steps(STEPS, MATCHINGS, [0, 1, 2, 3], 0.7) == [10, 20, 40, 80]
    # at 0.69 the 20 -> 10 link of feature 1 holds, the 0.65 link of feature 3 still does not
    assert first_steps(STEPS, MATCHINGS, [1, 3], 0.69) == [10, 80]


def _rows(faith: list, resolvable: list, carried: list) -> list[dict]:
    return [
        {"step": s, "n_nodes": 5, "faithfulness": f, "resolvable": r, "final_circuit_faithfulness": c}
        for s, f, r, c in zip(STEPS, faith, resolvable, carried, strict=True)
    ]


def test_task_findings_date_the_circuit_and_sort_its_features():
    # step 10: not resolvable (the model cannot do the task), although its sweep "reached" 0.8;
    # step 20: resolvable but never 0.8 faithful; step 40: the first faithful circuit
    meta = {
        10: {"faithfulness": 0.0, "resolvable": False, "nodes_for_faithfulness_0.8": {"features": {"n_nodes": 1}}},
        20: {"faithfulness": 0.5, "resolvable": True, "nodes_for_faithfulness_0.8": {"features": None}},
        40: {"faithfulness": 0.9, "resolvable": True, "nodes_for_faithfulness_0.8": {"features": {"n_nodes": 4}}},
        80: {"faithfulness": 0.95, "nodes_for_faithfulness_0.8": {"features": {"n_nodes": 4}}},
    }
    # the last circuit carried back: 0.85 at 20, 0.6 at 40 (a dip), 0.9 at 80 -> faithful from 80 only
    rows = _rows([None, 0.5, 0.9, 0.95], [False, True, True, True], [0.99, 0.85, 0.6, 0.9])
    nodes = ["resid.0/0@3", "resid.0/0@4", "resid.0/1", "resid.0/2", "resid.0/3", "resid.0/eps", "mlp.0/eps@2"]
    seed = {"resid.0": _matching({0: (0, 0.9), 1: (1, 0.9), 2: (2, 0.5), 3: (3, 0.8)}, 5)}
    f = task_findings("nounpp", STEPS, rows, meta, nodes, {"resid.0": MATCHINGS}, seed, 0.7, {"0.9": 40})
    assert f["circuit_appears"] == 40
    assert f["last_circuit_faithful_from"] == 80
    status = {x["id"]: (x["status"], x["first_step"], x["reproducible"]) for x in f["features"]}
    assert status == {
        "resid.0/0": ("carried over", 10, True),  # one entry for its two positions
        "resid.0/1": ("carried over", 20, True),
        "resid.0/2": ("not reproducible", 40, False),  # new at 40, but the second seed lacks it
        "resid.0/3": ("new", 80, True),
    }
    assert f["counts"] == {"carried over": 2, "new": 1, "not reproducible": 1}
    assert f["error_nodes"] == 2
    assert f["by_first_step"] == {"10": 1, "20": 1, "40": 1, "80": 1}
    assert [r["resolvable"] for r in f["rows"]] == [False, True, True, True]


def test_no_resolvable_circuit_is_never_dated(tmp_path):
    meta = {s: {"faithfulness": None, "resolvable": False} for s in STEPS}
    rows = _rows([None] * 4, [False] * 4, [None] * 4)
    f = task_findings("rc", STEPS, rows, meta, ["resid.0/0"], {"resid.0": MATCHINGS}, {}, 0.7, None)
    assert f["circuit_appears"] is None and f["last_circuit_faithful_from"] is None
    # with no circuit to date against, features are judged against the last step; no seed: reproducible None
    assert f["features"] == [
        {"id": "resid.0/0", "site": "resid.0", "first_step": 10, "reproducible": None, "status": "carried over"}
    ]


def test_the_report_opens_with_the_findings(tmp_path):
    from sfcd.report.html import render
    from tests.report.synthetic import fabricate

    dev, plots, links = fabricate(tmp_path, k=4, sites=["embed", "resid.0"], crosscoder=False, d_sae=64, draw=False)
    steps = dev["steps"]
    meta = {s: {"faithfulness": 0.9, "nodes_for_faithfulness_0.8": {"features": {}}} for s in steps}
    rows = [{"step": s, "faithfulness": 0.9, "final_circuit_faithfulness": 0.9} for s in steps]
    ms = {"resid.0": [_matching({}, 64) for _ in steps[1:]]}
    f = task_findings("<rc>", steps, rows, meta, ["resid.0/7"], ms, {}, 0.7, {"0.9": steps[1]})
    dev["findings"] = {"<rc>": f}
    page = render(tmp_path, "t", plots, dev, links).read_text()
    top = page.index('id="findings"')
    assert top < page.index('id="heat-ce_loss_score"')  # above the heatmaps
    assert "&lt;rc&gt;" in page and "<rc>" not in page  # escaped
    assert f"accuracy &gt;= 0.9 at step {steps[1]}" in page
    assert f"Faithful circuit: step {steps[0]}" in page
