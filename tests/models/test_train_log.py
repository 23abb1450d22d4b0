"""The studied steps chosen from a train log: planted accuracy curves with known crossings."""

import json

import pytest

from sfcd.config import compose
from sfcd.errors import ConfigError
from sfcd.io import read_csv
from sfcd.models.train_log import choose_steps, crossings, study_steps
from sfcd.paths import RunDir

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 250, 256, 500, 512, 750, 1000, 1250, 1500]
# planted: the first step of each accuracy level per task
PLANT = {
    "a": {64: 0.7, 128: 0.95},  # 0.6 at 64, 0.9 at 128
    "b": {128: 0.65, 500: 0.92},  # 0.6 at 128, 0.9 at 500
    "c": {1000: 0.61},  # 0.6 at 1000, never 0.9
}


def planted_rows() -> list[dict]:
    rows = []
    for s in STEPS:
        row = {"step": str(s)}
        for t, levels in PLANT.items():
            acc = 0.5
            for at, level in levels.items():
                if s >= at:
                    acc = level
            row[f"{t}_accuracy"] = str(acc)
        rows.append(row)
    return rows


def test_crossings_are_the_first_checkpoint_at_or_above_each_threshold():
    cross = crossings(planted_rows(), ["a", "b", "c"], [0.6, 0.9])
    assert cross == {
        "a": {"0.6": 64, "0.9": 128},
        "b": {"0.6": 128, "0.9": 500},
        "c": {"0.6": 1000, "0.9": None},
    }


def test_choose_steps_keeps_before_learning_the_crossings_and_the_last():
    got = choose_steps(planted_rows(), ["a", "b", "c"], [0.6, 0.9], max_steps=10)
    # 32: the last checkpoint before any task reaches 0.6 (a does at 64), not step 0 nor the crossing itself
    assert got["steps"] == [32, 64, 128, 500, 1000, 1500]
    assert got["reasons"]["32"] == ["before any task is learned"]
    assert sorted(got["reasons"]["128"]) == ["a >= 0.9", "b >= 0.6"]
    assert got["left_out"] == {}


def test_too_many_candidates_keep_where_tasks_are_learned_first():
    got = choose_steps(planted_rows(), ["a", "b", "c"], [0.6, 0.9], max_steps=4)
    # a is learned (>= 0.9) at 128 and b at 500: those come first; 64 and 1000 only cross 0.6
    assert got["steps"] == [32, 128, 500, 1500]
    assert got["left_out"] == {"64": ["a >= 0.6"], "1000": ["c >= 0.6"]}
    # with one place left: 128 (a learned, b starting) over 500 (b learned alone)
    assert choose_steps(planted_rows(), ["a", "b", "c"], [0.6, 0.9], max_steps=3)["steps"] == [32, 128, 1500]
    # the demo's case: a task that crosses 0.6 at a crowded step keeps the late step where it is learned
    rows = planted_rows()
    for r in rows:
        r["c_accuracy"] = {True: "0.95", False: r["c_accuracy"]}[int(r["step"]) >= 1000]
        r["c_accuracy"] = "0.62" if 128 <= int(r["step"]) < 1000 else r["c_accuracy"]
    assert choose_steps(rows, ["a", "b", "c"], [0.6, 0.9], max_steps=4)["steps"] == [32, 128, 500, 1500]
    assert choose_steps(rows, ["a", "b", "c"], [0.6, 0.9], max_steps=5)["steps"] == [32, 128, 500, 1000, 1500]
    only_b = choose_steps(planted_rows(), ["b"], [0.6, 0.9], max_steps=5)  # step_tasks narrows the crossings
    assert only_b["steps"] == [64, 128, 500, 1500]


def test_a_task_learned_from_the_start_makes_the_first_checkpoint_the_before_step():
    rows = planted_rows()
    for r in rows:
        r["a_accuracy"] = "0.97"
    assert choose_steps(rows, ["a"], [0.6, 0.9], max_steps=5)["steps"] == [0, 1500]


def test_choose_steps_errors():
    with pytest.raises(ValueError, match=r"tasks \['z'\] are not in the train log; it scores \['a', 'b', 'c'\]"):
        choose_steps(planted_rows(), ["z"], [0.6], 4)
    with pytest.raises(ValueError, match="at least 2"):
        choose_steps(planted_rows(), ["a"], [0.6], 1)


def test_study_steps_from_the_run_train_log_and_explicit_steps_win(test_run, tmp_path):
    run = RunDir(test_run.run_dir)
    rows = read_csv(run.train_log)
    cfg = compose(["experiment=test", f"run_dir={run.root}", "study.steps=[]", "study.max_steps=3"])
    meta = study_steps(cfg, run)
    written = json.loads((run.root / "development" / "study_steps.json").read_text())
    assert written == json.loads(json.dumps(meta)) and written["source"] == str(run.train_log)
    assert meta["steps"] == choose_steps(rows, written["tasks"], [0.6, 0.9], 3)["steps"]
    assert meta["steps"][-1] == 24 and set(meta["steps"]) <= set(run.model_steps()) and len(meta["steps"]) <= 3
    assert written["tasks"] == [k.removesuffix("_accuracy") for k in rows[0] if k.endswith("_accuracy")]
    explicit = study_steps(compose(["experiment=test", f"run_dir={run.root}", "study.steps=[16,8]"]), run)
    assert explicit["steps"] == [8, 16] and explicit["source"] == "study.steps"
    with pytest.raises(ConfigError, match="study.step_tasks.*not in the train log"):
        study_steps(
            compose(["experiment=test", f"run_dir={run.root}", "study.steps=[]", "study.step_tasks=[nope]"]), run
        )
