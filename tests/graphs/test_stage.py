"""``sfcd graph`` end to end on a tiny run directory built here (a 2-layer GPT-NeoX, its tokenizer, transcoders)."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from sfcd.config import compose
from sfcd.data.tokenizer import train_bpe
from sfcd.errors import MissingArtifactError
from sfcd.graphs.stage import build_graphs, slug
from sfcd.io import write_json
from sfcd.sae.io import save_transcoder
from tests.graphs.helpers import transcoders
from tests.test_cli import assert_one_line_error, sfcd  # noqa: F401 - the CLI fixture

PROMPT = "The athlete <script>alert(1)</script> that the chefs"


@pytest.fixture
def tiny_run(tmp_path):
    """run/model/step10 and step20 (same weights) with the tokenizer; transcoders complete at step 10, only
    mlp.0 at step 20."""
    texts = ["The athlete that the chefs like runs", "<script>alert(1)</script> & the chefs", "a b c d e"] * 20
    tok = train_bpe(texts, 300)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    run = tmp_path / "run"
    for step in (10, 20):
        model.save_pretrained(run / "model" / f"step{step}")
        tok.save_pretrained(run / "model" / f"step{step}")
    tcs = transcoders(model)
    for step, layers in ((10, (0, 1)), (20, (0,))):
        for layer in layers:
            folder = save_transcoder(tcs[layer], run / "transcoders" / f"step{step}" / f"mlp.{layer}")
            write_json(folder / "metrics.json", {"fvu": 0.5})
    return run


def _strict(text: str):
    def reject(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_stage_writes_graph_json_and_html(tiny_run):
    # catches: NaN written bare, links to nodes that are not in the graph, tokens or scores missing, a prompt's
    # markup read as HTML, a step with incomplete transcoders graphed
    cfg = compose([f"run_dir={tiny_run}", f"graph.prompt={json.dumps(PROMPT)}", "graph.batch_size=16"])
    outs = build_graphs(cfg)
    assert outs == [tiny_run / "graphs" / slug(PROMPT) / "step10"]  # step 20 lacks mlp.1: skipped
    g = _strict((outs[0] / "graph.json").read_text())
    m = g["metadata"]
    assert m["prompt"] == PROMPT and m["step"] == 10 and m["token_ids"][0] == 0
    assert "".join(m["tokens"][1:]) == PROMPT
    assert 0 <= m["replacement_score"] <= 1 and 0 <= m["completeness_score"] <= 1
    assert abs(sum(lg["probability"] for lg in m["logits"]) - 1) < 1 or len(m["logits"]) == 10
    kinds = {n["kind"] for n in g["nodes"]}
    assert {"token", "logit"} <= kinds
    assert sum(n["kind"] == "token" for n in g["nodes"]) == len(m["tokens"])
    ids = {n["id"] for n in g["nodes"]}
    assert len(ids) == len(g["nodes"])
    assert g["links"] and all(e["source"] in ids and e["target"] in ids for e in g["links"])
    for n in g["nodes"]:
        if n["kind"] == "feature":
            assert n["position"] >= 1 and n["activation"] > 0 and 0 <= n["layer"] < 2
    page = (outs[0] / "graph.html").read_text()
    assert len(re.findall(r"<script", page, re.I)) == 2  # the page's own data and code, nothing from the prompt
    assert "alert(1)</script>" not in page
    assert html.escape(repr(PROMPT)) in page  # the title, escaped
    data = page.split("<script id='sfcd-data' type='application/json'>")[1].split("</script>")[0]
    embedded = _strict(data)
    assert embedded["graph"]["metadata"]["tokens"] == m["tokens"]


def test_named_step_with_missing_transcoders_is_a_one_line_error(tiny_run, sfcd):  # noqa: F811
    # catches: a step whose MLP 1 has no transcoder graphed anyway (or failing with a traceback)
    p = sfcd("graph", f"run_dir={tiny_run}", "step=20")
    assert_one_line_error(p, "mlp.1", "sae.transcoders=[mlp]")


def test_no_transcoders_at_all(tiny_run):
    # catches: an empty transcoders folder read as "nothing to do" instead of an error that says what to run
    shutil.rmtree(tiny_run / "transcoders")
    with pytest.raises(MissingArtifactError, match="sae.transcoders=\\[mlp\\]"):
        build_graphs(compose([f"run_dir={tiny_run}"]))


def test_graph_page_draws_the_graph_in_chromium(tiny_run, chromium, tmp_path):
    """graph.html after headless Chromium ran its scripts: every kept node and link drawn (the count line and the
    SVG elements agree with graph.json), the tokens as column labels, and the prompt's markup only as text. Bugs
    caught: a script error (nothing drawn), nodes or edges filtered by the default sliders, the prompt's
    ``<script>`` run or turned into elements."""
    from tests.conftest import run_chromium

    cfg = compose([f"run_dir={tiny_run}", f"graph.prompt={json.dumps(PROMPT)}", "graph.batch_size=16"])
    out = shutil.copytree(build_graphs(cfg)[0], tmp_path / "g")
    g = json.loads((out / "graph.json").read_text())
    dom = run_chromium(chromium, (out / "graph.html").as_uri())
    n, e = len(g["nodes"]), len(g["links"])
    assert f"{n} of {n} nodes, {e} of {e} edges" in dom
    body = dom.split("<body>")[1].split("sfcd-data")[0]
    assert len(re.findall(r'class="node"', body)) == n and len(re.findall(r'class="edge"', body)) == e
    assert "<script>alert" not in body  # shown as text only
