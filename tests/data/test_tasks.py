import json

import pytest

from sfcd.data.grammar import TASKS
from sfcd.data.tasks import load_task, read_rows
from sfcd.errors import InputError
from sfcd.io import write_jsonl
from sfcd.paths import RunDir


def test_generated_task_files_round_trip(test_run, tokenizer):
    run = RunDir(test_run.run_dir)
    for name in TASKS:
        path = run.task_file(name, "train")
        rows = read_rows(path)
        task = load_task(path, tokenizer)
        assert task.n_dropped == 0, task.summary()
        assert len(task.pairs) == len(rows) > 0
        for pair, row in zip(task.pairs, rows, strict=True):
            assert pair.row == row
            assert tokenizer.decode(pair.clean_ids, skip_special_tokens=True) == row["clean_prefix"]
            assert tokenizer.decode([pair.patch_answer]) == row["patch_answer"]
            assert len(pair.clean_ids) == len(pair.patch_ids)


def test_paper_format_file_and_filters(tmp_path, tokenizer):
    rows = [
        {
            "clean_prefix": "The uncle",
            "patch_prefix": "The uncles",
            "clean_answer": " has",
            "patch_answer": " have",
            "case": "singular",
        },
        # a multi-token answer (not a corpus word)
        {
            "clean_prefix": "The uncle",
            "patch_prefix": "The uncles",
            "clean_answer": " xylophones",
            "patch_answer": " have",
            "case": "singular",
        },
        # prefixes of unequal length
        {
            "clean_prefix": "The uncle",
            "patch_prefix": "The uncle near the cars",
            "clean_answer": " has",
            "patch_answer": " have",
            "case": "singular",
        },
        # nopair example
        {"clean_prefix": "The boys", "clean_answer": " are"},
    ]
    path = tmp_path / "paper_task.json"  # the paper's files end in .json but hold JSON lines
    write_jsonl(path, rows)
    task = load_task(path, tokenizer)
    assert task.name == "paper_task"
    assert len(task.pairs) == 2
    assert dict(task.dropped) == {"multi-token answer": 1, "unequal prefix lengths": 1}
    assert task.pairs[1].patch_ids is None and task.pairs[1].patch_answer is None
    assert "dropped 2" in task.summary()


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"clean_prefix": "The boy"}', r"line 2: missing or non-string keys \['clean_answer'\]"),
        (
            '{"clean_prefix": "The boy", "clean_answer": " is", "patch_prefix": "The boys"}',
            "line 2: give both",
        ),
    ],
)
def test_malformed_line_names_its_number(tmp_path, line, match):
    good = json.dumps({"clean_prefix": "The boy", "clean_answer": " is"})
    path = tmp_path / "t.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(InputError, match=match):
        read_rows(path)


def test_missing_task_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
