"""The command line: one-line errors with a non-zero exit, and a stage run end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sfcd.io import write_jsonl


def sfcd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sfcd.cli", *args], capture_output=True, text=True, env=e, timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


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
def test_config_mistakes_are_one_line_errors(args, needles):
    assert_one_line_error(sfcd(*args), *needles)


def test_missing_run_dir_and_step(test_run, tmp_path):
    assert_one_line_error(sfcd("eval", f"run_dir={tmp_path / 'nope'}"), "does not exist")
    assert_one_line_error(sfcd("eval", f"run_dir={test_run.run_dir}", "step=5"), "no checkpoint step 5", "[0, 1, 2")


def test_malformed_task_file_names_the_line(test_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"clean_prefix": "The boy", "clean_answer": " is"}])
    bad.write_text(bad.read_text() + "{oops\n")
    assert_one_line_error(sfcd("eval", f"run_dir={test_run.run_dir}", f"tasks=[{bad}]"), "line 2")


def test_hub_id_offline(test_run):
    p = sfcd("eval", "model=pythia-70m-deduped", "step=3000", f"run_dir={test_run.run_dir}")
    assert_one_line_error(p, "needs the network", "EleutherAI/pythia-70m-deduped")


def test_debug_shows_the_traceback(tmp_path):
    p = sfcd("eval", f"run_dir={tmp_path / 'nope'}", "debug=true")
    assert p.returncode != 0 and "Traceback" in p.stderr and "MissingArtifactError" in p.stderr


def test_eval_stage_scores_a_checkpoint(test_run):
    p = sfcd("eval", f"run_dir={test_run.run_dir}", "step=24", "tasks=[simple,induction]")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout[p.stdout.index("{") :])
    assert out["step"] == 24 and out["simple"]["pairs"] > 0
    assert 0 <= out["simple"]["accuracy"] <= 1 and "induction_score" in out


def test_sae_stage_bad_architecture_and_site(test_run):
    assert_one_line_error(
        sfcd("sae", f"run_dir={test_run.run_dir}", "sae.architecture=gated"), "unknown SAE architecture"
    )
    assert_one_line_error(sfcd("sae", f"run_dir={test_run.run_dir}", "sae.sites=[resid.5]"), "unknown site", "resid.1")


def test_multirun_sweep_goes_through_hydra(tmp_path):
    """`-m` fans out one job per value through Hydra's joblib launcher, each with its own run directory."""
    p = sfcd(
        "corpus",
        "-m",
        "experiment=test",
        "corpus.seed=1,2",
        f"run_dir={tmp_path}/seed${{corpus.seed}}",
        "corpus.n_tokens=3000",
        "corpus.val_tokens=500",
        "hydra/launcher=joblib",
    )
    assert p.returncode == 0, p.stderr
    a = json.loads((tmp_path / "seed1" / "corpus" / "meta.json").read_text())
    b = json.loads((tmp_path / "seed2" / "corpus" / "meta.json").read_text())
    assert a["settings"]["seed"] == 1 and b["settings"]["seed"] == 2
    assert (tmp_path / "seed1" / "corpus" / "train.tokens").read_bytes() != (
        tmp_path / "seed2" / "corpus" / "train.tokens"
    ).read_bytes()


def test_scale_errors_are_one_line(test_run, tmp_path):
    # a buffer that cannot fit, a GPU trainer where there is none: one line, exit 2, nothing written
    run = test_run.run_dir
    big = "10000000000000"
    fresh = "+sae.sweep.seed=[99]"  # an SAE no other test trains, so the stage does not skip it as complete
    p = sfcd("sae", f"run_dir={run}", "sae.sites=[resid.0]", fresh, f"sae.n_tokens={big}", f"sae.buffer_tokens={big}")
    assert_one_line_error(p, "activation buffer", "lower sae.buffer_tokens")
    if not torch.cuda.is_available():  # checked before any stage (the model stage used to fail inside Lightning)
        p = sfcd("model", f"run_dir={run}", "trainer=gpu")
        assert_one_line_error(p, "asks for a GPU but torch sees none", "trainer=cpu")
