"""The circuit method's rules (issue 20, item 5): the reference's shortest-length rule, evaluation pairs disjoint
from discovery pairs, resample ablation over the whole evaluation set, faithfulness only where it is resolvable,
strict JSON. Each is checked against an independent computation: a planted file, the plain model without
dictionaries, numpy on per-example metrics computed by plain forward passes."""

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sfcd.circuits.data import PairBatch, batches, metric
from sfcd.circuits.evaluate import Faithfulness
from sfcd.circuits.splice import last_logits
from sfcd.config import compose
from sfcd.data.tasks import Task, TaskPair, load_task, select_pairs
from sfcd.io import read_jsonl, write_json, write_jsonl
from sfcd.models.loading import load_model, load_tokenizer
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir
from sfcd.sae.io import load_sae


def strict_loads(text: str):
    """Python's json with the non-standard constants (NaN, Infinity) refused, as JSON.parse does."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# --- 1. multi-length task files: the reference's rule ---------------------------------------------------------


def planted_task(short_rows: set[int], n_rows: int = 30) -> Task:
    """Rows of 4 tokens, except ``short_rows`` of 3; every row usable."""
    pairs = [
        TaskPair(tuple(range(3 if i in short_rows else 4)), 1, tuple(range(3 if i in short_rows else 4)), 2, "", {}, i)
        for i in range(n_rows)
    ]
    return Task("planted", pairs, n_rows=n_rows)


def test_shortest_length_rule_is_the_reference_load_examples():
    # The reference (feature-circuits, data_loading_utils.py: load_examples, use_min_length_only=True, seed 12)
    # shuffles the file's lines with random.Random(12).shuffle, restarts its collection at a new shortest length,
    # skips longer pairs and returns as soon as it has n. Planted: the short rows sit at shuffled places 5, 9, 20
    # and 27, so the expected picks are read off the shuffled order by hand.
    # catches: no shuffle (file order), another seed, a longest-length rule, no restart, no early return
    order = list(range(30))
    random.Random(12).shuffle(order)  # the reference's own call on its list of lines
    short = {order[5], order[9], order[20], order[27]}
    task = planted_task(short)
    kept, info = select_pairs(task, 100, "shortest", 12)
    assert [p.index for p in kept] == [order[5], order[9], order[20], order[27]]
    assert info["lengths_kept"] == {"3": 4} and info["dropped_other_lengths"] == 26 and info["kept"] == 4
    assert info["lengths_available"] == {"3": 4, "4": 26}
    # n = 3: the first three shuffled lines are long and complete the collection before a short one is read
    kept, info = select_pairs(task, 3, "shortest", 12)
    assert [p.index for p in kept] == order[:3] and info["lengths_kept"] == {"4": 3}
    # n = 6: five long lines, then the short ones restart the collection (all four short ones are kept)
    kept, _ = select_pairs(task, 6, "shortest", 12)
    assert [p.index for p in kept] == [order[5], order[9], order[20], order[27]]
    # another seed, another order
    assert [p.index for p in select_pairs(task, 3, "shortest", 13)[0]] != order[:3]
    # "all": every length, the first n in the same shuffled order
    kept, info = select_pairs(task, 7, "all", 12)
    assert [p.index for p in kept] == order[:7] and info["left_beyond_n"] == 23
    # only the rows of one part of a split
    part = set(order[10:])
    kept, _ = select_pairs(task, 100, "shortest", 12, part)
    assert [p.index for p in kept] == [order[20], order[27]]


def test_loader_numbers_rows_and_names_the_file(tmp_path, tokenizer):
    # catches: a row index that skips dropped rows (the reference shuffles lines before filtering), no file hash
    rows = [
        {"clean_prefix": "The boy", "patch_prefix": "The boys", "clean_answer": " xylophones", "patch_answer": " are"},
        {"clean_prefix": "The boy", "patch_prefix": "The boys", "clean_answer": " is", "patch_answer": " are"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    task = load_task(path, tokenizer)
    assert [p.index for p in task.pairs] == [1] and task.n_rows == 2
    assert task.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and task.file == str(path)


# --- shared: the test run's model and SAEs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dicts(test_run, test_saes):
    run = RunDir(test_run.run_dir)
    model, tok = load_model(run.root), load_tokenizer(run.root)
    for p in model.parameters():
        p.requires_grad_(False)
    dicts = {parse_site(f.name, model): load_sae(f) for f in test_saes}  # resid.0 (the whole stream), mlp.1
    task = load_task(run.task_file("nounpp", "test"), tok)
    return model, dicts, task


@torch.no_grad()
def plain_metric(model, clean: torch.Tensor, clean_answer, patch_answer, run_on: torch.Tensor) -> torch.Tensor:
    """logit[clean answer] - logit[patch answer] of the plain model (no dictionaries) at the last position of
    ``run_on``: the independent computation."""
    batch = PairBatch(clean, clean, clean_answer, patch_answer)  # a patch, so that the metric is the pair's
    return -metric(last_logits(model, run_on), batch)


# --- 3. resample ablation over the whole evaluation set -------------------------------------------------------


def test_resample_draws_over_the_whole_set_whatever_the_batch_size(model_dicts):
    # Ablating every node of resid.0 (the whole residual stream after block 0, at every position) replaces the
    # stream with the source example's; everything downstream then is the plain model on the source's patch
    # prefix. So example i's F(empty) is the plain model's metric for i's answers on patch[source(i)].
    # catches: a permutation within each batch (sources and results change with batch_size), an example that
    # keeps its own values, sources of another example than the one recorded
    model, dicts, task = model_dicts
    n = 24
    runs = {}
    for bsz in (5, 24, 7):
        bs = batches(task, n, bsz)
        runs[bsz] = Faithfulness(model, dicts, bs, "resample", seed=3, z=-math.inf, floor=-math.inf)
    a = runs[24]
    src = a.ablation_info["sources"]
    assert sorted(src) == list(range(n)) and all(j != i for i, j in enumerate(src))  # a derangement
    assert any(src[i] // 5 != i // 5 for i in range(n))  # draws cross the batches of 5
    for bsz in (5, 7):
        assert runs[bsz].ablation_info["sources"] == src
        torch.testing.assert_close(runs[bsz].empty_i, a.empty_i, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    keep = {s: (torch.rand(d.d_sae, generator=g) < 0.3, False) for s, d in dicts.items()}
    assert runs[5](keep)["F_C"] == pytest.approx(runs[24](keep)["F_C"], abs=1e-5)
    (b,) = batches(task, n, n)
    expected = plain_metric(model, b.clean, b.clean_answer, b.patch_answer, b.patch[src])
    torch.testing.assert_close(a.empty_i, expected, atol=1e-4, rtol=1e-4)
    own = plain_metric(model, b.clean, b.clean_answer, b.patch_answer, b.patch)
    assert (own - expected).abs().max() > 1e-3  # the check can tell a source from the example itself
    assert runs[24].F_empty != pytest.approx(Faithfulness(model, dicts, [b], "resample", seed=4).F_empty, abs=1e-6)


# --- 4. resolvable faithfulness -------------------------------------------------------------------------------


def test_faithfulness_is_reported_only_where_resolvable(model_dicts):
    # Independent: M_i is the plain model's metric on each clean prefix; empty_i (resample, everything ablated)
    # the plain model on the source's patch prefix (see above); numpy gives the paired standard error. A z just
    # above |mean d| / se must make faithfulness null, one just below must report it.
    # catches: an unpaired error (the two variances added), the error of F(M) alone, n instead of n - 1, the
    # rule not applied (faithfulness reported anyway), completeness left when faithfulness is null
    model, dicts, task = model_dicts
    (b,) = batches(task, 24, 24)
    probe = Faithfulness(model, dicts, [b], "resample", seed=1, z=-math.inf, floor=-math.inf)
    m = plain_metric(model, b.clean, b.clean_answer, b.patch_answer, b.clean).double().numpy()
    e = plain_metric(model, b.clean, b.clean_answer, b.patch_answer, b.patch[probe.ablation_info["sources"]])
    d = m - e.double().numpy()
    se = d.std(ddof=1) / math.sqrt(len(d))
    ratio = abs(d.mean()) / se
    assert probe.se == pytest.approx(se, rel=1e-3) and ratio > 0.5
    keep = {s: (torch.ones(dd.d_sae, dtype=torch.bool), True) for s, dd in dicts.items()}
    above = Faithfulness(model, dicts, [b], "resample", seed=1, z=ratio * 1.05, floor=0)(keep)
    below = Faithfulness(model, dicts, [b], "resample", seed=1, z=ratio * 0.95, floor=0)(keep)
    assert above["faithfulness"] is None and above["completeness"] is None and above["resolvable"] is False
    assert above["F_M_minus_F_empty_se"] == pytest.approx(se, rel=1e-3)
    assert below["resolvable"] is True and below["faithfulness"] == pytest.approx(1.0)
    assert below["completeness"] == pytest.approx(0.0, abs=1e-6)
    floor = Faithfulness(model, dicts, [b], "resample", seed=1, z=0, floor=abs(d.mean()) * 1.05)(keep)
    assert floor["faithfulness"] is None  # the absolute floor alone


def test_stage_names_disjoint_pairs_and_writes_null_when_unresolvable(test_run, test_saes, tmp_path):
    # A task file given by path is split (seeded) into discovery and evaluation pairs. Independent check that
    # evaluation used the held-out rows: F(M) is the plain model's metric (a splice with error nodes changes
    # nothing) averaged over exactly the rows named as evaluation rows, read from the file by line.
    # catches: evaluation on the discovery pairs (today's behaviour), overlapping parts, the wrong file hash,
    # a split that changes with nothing, NaN written into circuit.json / faithfulness.json, a 0.8 entry where
    # faithfulness is null
    from sfcd.circuits.stage import find_circuit

    run = RunDir(test_run.run_dir)
    path = tmp_path / "nounpp_copy.jsonl"
    path.write_bytes(run.task_file("nounpp", "train").read_bytes())
    common = [
        "experiment=test",
        f"run_dir={test_run.run_dir}",
        "circuit.sites=[resid.0,mlp.1]",
        f"circuit.task={path}",
        "circuit.method=attrib",
        "circuit.edges=false",
        "circuit.baselines=false",
        "circuit.sweep_points=3",
        "circuit.n_examples=100",
        "circuit.resolve_z=1e9",  # nothing is resolvable at this z
    ]
    out = find_circuit(compose([*common, f"circuit.out_dir={tmp_path / 'a'}"]))
    text = (out / "circuit.json").read_text()
    c = strict_loads(text)
    strict_loads((out / "faithfulness.json").read_text())
    m = c["metadata"]
    disc, ev = m["pairs"]["discovery"], m["pairs"]["evaluation"]
    rows = read_jsonl(path)
    assert not set(disc["rows"]) & set(ev["rows"]) and len(disc["rows"]) + len(ev["rows"]) == len(rows)
    assert disc["n"] == m["n_examples"] and ev["n"] == m["n_eval_examples"] == len(ev["rows"]) > 0
    assert disc["sha256"] == ev["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert disc["file"] == ev["file"] == str(path)

    tok = load_tokenizer(run.root)
    model = load_model(run.root)

    def ids(text_, answer=False):
        return tok(text_, add_special_tokens=not answer)["input_ids"]

    held = [rows[i] for i in ev["rows"]]
    clean = torch.tensor([ids(r["clean_prefix"]) for r in held])
    patch = torch.tensor([ids(r["patch_prefix"]) for r in held])
    ca = torch.tensor([ids(r["clean_answer"], True)[0] for r in held])
    pa = torch.tensor([ids(r["patch_answer"], True)[0] for r in held])
    assert m["F_M"] == pytest.approx(plain_metric(model, clean, ca, pa, clean).mean().item(), abs=1e-4)
    found = [rows[i] for i in disc["rows"]]
    dclean = torch.tensor([ids(r["clean_prefix"]) for r in found])
    dca = torch.tensor([ids(r["clean_answer"], True)[0] for r in found])
    dpa = torch.tensor([ids(r["patch_answer"], True)[0] for r in found])
    assert abs(plain_metric(model, dclean, dca, dpa, dclean).mean().item() - m["F_M"]) > 1e-4  # tells them apart
    del patch

    assert m["resolvable"] is False and m["faithfulness"] is None and m["completeness"] is None
    assert "NaN" not in text and math.isfinite(m["resolution"]["F_M_minus_F_empty_se"])
    assert m["nodes_for_faithfulness_0.8"] == {"features": None}
    curves = strict_loads((out / "faithfulness.json").read_text())
    assert all(p["faithfulness"] is None for p in curves["features"])

    # seeded: the same parts again, other parts with another seed (the pairs alone, without the model)
    from sfcd.circuits.stage import circuit_pairs

    cfg = compose(common)
    assert circuit_pairs(run, cfg.circuit, tok, str(path))[4] == m["pairs"]
    cfg.circuit.seed = 5
    assert circuit_pairs(run, cfg.circuit, tok, str(path))[4]["evaluation"]["rows"] != ev["rows"]


def test_run_task_is_evaluated_on_its_test_file(test_run, tokenizer):
    # catches: a run's task split again instead of evaluated on its own test file
    from sfcd.circuits.stage import circuit_pairs

    run = RunDir(test_run.run_dir)
    cfg = compose(["experiment=test", f"run_dir={test_run.run_dir}"])
    *_, pairs = circuit_pairs(run, cfg.circuit, tokenizer, "nounpp")
    assert pairs["discovery"]["file"] == str(run.task_file("nounpp", "train"))
    assert pairs["evaluation"]["file"] == str(run.task_file("nounpp", "test"))
    assert pairs["evaluation"]["n"] == min(16, len(read_jsonl(run.task_file("nounpp", "test"))))
    assert pairs["discovery"]["rows"] == sorted(pairs["discovery"]["rows"]) and pairs["discovery"]["n"] == 16


# --- 5. strict JSON -------------------------------------------------------------------------------------------


def test_json_writer_is_strict(tmp_path):
    # catches: NaN / Infinity written as the non-standard constants (invalid JSON; JSON.parse rejects them), a
    # numpy or torch scalar left unconvertible, a finite value changed
    obj = {
        "a": float("nan"),
        "b": [1.5, float("inf"), -float("inf"), (2, float("nan"))],
        "c": {"d": np.float32("nan"), "e": np.float64(0.25), "f": torch.tensor(float("nan")), "g": np.int64(3)},
        "h": None,
        "i": True,
    }
    text = write_json(tmp_path / "x.json", obj).read_text()
    assert strict_loads(text) == {
        "a": None,
        "b": [1.5, None, None, [2, None]],
        "c": {"d": None, "e": 0.25, "f": None, "g": 3},
        "h": None,
        "i": True,
    }
    write_jsonl(tmp_path / "x.jsonl", [{"a": float("nan")}, {"a": 1.0}])
    assert [strict_loads(line) for line in Path(tmp_path / "x.jsonl").read_text().splitlines()] == [
        {"a": None},
        {"a": 1.0},
    ]


def test_mean_ablation_is_per_length(model_dicts, test_run):
    # Two lengths (the run's simple and nounpp test pairs). Ablating every node of resid.0 sets the whole stream
    # after block 0 to the mean of resid.0 over the patch prefixes of the example's own length, so example i's
    # F(empty) is the plain model with that stream (a plain forward hook, the mean from plain forward passes).
    # catches: the old aligned-from-start mean (a 3-token example averaged with the first 3 positions of the
    # 6-token ones), a mean over one batch, a mean over the clean prefixes
    from sfcd.models.sites import hooks

    model, dicts, nounpp = model_dicts
    run = RunDir(test_run.run_dir)
    simple = load_task(run.task_file("simple", "test"), load_tokenizer(run.root))
    pairs = simple.pairs[:6] + nounpp.pairs[:6]
    bs = batches(nounpp, 12, 4, pairs=pairs)
    assert sorted({b.clean.shape[1] for b in bs}) == [3, 6]
    resid0 = parse_site("resid.0", model)
    only = {resid0: dicts[resid0]}  # (mlp.1's mean is not the MLP of the mean stream)
    ev = Faithfulness(model, only, bs, "mean", z=-math.inf, floor=-math.inf)
    assert ev.ablation_info["examples_per_length"] == {"3": 6, "6": 6}
    got = []
    for T in (3, 6):
        group = [b for b in bs if b.clean.shape[1] == T]
        patch = torch.cat([b.patch for b in group])
        seen = {}
        with torch.no_grad(), hooks(model, {resid0: lambda x, s=seen: s.setdefault("x", x)}):
            model(patch)
        mean = seen["x"].mean(0, keepdim=True)
        for b in group:
            with torch.no_grad(), hooks(model, {resid0: lambda x, m=mean: m.expand_as(x)}):
                logits = model(b.clean).logits[:, -1]
            rows = torch.arange(len(b))
            got.append(logits[rows, b.clean_answer] - logits[rows, b.patch_answer])
    torch.testing.assert_close(ev.empty_i, torch.cat(got), atol=1e-4, rtol=1e-4)
