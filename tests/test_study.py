"""The study: every stage over checkpoints, resumable after kill -9, the development analysis, the report."""

import functools
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from sfcd.config import compose
from sfcd.errors import ConfigError, InputError, MissingArtifactError
from tests.conftest import run_chromium

#: a study process that SIGKILLs itself at a fixed unit: the SAE training of one checkpoint, right after optimizer
#: step N (a Lightning callback added to that stage's call), so a test kills at the same point every time; argv:
#: <unit> <step> <sfcd args...> (unit: sae<checkpoint> | none)
_KILLING_STUDY = """
import os, signal, sys
import lightning as L
import sfcd.sae.stage
from sfcd.cli import main

class KillAt(L.Callback):
    def __init__(self, step):
        self.step = step
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

unit, at = sys.argv[1], int(sys.argv[2])
def wrap(module, name, when):
    inner = getattr(module, name)
    def wrapped(cfg, callbacks=None):
        return inner(cfg, [*(callbacks or []), KillAt(at)] if when(cfg) else callbacks)
    setattr(module, name, wrapped)
if unit.startswith("sae"):  # the main SAEs of that checkpoint (not its seed baseline, a sweep)
    wrap(sfcd.sae.stage, "train_saes", lambda c: c.step == int(unit[3:]) and not c.sae.sweep)
main(sys.argv[3:])
"""


def study(run_dir, *extra, kill: tuple[str, int] = ("none", 0)):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # a node threshold the micro model's effects (~1e-3) reach, so the circuits compared through training are not empty
    args = ["study", "experiment=test", f"run_dir={run_dir}", "circuit.node_threshold=5e-4", *extra]
    return subprocess.run(
        [sys.executable, "-c", _KILLING_STUDY, kill[0], str(kill[1]), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,  # a guard against a hung study only (about a minute on an idle machine)
    )


def trained_model(test_run, run_dir):
    """A run directory holding the shared run's corpus and trained model only (what `sfcd study` would train
    first, identically: the study's model stage skips a complete model)."""
    import shutil

    shutil.copytree(
        test_run.run_dir,
        run_dir,
        ignore=shutil.ignore_patterns("saes", "features", "circuits", "activations", "crosscoders", "development"),
    )
    return run_dir


def artifacts(run_dir) -> dict:
    """Every unit's output a resumed study must reproduce: the SAEs' weights and scores, the circuits' nodes,
    the development rows, the crosscoders' weights and their circuits' nodes and development."""
    from safetensors.torch import load_file

    def nodes(pattern):
        return {str(p.relative_to(run_dir)): json.loads(p.read_text())["nodes"] for p in run_dir.glob(pattern)}

    def weights(pattern):
        return {
            str(p.relative_to(run_dir)): {k: v.tolist() for k, v in load_file(str(p)).items()}
            for p in run_dir.glob(pattern)
        }

    return {
        "dev": json.loads((run_dir / "development" / "development.json").read_text())["sae_rows"],
        "circuits": nodes("circuits/*/step*/circuit.json"),
        "sae_fve": {
            str(p.relative_to(run_dir)): json.loads(p.read_text())["fve"] for p in run_dir.glob("saes/*/*/metrics.json")
        },
        "sae_weights": weights("saes/*/*/sae_weights.safetensors"),
        "crosscoder_weights": weights("crosscoders/*/crosscoder_weights.safetensors"),
        "crosscoder_circuits": nodes("crosscoders/circuits/*/step*/circuit.json"),
        "crosscoder_dev": json.loads((run_dir / "crosscoders" / "development.json").read_text()),
    }


@pytest.fixture(scope="module")
def reference_study(test_run, tmp_path_factory):
    """An uninterrupted study with crosscoders (study.crosscoder=true) on the shared run's model."""
    run_dir = trained_model(test_run, tmp_path_factory.mktemp("study") / "ref")
    p = study(run_dir, "study.crosscoder=true")
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


@functools.lru_cache(maxsize=64)
def _acts(folder) -> np.ndarray:
    """An SAE's activations [N, F] on the study's matching sample, computed here: the first study.match_tokens
    held-out tokens in windows of the model's length, special tokens left out, through the checkpoint's model
    (the SAE's step) and the SAE's own encode."""
    import sfcd
    from sfcd.data.tokens import read_tokens
    from sfcd.models.sites import parse_site, run_with_cache

    run, step = folder.parents[2], int(folder.parent.name.removeprefix("step"))
    cfg = compose(["experiment=test", f"run_dir={run}"])
    model, sae = sfcd.load_model(run, step=step), sfcd.load_sae(folder)
    n = cfg.study.match_tokens // cfg.model.seq_len
    val = np.asarray(read_tokens(run / "corpus" / "val.tokens"), dtype=np.int64)
    windows = torch.from_numpy(val[: n * cfg.model.seq_len].reshape(-1, cfg.model.seq_len))
    site = parse_site(json.loads((folder / "metrics.json").read_text())["site"], model)
    with torch.no_grad():
        a = run_with_cache(model, windows, [site])[site.name].flatten(0, 1)
        keep = ~torch.isin(windows.flatten(), torch.tensor(sfcd.load_tokenizer(run, step).all_special_ids))
        return sae.encode(a[keep].float()).double().numpy()


def _live(folder) -> np.ndarray:
    """An SAE's features matched by the study: those that fired at least study.match_min_fires (5) times on the
    matching sample."""
    return np.nonzero((_acts(folder) > 0).sum(0) >= 5)[0]


def _matches(a, b, threshold=0.7) -> dict[int, int]:
    """One-to-one matches (feature of SAE a -> feature of SAE b) of the live features of two SAE folders, by the
    Pearson correlation of their activations on the same tokens (numpy), with scipy's Hungarian on the full
    matrix; the pairs at or above ``threshold``."""
    from scipy.optimize import linear_sum_assignment

    la, lb = _live(a), _live(b)
    xa, xb = _acts(a)[:, la], _acts(b)[:, lb]
    corr = np.corrcoef(xa.T, xb.T)[: len(la), len(la) :]
    corr = np.clip(np.nan_to_num(corr), 0, None)
    r, c = linear_sum_assignment(-corr)
    return {int(la[i]): int(lb[j]) for i, j in zip(r, c, strict=True) if corr[i, j] >= threshold}


def _heat(dom: str, metric: str) -> dict[str, list[str]]:
    """The cells of one heatmap of the rendered report, read from its DOM: {row: [cell text per column]}."""
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.row, self.cell, self.rows = False, None, None, {}

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "table" and a.get("data-metric") == metric:
                self.inside = True
            elif self.inside and tag == "tr" and "data-row" in a:
                self.row = a["data-row"]
                self.rows[self.row] = []
            elif self.inside and self.row and tag == "td":
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag == "td" and self.cell is not None:
                self.rows[self.row].append(self.cell.strip())
                self.cell = None
            elif tag == "table":
                self.inside, self.row = False, None

    p = P()
    p.feed(dom)
    return p.rows


def test_study_writes_the_development_and_a_report_that_renders(reference_study, chromium):
    """The development's numbers against the stage files and computations made here: each SAE's scores are its
    metrics.json's (and the report's FVE heatmap shows them), live features and the share of the last SAE's
    live features matched at >= 0.7 come from the SAEs' own weights and densities (a Hungarian matching with
    scipy), circuit sizes are the circuit files', Jaccard with the last circuit is recomputed through those
    matchings (1 for the last circuit itself), and the crosscoder circuit's share of latents present at each
    step comes from the crosscoder's decoder norms. Bugs caught: rows read from another step's SAE, a matching
    read in the wrong direction, matchings composed in the wrong order, a heatmap showing another metric."""
    from safetensors.torch import load_file

    run = reference_study
    dev = json.loads((run / "development" / "development.json").read_text())
    steps = [8, 16, 24]
    assert dev["steps"] == steps and len(dev["sites"]) == 7
    sae = {(s, site): run / "saes" / f"step{s}" / site for s in steps for site in dev["sites"]}
    rows = {(r["step"], r["site"]): r for r in dev["sae_rows"]}
    assert set(rows) == set(sae)
    for (s, site), r in rows.items():
        m = json.loads((sae[s, site] / "metrics.json").read_text())
        assert [r[k] for k in ("fve", "l0", "ce_loss_score", "dead_fraction")] == [
            m[k] for k in ("fve", "l0", "ce_loss_score", "dead_fraction")
        ], (s, site)
        final = _live(sae[24, site])
        shared = len(_matches(sae[24, site], sae[s, site])) / len(final)
        assert r["shared_with_final"] == pytest.approx(shared, abs=1e-9), (s, site)
    for site, d in dev["sites"].items():
        assert d["live_features"] == [len(_live(sae[s, site])) for s in steps], site
        assert sum(d["first_step_counts"].values()) == d["live_features"][-1] > 0
    # a seed baseline at every step: the floor everywhere, and changes beyond it never above the raw counts
    for r in (r for r in dev["sae_rows"] if r["step"] > 8):
        for x in ("births", "deaths", "splits", "merges"):
            assert r[x] is not None and 0 <= r[x] <= r[f"{x}_raw"], (r["site"], r["step"], x)
    # circuits: sizes from the circuit files; Jaccard with the last circuit through the matchings composed back
    nodes = {
        s: {
            n["id"]
            for n in json.loads((run / "circuits" / "nounpp" / f"step{s}" / "circuit.json").read_text())["nodes"]
        }
        for s in steps
    }
    chain = {
        site: {s: _matches(sae[later, site], sae[s, site]) for s, later in ((16, 24), (8, 16))} for site in dev["sites"]
    }
    assert all(nodes[s] for s in steps)  # the Jaccard checks below compare circuits that have nodes
    for r in dev["circuits"]["nounpp"]:
        s = r["step"]
        assert r["n_nodes"] == len(nodes[s])
        carried = set()
        for nid in nodes[24]:
            site, _, feat = nid.partition("/")
            if feat == "eps":
                carried.add(nid)
                continue
            f = int(feat)
            for back in (x for x in (16, 8) if x >= s):
                f = chain[site][back].get(f) if f is not None else None
            if f is not None:
                carried.add(f"{site}/{f}")
        if carried | nodes[s]:
            assert r["jaccard_final"] == pytest.approx(len(carried & nodes[s]) / len(carried | nodes[s]), abs=1e-9), s
        else:  # two empty circuits (the micro model is near chance): no Jaccard, None rather than NaN
            assert r["jaccard_final"] is None, s
    last = dev["circuits"]["nounpp"][-1]
    if nodes[24]:  # the last circuit against itself
        assert last["jaccard_final"] == last["weighted_jaccard_final"] == 1.0
    # the report shows these numbers: its FVE heatmap (read from the rendered DOM) holds every SAE's metrics.json FVE
    dom = run_chromium(chromium, (run / "report.html").as_uri())
    assert "<h1>sfcd study: test</h1>" in dom and "<h2>Circuits at step 24</h2>" in dom
    heat = _heat(dom, "fve")
    assert set(heat) == set(dev["sites"])
    for site, cells in heat.items():
        want = [f"{json.loads((sae[s, site] / 'metrics.json').read_text())['fve']:.3f}" for s in steps]
        assert cells == want, site
    for name in ("training", "sae_fve", "shared_with_final", "lineage", "circuits"):  # each plot embedded as drawn
        assert (run / "development" / f"{name}.png").exists()
    assert dom.count("data:image/png;base64,") >= 7
    assert 'href="circuits/nounpp/step24/circuit.html"' in dom and "features/step24/resid.1/index.html" in dom
    # study.crosscoder: a crosscoder per resid site over the three steps; the share of the last crosscoder circuit's
    # latents present at each step (decoder norm >= 0.3 x the latent's largest), from the crosscoder's weights
    cc = json.loads((run / "crosscoders" / "development.json").read_text())
    assert cc["steps"] == steps and set(cc["sites"]) == {"resid.0", "resid.1"}
    circuit = json.loads((run / "crosscoders" / "circuits" / "nounpp" / "step24" / "circuit.json").read_text())
    latents = {(n["site"], n["feature"]) for n in circuit["nodes"] if n["feature"] is not None}
    assert sorted(cc["circuits"]["nounpp"]["latents"]) == sorted(f"{s}/{f}" for s, f in latents)
    norms = {
        site: load_file(str(run / "crosscoders" / site / "crosscoder_weights.safetensors"))["W_dec"].norm(dim=2)
        for site in cc["sites"]
    }
    rows = cc["circuits"]["nounpp"]["rows"]
    assert [r["step"] for r in rows] == steps
    for k, r in enumerate(rows):
        present = [bool(norms[s][f, k] >= 0.3 * norms[s][f].max()) for s, f in latents]
        assert r["share_present"] == (pytest.approx(np.mean(present), abs=1e-9) if latents else None), k
        assert "share_matched_saes" in r
    assert "<h2>Crosscoders across checkpoints</h2>" in dom and "share_matched_saes" in dom


def test_study_killed_mid_stage_resumes_to_the_same_artifacts(reference_study, test_run, tmp_path):
    """A study with crosscoders killed (SIGKILL) at a fixed point inside step 16's SAE training (after its 4th
    optimizer step, a state saved at step 4), then resumed, ends with the uninterrupted study's artifacts, bit for
    bit. Bugs caught: a resumed training that restarts its stream or forgets its state, a unit marked complete
    before its outputs are written, a resumed study that skips or repeats a unit differently. (A kill inside the
    crosscoders' training is the crosscoder stage's own test: tests/crosscoders/test_stage.py.)"""
    run = trained_model(test_run, tmp_path / "killed")
    p = study(run, "study.crosscoder=true", kill=("sae16", 5))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert all((run / "saes" / "step8" / site / "metrics.json").exists() for site in ("resid.0", "mlp.1"))
    assert (run / "saes" / "step16" / ".train").is_dir() and not list(run.glob("saes/step16/*/metrics.json"))
    assert not (run / "crosscoders").exists() and not (run / "report.html").exists()
    p = study(run, "study.crosscoder=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "report.html").exists()
    got, want = artifacts(run), artifacts(reference_study)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key


def test_study_errors(tmp_path, test_run):
    from sfcd.study import run_study

    with pytest.raises(ConfigError, match="study.tasks is empty"):
        run_study(compose(["experiment=test", f"run_dir={test_run.run_dir}", "study.tasks=[]"]))
    with pytest.raises(MissingArtifactError, match=r"study.steps \[5\] are not checkpoints.*\[0, 1, 2, 4, 8, 16, 24\]"):
        run_study(compose(["experiment=test", f"run_dir={test_run.run_dir}", "study.steps=[5,24]"]))
    # the matching's settings fail before any work (not after hours of SAEs): the model stage has not run
    fresh = tmp_path / "fresh"
    for bad, msg in (("study.match=cosine", "study.match='cosine'"), ("study.match_tokens=0", "match_tokens=0")):
        with pytest.raises(ConfigError, match=msg):
            run_study(compose(["experiment=test", f"run_dir={fresh}", bad]))
        assert not fresh.exists()


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
    """sae.init=previous: each checkpoint's SAE starts from the previous checkpoint's, so after its few training
    steps (8 Adam steps at lr 1e-3) feature i of the step-24 SAE is still feature i of the step-16 SAE: the same
    decoder direction at the same index (cosine near 1), where independently initialised SAEs (another seed per
    step) have unrelated directions at each index (cosine near 0 in 32 dimensions). Bug caught: the warm start
    not reaching the SAE (init_from dropped, or read from the wrong folder); the same for the transcoders
    (study.transcoders=true)."""
    from safetensors.torch import load_file

    from sfcd.study import run_study

    copy = trained_model(test_run, tmp_path / "warm")
    base = ["experiment=test", f"run_dir={copy}", "study.steps=[16,24]", "study.seed_baseline=false"]
    base += ["sae.sites=[resid.0]", "circuit.sites=[resid.0]"]
    # with transcoders: each step's transcoder starts from the previous step's too (sae.transcoder.init_from)
    assert run_study(compose([*base, "sae.init=previous", "study.transcoders=true", "study.tasks=[nounpp]"])).exists()
    w16, w24 = (
        load_file(str(copy / "saes" / f"step{s}" / "resid.0" / "sae_weights.safetensors"))["W_dec"] for s in (16, 24)
    )
    assert w24.shape == (128, 32)
    cos = torch.nn.functional.cosine_similarity(w16, w24, dim=1)
    assert cos.median() > 0.9, cos
    t16, t24 = (
        load_file(str(copy / "transcoders" / f"step{s}" / "mlp.1" / "sae.safetensors"))["W_dec"] for s in (16, 24)
    )
    cos = torch.nn.functional.cosine_similarity(t16, t24, dim=1)
    assert cos.median() > 0.9, cos
    with pytest.raises(ConfigError, match="sae.init='warm'"):
        run_study(compose([*base, "sae.init=warm"]))


def test_study_with_transcoders_graphs_the_agreement_pair_through_training(test_run, tmp_path):
    """study.transcoders=true: transcoders at every MLP beside the SAEs (their own folder, not among the SAE sites
    the development reads), the graph of the task's first equal-length pair and of its number-flipped twin at each
    step, and development.json's transcoders part. Each number node's activation on the twin is recomputed here
    with a plain hook on the MLP's layer norm and sparsify's own SparseCoder. Bugs caught: transcoder folders
    listed as SAE sites, the twin's activations read at another layer or position, graphs drawn at one step only."""
    from sparsify import SparseCoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfcd.study import run_study

    copy = trained_model(test_run, tmp_path / "tc")
    base = ["experiment=test", f"run_dir={copy}", "study.steps=[16,24]", "study.seed_baseline=false"]
    base += ["sae.sites=[resid.0]", "circuit.sites=[resid.0]", "study.tasks=[nounpp]", "study.transcoders=true"]
    base += ["graph.node_threshold=1.0", "graph.edge_threshold=1.0"]  # every node kept: number nodes to check
    page = run_study(compose(base))
    dev = json.loads((copy / "development" / "development.json").read_text())
    assert {r["site"] for r in dev["sae_rows"]} == {"resid.0"}
    tc = dev["transcoders"]
    assert [(r["site"], r["step"]) for r in tc["rows"]] == [("mlp.0", 16), ("mlp.0", 24), ("mlp.1", 16), ("mlp.1", 24)]
    assert all(r["fve"] is not None and r["sae_fve"] is None for r in tc["rows"])  # no SAE at the MLPs here
    g = tc["graph"]
    assert [r["step"] for r in g["per_step"]] == [16, 24]
    for name in ("nounpp-clean", "nounpp-flipped"):
        assert all((copy / "graphs" / name / f"step{s}" / "graph.json").exists() for s in (16, 24))
    nodes = g["number_nodes"]
    assert nodes, "every node kept: some feature changes with the subject's number"
    folder = copy / "model" / "step24"
    model, tok = AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    ids = torch.tensor([[tok.bos_token_id, *tok(g["pair"]["patch"], add_special_tokens=False)["input_ids"]]])
    seen = {}
    hooks = [
        model.gpt_neox.layers[i].post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, o[0])
        )
        for i in range(2)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    for n in nodes:
        coder = SparseCoder.load_from_disk(copy / "transcoders" / "step24" / n["site"])
        with torch.no_grad():
            out = coder.encode(seen[n["layer"]][n["position"]][None])
        got = dict(zip(out.top_indices[0].tolist(), out.top_acts[0].tolist(), strict=True)).get(n["latent"], 0.0)
        assert n["flipped"] == pytest.approx(got, abs=1e-4)
        assert n["onset"] in (16, 24)
    html = page.read_text()
    assert "Transcoders and attribution graphs" in html and "graphs/nounpp-clean/step24/graph.html" in html
