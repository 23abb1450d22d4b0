"""The dashboard in headless Chromium: it loads, sorts and opens a feature; markup in the corpus stays text."""

import re

import torch

from sfcd.features.dashboard import render
from tests.conftest import run_chromium


def rows(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<tr class="row[^"]*" data-id="(\d+)"', dom)]


def test_index_loads_sorts_and_opens_a_feature(chromium, test_features):
    import json

    page = test_features[1] / "index.html"
    data = json.loads((test_features[1] / "features.json").read_text())
    by_id = {f["id"]: f for f in data["features"]}
    dom = run_chromium(chromium, page.as_uri())
    assert rows(dom) == sorted(by_id)  # the index loads, by id
    assert "128 of 128 features" in dom
    dom = run_chromium(chromium, page.as_uri() + "#sort=max&dir=desc")
    order = rows(dom)
    assert len(order) == 128
    maxes = [by_id[i]["max"] for i in order]
    assert maxes == sorted(maxes, reverse=True) and order != sorted(order)
    dom = run_chromium(chromium, page.as_uri() + "#sort=density&dir=asc")
    dens = [by_id[i]["density"] for i in rows(dom)]
    assert dens == sorted(dens)
    live = next(f for f in data["features"] if f["top"])
    dom = run_chromium(chromium, page.as_uri() + f"#open={live['id']}")
    assert f"<h2>Feature {live['id']}</h2>" in dom
    assert "Top activating contexts" in dom and "Logit effects" in dom
    assert dom.count('class="ctx"') == len(live["top"]) + len(live["samples"])
    # search by token: exactly the features whose contexts or promoted tokens contain it
    from urllib.parse import quote

    text = {int(k): v for k, v in data["tokens"].items()}
    counts = {}
    for f in data["features"]:
        for i in {i for c in f["top"] for i in c["ids"]} | {i for i, _ in f["logits_pos"]}:
            counts[text[i].strip().lower()] = counts.get(text[i].strip().lower(), 0) + 1
    q = min((t for t in counts if t.isalpha()), key=lambda t: (abs(counts[t] - 20), t))
    expected = {
        f["id"]
        for f in data["features"]
        if any(
            q in text[i].lower() for i in [*(i for c in f["top"] for i in c["ids"]), *(i for i, _ in f["logits_pos"])]
        )
    }
    dom = run_chromium(chromium, page.as_uri() + f"#q={quote(q)}")
    assert set(rows(dom)) == expected and 0 < len(expected) < 128


MARKUP = [
    "<script>alert(1)</script>",
    "<img src=x onerror=\"document.title='pwned'\">",
    "</script><b>bold</b>",
    "&amp;",
]


def fake_data(tokens: dict[int, str]) -> dict:
    ids = list(tokens)
    feat = {
        "id": 0,
        "density": 0.5,
        "max": 1.0,
        "mean": 0.5,
        "hist": [1] * 50,
        "flags": ["token: " + MARKUP[0]],
        "top": [{"ids": ids, "acts": [0.5] * len(ids), "at": 0}],
        "samples": [],
        "logits_pos": [[i, 1.0] for i in ids],
        "logits_neg": [[i, -1.0] for i in ids],
    }
    return {
        "summary": {},
        "summary_text": MARKUP[1],
        "hist_range": [-3, 2],
        "hist_bins": 50,
        "tokens": {str(i): t for i, t in tokens.items()},
        "features": [feat],
    }


def test_markup_in_tokens_is_shown_as_text(chromium, tmp_path):
    page = tmp_path / "index.html"
    page.write_text(render(fake_data(dict(enumerate(MARKUP))), "features <i>x</i>"))
    source = page.read_text()
    for m in MARKUP[:3]:
        assert m not in source  # never in the page source as markup
    dom = run_chromium(chromium, page.as_uri() + "#open=0")
    assert "<title>features &lt;i&gt;x&lt;/i&gt;</title>" in dom and "pwned" not in dom.split("</title>")[0]
    assert "<b>bold</b>" not in dom and "<img" not in dom
    assert dom.count("<script") == 2  # the page's own data and code, nothing injected
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # shown as text


def test_markup_in_a_corpus_end_to_end(chromium, tmp_path):
    """A corpus with markup -> tokenizer -> model -> SAE -> features: the dashboard shows it as text."""
    from sfcd.config import compose
    from sfcd.data.corpus import build_corpus, corpus_tokenizer
    from sfcd.features.stage import build_features
    from sfcd.io import write_json
    from sfcd.models.presets import neox_config
    from sfcd.sae.io import save_sae
    from sfcd.sae.topk import TopKSAE

    corpus = tmp_path / "markup.txt"
    corpus.write_text("".join(f"the cat says {m} to the dog.\n\n" for m in MARKUP) * 200)
    cfg = compose(
        [
            "experiment=test",
            "corpus=text",
            f"corpus.path={corpus}",
            f"run_dir={tmp_path / 'run'}",
            "corpus.n_tokens=20000",
            "corpus.val_tokens=4000",
            "corpus.vocab_size=400",
            "features.n_tokens=2048",
            "sae.exclude_special=false",
        ]
    )
    run = build_corpus(cfg)
    tok = corpus_tokenizer(run)
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(neox_config(cfg.model, len(tok)))
    model.save_pretrained(run.model_step(0))
    tok.save_pretrained(run.model_step(0))
    sae = TopKSAE(32, 64, k=8)
    folder = run.root / "saes" / "step0" / "resid.0"
    save_sae(sae, folder, {"sfcd_site": "resid.0"})
    write_json(folder / "metrics.json", {"site": "resid.0"})
    (out,) = build_features(cfg)
    source = (out / "index.html").read_text()
    assert "<script>alert" not in source and "<img src" not in source
    # the markup's tokens are in the page's token table, and some feature shows them
    data_tokens = "".join(re.findall(r"\\u003c|script|img|onerror", source))
    assert "script" in data_tokens and "\\u003c" in data_tokens
    dom = run_chromium(chromium, (out / "index.html").as_uri() + "#sort=max")
    assert dom.count("<script") == 2 and "<img" not in dom and "pwned" not in dom.split("</title>")[0]
    assert len(rows(dom)) == 64  # every feature of the SAE is listed
