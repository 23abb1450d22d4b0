"""The command line: one-line errors with exit status 2, a stage run end to end, a Hydra sweep.

The CLI runs in this process through ``sfcd.cli.main`` (what the installed ``sfcd`` script calls: the same
composition, the same Hydra app, the same ``SystemExit``), so a test pays no interpreter start and imports;
``test_installed_script_exits_2_with_one_line`` runs the real script in a process of its own."""

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from sfcd.io import write_jsonl


@dataclass
class Result:
    code: int | None  # the exit status (0: main returned)
    out: str
    err: str


@pytest.fixture
def sfcd(monkeypatch, capsys):
    """``sfcd(*args)`` runs ``sfcd.cli.main(args)`` here and returns its exit status, stdout and stderr; the logging
    setup Hydra installs for the job (root handlers, a log file) and ``sys.argv`` are put back afterwards."""
    from sfcd.cli import main

    loggers = [logging.getLogger(n) for n in ("", "sfcd", "lightning.pytorch.utilities.rank_zero", "hydra")]
    saved = [(lg, lg.handlers[:], lg.level) for lg in loggers]
    monkeypatch.setattr(sys, "argv", ["sfcd"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # main sets it; restored after the test

    def run(*args: str) -> Result:
        bars = hf_logging.is_progress_bar_enabled()  # off in the script's process (main sets the variable before
        hf_logging.disable_progress_bar()  # transformers is imported); here transformers was imported before
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        out, err = capsys.readouterr()
        return Result(code, out, err)

    yield run
    for lg, handlers, level in saved:
        for h in lg.handlers:
            if h not in handlers:
                h.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)


def assert_one_line_error(p: Result, *needles: str) -> None:
    assert p.code == 2, (p.code, p.err)
    lines = p.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.err
    assert "Traceback" not in p.err
    for n in needles:
        assert n in lines[0], lines[0]


def test_installed_script_exits_2_with_one_line(tmp_path):
    """The console script a user runs, in a process of its own: an error raised inside the Hydra job (a run
    directory that does not exist) ends the process with status 2 and one line on stderr, no traceback."""
    script = Path(sys.executable).parent / "sfcd"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [str(script), "eval", f"run_dir={tmp_path / 'nope'}"], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run directory ") and "does not exist" in lines[0], p.stderr


@pytest.mark.parametrize(
    "args, needles",
    [
        (["model", "model=huge"], ["model/huge", "tiny"]),
        (["model", "experiment=nope"], ["experiment/nope", "demo"]),
        (["model", "foo=1"], ["unknown config key 'foo'"]),
        (["model", "train.steps=abc"], ["train.steps=abc", "Integer"]),
        (["bogus"], ["unknown stage 'bogus'"]),
    ],
)
def test_config_mistakes_are_one_line_errors(sfcd, args, needles):
    assert_one_line_error(sfcd(*args), *needles)


def test_missing_run_dir_and_step(sfcd, own_run, tmp_path):
    assert_one_line_error(sfcd("eval", f"run_dir={tmp_path / 'nope'}"), "does not exist")
    assert_one_line_error(sfcd("eval", f"run_dir={own_run.run_dir}", "step=5"), "no checkpoint step 5", "[0, 1, 2")


def test_malformed_task_file_names_the_line(sfcd, own_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"clean_prefix": "The boy", "clean_answer": " is"}])
    bad.write_text(bad.read_text() + "{oops\n")
    assert_one_line_error(sfcd("eval", f"run_dir={own_run.run_dir}", f"tasks=[{bad}]"), "line 2")


def test_hub_id_offline(sfcd, tmp_path):
    p = sfcd("eval", "model=pythia-70m-deduped", "step=3000", f"run_dir={tmp_path}")
    assert_one_line_error(p, "needs the network", "EleutherAI/pythia-70m-deduped")


def test_debug_shows_the_traceback(sfcd, tmp_path):
    p = sfcd("eval", f"run_dir={tmp_path / 'nope'}", "debug=true")
    assert p.code not in (0, 2) and "Traceback" in p.err and "MissingArtifactError" in p.err


def test_eval_stage_scores_a_checkpoint(sfcd, own_run, tmp_path):
    """``sfcd eval`` on a task file of six pairs (four rows of the run's simple and nounpp files; a copy with a
    two-token answer and one with prefixes of unequal lengths, which it drops) gives the accuracy and mean logit
    difference that plain transformers gives on the four usable pairs (right verb against wrong on the clean and
    on the patch prefix), in what it prints and what it writes. Catches: a trial scored the wrong way round, the
    wrong position's logits, a dropped pair scored, pairs left out."""
    run = Path(own_run.run_dir)
    tok = AutoTokenizer.from_pretrained(str(run / "model" / "step24"))
    model = AutoModelForCausalLM.from_pretrained(str(run / "model" / "step24")).eval()
    rows = [
        json.loads(line)
        for t in ("simple", "nounpp")
        for line in (run / "corpus" / "tasks" / f"{t}_test.jsonl").read_text().splitlines()[:2]
    ]
    two_tokens = {**rows[0], "patch_answer": rows[0]["patch_answer"] + rows[0]["clean_answer"]}
    longer = {**rows[0], "patch_prefix": rows[0]["patch_prefix"] + " " + rows[0]["patch_prefix"]}
    tasks = tmp_path / "mine.jsonl"
    write_jsonl(tasks, [rows[0], two_tokens, *rows[1:3], longer, rows[3]])
    diffs = []
    for row in rows:
        (a,), (b,) = (tok(row[k], add_special_tokens=False)["input_ids"] for k in ("clean_answer", "patch_answer"))
        clean, patch = (tok(row[k])["input_ids"] for k in ("clean_prefix", "patch_prefix"))
        assert len(clean) == len(patch)
        with torch.no_grad():
            lc, lp = (model(torch.tensor([ids])).logits[0, -1] for ids in (clean, patch))
        diffs += [float(lc[a] - lc[b]), float(lp[b] - lp[a])]
    accuracy = sum(d > 0 for d in diffs) / 8
    assert len(tok(two_tokens["patch_answer"], add_special_tokens=False)["input_ids"]) == 2

    p = sfcd("eval", f"run_dir={own_run.run_dir}", "step=24", f"tasks=[{tasks},induction]")
    assert p.code == 0, p.err
    printed = json.loads(p.out[p.out.index("{\n") :])
    written = json.loads((Path(own_run.run_dir) / "eval" / "step24.json").read_text())
    for out in (printed, written):
        assert out["step"] == 24 and out["mine"]["pairs"] == 4
        assert out["mine"]["dropped"] == {"multi-token answer": 1, "unequal prefix lengths": 1}
        assert out["mine"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert out["mine"]["logit_diff"] == pytest.approx(sum(diffs) / 8, abs=1e-4)
        assert "induction_score" in out


def test_sae_stage_bad_architecture_and_site(sfcd, own_run):
    assert_one_line_error(
        sfcd("sae", f"run_dir={own_run.run_dir}", "sae.architecture=gated"), "unknown SAE architecture"
    )
    assert_one_line_error(sfcd("sae", f"run_dir={own_run.run_dir}", "sae.sites=[resid.5]"), "unknown site", "resid.1")


def test_multirun_sweep_goes_through_hydra(tmp_path):
    """`-m` fans out one job per value through Hydra's joblib launcher, each with its own run directory (a real
    process: the launcher's workers are processes of their own)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "sfcd"),
            "corpus",
            "-m",
            "experiment=test",
            "corpus.seed=1,2",
            f"run_dir={tmp_path}/seed${{corpus.seed}}",
            "corpus.n_tokens=3000",
            "corpus.val_tokens=500",
            "hydra/launcher=joblib",
        ],
        capture_output=True,
        text=True,
        env=e,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    a = json.loads((tmp_path / "seed1" / "corpus" / "meta.json").read_text())
    b = json.loads((tmp_path / "seed2" / "corpus" / "meta.json").read_text())
    assert a["settings"]["seed"] == 1 and b["settings"]["seed"] == 2
    assert (tmp_path / "seed1" / "corpus" / "train.tokens").read_bytes() != (
        tmp_path / "seed2" / "corpus" / "train.tokens"
    ).read_bytes()


def test_scale_errors_are_one_line(sfcd, own_run):
    # a buffer that cannot fit, a GPU trainer where there is none: one line, exit 2, nothing written
    run = Path(own_run.run_dir)
    big = "10000000000000"
    fresh = "+sae.sweep.seed=[99]"  # an SAE the run does not hold, so the stage does not skip it as complete
    p = sfcd("sae", f"run_dir={run}", "sae.sites=[resid.0]", fresh, f"sae.n_tokens={big}", f"sae.buffer_tokens={big}")
    assert_one_line_error(p, "activation buffer", "lower sae.buffer_tokens")
    assert sorted(f.name for f in (run / "saes" / "step24").iterdir()) == ["mlp.1", "resid.0"]
    if not torch.cuda.is_available():  # checked before any stage (the model stage used to fail inside Lightning)
        steps = sorted(f.name for f in (run / "model").iterdir())
        p = sfcd("model", f"run_dir={run}", "trainer=gpu")
        assert_one_line_error(p, "asks for a GPU but torch sees none", "trainer=cpu")
        assert sorted(f.name for f in (run / "model").iterdir()) == steps
