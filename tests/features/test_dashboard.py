"""The dashboard: its files read back as written (index and shards), and in headless Chromium it loads, sorts,
filters, searches and opens features from their shard files; markup in the corpus stays text."""

import re

import numpy as np
import pytest
import torch

from sfcd.errors import MissingArtifactError
from sfcd.features.dashboard import read_shard, write_dashboard
from tests.conftest import run_chromium


def rows(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<tr class="row[^"]*" data-id="(\d+)"', dom)]


def all_records(folder) -> tuple[list[dict], dict[int, str]]:
    """Every record of a dashboard folder, read straight from its shard files, and every token's text."""
    recs, text = [], {}
    for path in sorted((folder / "feats").glob("shard_*.js")):
        data = read_shard(path)
        recs += data["features"]
        text.update({int(k): v for k, v in data["tokens"].items()})
    return recs, text


def test_index_loads_sorts_and_opens_a_feature(chromium, test_features):
    import json

    page = test_features[1] / "index.html"
    index = json.loads((test_features[1] / "index.json").read_text())
    feats, text = all_records(test_features[1])
    assert [f["id"] for f in feats] == list(range(128))
    dom = run_chromium(chromium, page.as_uri())
    assert rows(dom) == list(range(128))  # the index loads, by id
    assert "128 of 128 features" in dom
    dom = run_chromium(chromium, page.as_uri() + "#sort=max&dir=desc")
    order = rows(dom)
    assert len(order) == 128
    maxes = [index["max"][i] for i in order]
    assert maxes == sorted(maxes, reverse=True) and order != sorted(order)
    assert maxes == sorted((f["max"] for f in feats), reverse=True)  # the index's values are the records'
    live = next(f for f in feats if f["top"])
    dom = run_chromium(chromium, page.as_uri() + f"#open={live['id']}")
    assert f"<h2>Feature {live['id']}</h2>" in dom
    assert "Top activating contexts" in dom and "Logit effects" in dom
    assert dom.count('class="ctx"') == len(live["top"]) + len(live["samples"])
    # search by token: exactly the features whose top contexts' activating tokens or top-3 promoted tokens hold it
    from urllib.parse import quote

    def keys(f):
        return {c["ids"][c["at"]] for c in f["top"]} | {i for i, _ in f["logits_pos"][:3]}

    counts = {}
    for f in feats:
        for i in keys(f):
            counts[text[i].strip().lower()] = counts.get(text[i].strip().lower(), 0) + 1
    q = min((t for t in counts if t.isalpha()), key=lambda t: (abs(counts[t] - 20), t))
    expected = {f["id"] for f in feats if any(q in text[i].lower() for i in keys(f))}
    dom = run_chromium(chromium, page.as_uri() + f"#q={quote(q)}")
    assert set(rows(dom)) == expected and 0 < len(expected) < 128


def planted(n: int, seed: int = 0) -> tuple[list[dict], dict[int, str]]:
    """``n`` feature records with known flags, densities, contexts and logit effects, and their tokens' text:
    every 11th feature dead, every 7th other one ultra-low, every 5th other one a token feature."""
    rng = np.random.default_rng(seed)
    vocab = {i: f"w{i}" for i in range(300)}
    vocab[7] = "<b>x</b>"
    recs = []
    for f in range(n):
        dead = f % 11 == 0
        flags = ["dead"] if dead else ["ultra-low"] if f % 7 == 0 else []
        if not dead and f % 5 == 0:
            flags.append(f"token: {vocab[f % 300]}")

        def ctx():
            k = int(rng.integers(3, 7))
            acts = [float(f"{a:.5g}") for a in rng.random(k)]
            return {"ids": rng.integers(0, 300, k).tolist(), "acts": acts, "at": int(rng.integers(0, k))}

        recs.append(
            {
                "id": f,
                "density": 0.0 if dead else float(f"{rng.random() * 1e-2:.5g}"),
                "max": 0.0 if dead else float(f"{rng.random() * 10:.5g}"),
                "mean": 0.0 if dead else float(f"{rng.random():.5g}"),
                "hist": rng.integers(0, 9, 50).tolist(),
                "flags": flags,
                "top": [] if dead else [ctx() for _ in range(int(rng.integers(1, 5)))],
                "samples": [] if dead else [ctx() for _ in range(int(rng.integers(0, 3)))],
                "logits_pos": [
                    [int(i), round(float(v), 4)] for i, v in zip(rng.integers(0, 300, 4), rng.random(4), strict=True)
                ],
                "logits_neg": [
                    [int(i), -round(float(v), 4)] for i, v in zip(rng.integers(0, 300, 4), rng.random(4), strict=True)
                ],
            }
        )
    return recs, vocab


def write_planted(folder, recs, vocab, shard_size):
    import copy

    meta = {"summary": {"d_sae": len(recs)}, "summary_text": "planted", "hist_range": [-3, 2], "hist_bins": 50}
    return write_dashboard(folder, copy.deepcopy(recs), len(recs), meta, "planted", vocab.__getitem__, shard_size)


def test_dashboard_index_round_trip(tmp_path):
    # catches: a shard's features off by one or in the wrong file (the last, short shard included), a token's
    # text missing from its shard, index columns out of step with the records, notes read from the wrong feature
    from sfcd.features import api

    recs, vocab = planted(45)
    folder = tmp_path / "features" / "step3" / "resid.1"
    w = write_planted(folder, recs, vocab, shard_size=8)
    assert sorted(p.name for p in (folder / "feats").iterdir()) == [f"shard_{n:04d}.js" for n in range(6)]
    assert w.bytes_largest_shard == max(p.stat().st_size for p in (folder / "feats").iterdir())
    for f in (0, 7, 8, 40, 44):  # shard edges, and the last shard (5 features)
        assert api.load_record(folder, f)[0] == recs[f]
    for f in range(45):
        rec = api.feature(tmp_path, 3, "resid.1", f)
        c = recs[f]
        assert [x["tokens"] for x in rec["top"]] == [[vocab[i] for i in x["ids"]] for x in c["top"]]
        assert [x["tokens"] for x in rec["samples"]] == [[vocab[i] for i in x["ids"]] for x in c["samples"]]
        assert rec["logits_neg"] == [(vocab[i], v) for i, v in c["logits_neg"]]
    index = api.load_index(folder)
    assert index["density"] == [r["density"] for r in recs] and index["max"] == [r["max"] for r in recs]
    assert index["flags"] == [r["flags"] for r in recs]
    assert index["label"] == [r["top"][0]["ids"][r["top"][0]["at"]] if r["top"] else -1 for r in recs]
    assert all(index["tokens"][str(i)] == vocab[i] for i in index["label"] if i >= 0)
    assert api.summary(tmp_path, 3, "resid.1") == {"d_sae": 45}
    with pytest.raises(MissingArtifactError, match="out of range"):
        api.feature(tmp_path, 3, "resid.1", 45)
    notes = api.feature_notes(folder)
    assert sorted(notes) == [r["id"] for r in recs if r["top"]] and 0 not in notes
    for f in (1, 9, 43):
        top = recs[f]["top"]
        words = [[vocab[i] for i in c["ids"]] for c in top[:3]]
        for c, ws in zip(top[:3], words, strict=True):
            ws[c["at"]] = f"[{ws[c['at']]}]"
        assert notes[f] == {
            "label": vocab[top[0]["ids"][top[0]["at"]]],
            "density": recs[f]["density"],
            "contexts": ["".join(ws) for ws in words],
        }
    # rewritten with fewer features: the old shards beyond go, and the API reads the new files
    write_planted(folder, recs[:10], vocab, shard_size=8)
    assert len(list((folder / "feats").iterdir())) == 2 and api.load_index(folder)["d_sae"] == 10
    assert api.feature_notes(tmp_path / "nothing") == {}


def test_dashboard_in_chromium_at_many_shards(chromium, tmp_path):
    # catches: the page loading the wrong shard (or none) for a feature, filters that do not match the flags,
    # search by id, sorting by density, the index listing more rows than it says
    recs, vocab = planted(600, seed=1)
    folder = tmp_path / "dash"
    write_planted(folder, recs, vocab, shard_size=64)  # 10 shard files, the last one short
    page = (folder / "index.html").as_uri()
    dom = run_chromium(chromium, page)
    assert rows(dom) == list(range(500)) and "600 of 600 features (first 500 shown)" in dom

    def ids(want, key=lambda r: r["id"], reverse=False):
        return [r["id"] for r in sorted((r for r in recs if want(r)), key=key, reverse=reverse)]

    dom = run_chromium(chromium, page + "#filter=ultra-low&sort=density&dir=asc")
    assert rows(dom) == ids(lambda r: "ultra-low" in r["flags"], key=lambda r: (r["density"], r["id"]))
    dom = run_chromium(chromium, page + "#filter=token&sort=max")  # max, descending
    assert rows(dom) == ids(lambda r: any(x.startswith("token:") for x in r["flags"]), lambda r: -r["max"])
    dom = run_chromium(chromium, page + "#filter=dead")
    assert rows(dom) == ids(lambda r: "dead" in r["flags"]) == list(range(0, 600, 11))
    dom = run_chromium(chromium, page + "#q=586&open=586")  # by id (no token holds "586"); 586 is in the last shard
    assert rows(dom) == [586]
    f = recs[586]
    assert "<h2>Feature 586</h2>" in dom
    shown = re.findall(r'<div class="ctx">(.*?)</div>', dom)
    assert len(shown) == len(f["top"]) + len(f["samples"])
    for html_ctx, c in zip(shown, f["top"] + f["samples"], strict=True):
        words = re.findall(r"<span[^>]*>(.*?)</span>", html_ctx)
        assert words == [vocab[i].replace("<", "&lt;").replace(">", "&gt;") for i in c["ids"]]
    assert 'src="feats/shard_0009.js"' in dom


MARKUP = [
    "<script>alert(1)</script>",
    "<img src=x onerror=\"document.title='pwned'\">",
    "</script><b>bold</b>",
    "&amp;",
]


def fake_record(ids: list[int]) -> dict:
    return {
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


def test_markup_in_tokens_is_shown_as_text(chromium, tmp_path):
    tokens = dict(enumerate(MARKUP))
    meta = {"summary": {}, "summary_text": MARKUP[1], "hist_range": [-3, 2], "hist_bins": 50}
    write_dashboard(tmp_path, [fake_record(list(tokens))], 1, meta, "features <i>x</i>", tokens.__getitem__)
    page = tmp_path / "index.html"
    for source in (page.read_text(), (tmp_path / "feats" / "shard_0000.js").read_text()):
        for m in MARKUP[:3]:
            assert m not in source  # never in the page source or the shard as markup
    dom = run_chromium(chromium, page.as_uri() + "#open=0")
    assert "<title>features &lt;i&gt;x&lt;/i&gt;</title>" in dom and "pwned" not in dom.split("</title>")[0]
    assert "<b>bold</b>" not in dom and "<img" not in dom
    # the page's own data and code, and the shard it loaded; nothing injected
    assert dom.count("<script") == 3 and 'src="feats/shard_0000.js"' in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # shown as text
    assert dom.count('class="ctx"') == 1  # the feature was opened


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
    source = (out / "index.html").read_text() + "".join(p.read_text() for p in (out / "feats").iterdir())
    assert "<script>alert" not in source and "<img src" not in source
    # the markup's tokens are in the shards' token tables, and some feature shows them
    data_tokens = "".join(re.findall(r"\\u003c|script|img|onerror", source))
    assert "script" in data_tokens and "\\u003c" in data_tokens
    dom = run_chromium(chromium, (out / "index.html").as_uri() + "#sort=max")
    assert dom.count("<script") == 2 and "<img" not in dom and "pwned" not in dom.split("</title>")[0]
    assert len(rows(dom)) == 64  # every feature of the SAE is listed
