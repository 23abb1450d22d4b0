"""The study: every stage over checkpoints, resumable after kill -9, the development analysis, the report."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sfcd.config import compose
from sfcd.errors import ConfigError, InputError, MissingArtifactError
from tests.conftest import run_chromium


def study(run_dir, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sfcd.cli", "study", "experiment=test", f"run_dir={run_dir}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def artifacts(run_dir) -> dict:
    dev = json.loads((run_dir / "development" / "development.json").read_text())
    circuits = {
        p.parent.name: json.loads(p.read_text())["nodes"] for p in (run_dir / "circuits").glob("*/step*/circuit.json")
    }
    saes = {
        str(p.relative_to(run_dir)): json.loads(p.read_text())["fve"]
        for p in (run_dir / "saes").glob("*/*/metrics.json")
    }
    return {"dev": dev["sae_rows"], "circuits": circuits, "saes": saes}


@pytest.fixture(scope="module")
def reference_study(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("study") / "ref"
    p = study(run_dir, "study.crosscoder=true")  # the killed study below runs without: its artifacts are the same
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return run_dir


def test_study_writes_the_development_and_a_report_that_renders(reference_study, chromium):
    run = reference_study
    dev = json.loads((run / "development" / "development.json").read_text())
    assert dev["steps"] == [8, 16, 24] and len(dev["sites"]) == 7
    for site in dev["sites"].values():  # lineage counts cover exactly the last SAE's live features
        assert sum(site["first_step_counts"].values()) == site["live_features"][-1] > 0
    rows = dev["sae_rows"]
    assert {r["step"] for r in rows} == {8, 16, 24} and all(r["seed_baseline"] is not None for r in rows)
    assert all(r["shared_with_final"] == 1.0 for r in rows if r["step"] == 24)  # an SAE shares all with itself
    # a seed baseline at every step: the floor everywhere, and changes beyond it never above the raw counts
    assert all(r["floor_births"] is not None and r["floor_shared"] is not None for r in rows)
    for r in (r for r in rows if r["step"] > 8):
        for x in ("births", "deaths", "splits", "merges"):
            assert r[x] is not None and 0 <= r[x] <= r[f"{x}_raw"], (r["site"], r["step"], x)
    for site in dev["sites"].values():
        assert [f["step"] for f in site["floor"]] == [8, 16, 24] and set(site["floor_band"]) >= {"births", "shared"}
    assert set(dev["circuits"]) == {"nounpp"}
    for key in (
        "n_nodes",
        "jaccard_final",
        "weighted_jaccard_final",
        "edge_jaccard_final",
        "final_circuit_faithfulness",
    ):
        assert all(key in r for r in dev["circuits"]["nounpp"]), key
    for name in ("training", "sae_fve", "shared_with_final", "lineage", "circuits"):
        assert (run / "development" / f"{name}.png").stat().st_size > 5000
    dom = run_chromium(chromium, (run / "report.html").as_uri())
    assert "<h1>sfcd study: test</h1>" in dom and dom.count("data:image/png;base64,") >= 7  # plots + a circuit
    assert "<h2>Circuits at step 24</h2>" in dom
    assert "features/step24/resid.1/index.html" in dom and "circuits/nounpp/step24/circuit.svg" in dom
    assert 'href="circuits/nounpp/step24/circuit.html"' in dom  # the report links the interactive view
    # study.crosscoder: a crosscoder per resid site over the three steps, circuits on its latents, the section
    cc = json.loads((run / "crosscoders" / "development.json").read_text())
    assert cc["steps"] == [8, 16, 24] and set(cc["sites"]) == {"resid.0", "resid.1"}
    rows = cc["circuits"]["nounpp"]["rows"]
    assert [r["step"] for r in rows] == [8, 16, 24]
    assert all("share_matched_saes" in r and "final_circuit_faithfulness" in r for r in rows)
    for s in (8, 16, 24):
        assert (run / "crosscoders" / "circuits" / "nounpp" / f"step{s}" / "circuit.json").exists()
    assert "<h2>Crosscoders across checkpoints</h2>" in dom and "share_matched_saes" in dom


def test_study_killed_mid_stage_resumes_to_the_same_artifacts(reference_study, tmp_path):
    run_dir = tmp_path / "killed"
    p = study(run_dir)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run_dir / "saes").glob("step16/*/metrics.json")):
        time.sleep(0.5)  # wait until the study is inside its SAE/circuit units
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert not (run_dir / "report.html").exists()
    p = study(run_dir)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert artifacts(run_dir) == artifacts(reference_study)


def test_study_errors(tmp_path, test_run):
    from sfcd.study import run_study

    with pytest.raises(ConfigError, match="study.tasks is empty"):
        run_study(compose(["experiment=test", f"run_dir={test_run.run_dir}", "study.tasks=[]"]))
    with pytest.raises(MissingArtifactError, match=r"study.steps \[5\] are not checkpoints.*\[0, 1, 2, 4, 8, 16, 24\]"):
        run_study(compose(["experiment=test", f"run_dir={test_run.run_dir}", "study.steps=[5,24]"]))


def test_saes_of_different_widths_across_steps(tmp_path):
    from sfcd.development.analysis import site_development
    from sfcd.io import write_json
    from sfcd.paths import RunDir
    from sfcd.sae.io import save_sae
    from sfcd.sae.topk import TopKSAE

    for step, width in ((1, 16), (2, 32)):
        folder = tmp_path / "saes" / f"step{step}" / "resid.0"
        save_sae(TopKSAE(8, width, k=2), folder, {})
        write_json(folder / "metrics.json", {"site": "resid.0"})
    with pytest.raises(InputError, match="differ in shape across steps"):
        site_development(RunDir(tmp_path), [1, 2], "resid.0", 0.7, None)
    with pytest.raises(MissingArtifactError, match="no SAE resid.0 at step 3"):
        site_development(RunDir(tmp_path), [1, 3], "resid.0", 0.7, None)


def test_the_hub_code_path_on_a_local_save_pretrained_folder(test_run, tmp_path):
    """model.source set to a save_pretrained folder: the corpus uses its tokenizer, and the SAE and circuit
    stages load it through the same from_pretrained call a hub id goes through."""
    from sfcd.circuits.stage import find_circuit
    from sfcd.data.corpus import build_corpus
    from sfcd.paths import RunDir
    from sfcd.sae.stage import train_saes

    source = RunDir(test_run.run_dir).model_step(24)
    base = ["experiment=test", f"run_dir={tmp_path / 'hubrun'}", f"model.source={source}"]
    from sfcd.models.loading import named_tokenizer

    run = build_corpus(compose(base), named_tokenizer(compose(base)))
    assert (run.tokenizer / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    with pytest.raises(ConfigError, match="needs step=<N>"):
        train_saes(compose([*base, "sae.sites=[resid.0]"]))
    (folder,) = train_saes(compose([*base, "step=24", "sae.sites=[resid.0]"]))
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == str(source) and folder.parent.name == "step24"
    out = find_circuit(compose([*base, "step=24", "circuit.sites=[resid.0]", "circuit.baselines=false"]))
    assert json.loads((out / "circuit.json").read_text())["metadata"]["step"] == 24


def test_study_with_saes_warm_started_from_the_previous_checkpoint(test_run, tmp_path):
    import shutil

    from sfcd.paths import RunDir
    from sfcd.study import run_study

    run = RunDir(test_run.run_dir)
    copy = tmp_path / "warm"
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("saes", "features", "circuits", "activations"))
    page = run_study(
        compose(
            [
                "experiment=test",
                f"run_dir={copy}",
                "study.steps=[16,24]",
                "study.seed_baseline=false",
                "sae.init=previous",
                "+study.features_at=last",
            ][:-1]
        )
    )
    assert page.exists()
    settings = json.loads((copy / "saes" / "step24" / "resid.0" / "cfg.json").read_text())
    assert settings["d_sae"] == 128
    with pytest.raises(ConfigError, match="sae.init='warm'"):
        run_study(compose(["experiment=test", f"run_dir={copy}", "sae.init=warm"]))
