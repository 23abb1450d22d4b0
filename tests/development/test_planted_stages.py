"""The planted ground truth through the real stages, small: the corpus stage plants the construction, the SAE and
crosscoder stages train on two checkpoints, and the scoring of benchmarks/planted_development.py
(sfcd/development/groundtruth.py) dates it.

What the model "learned" is planted in its weights, so the answer is known without training a model that learns
a construction (that takes the benchmark's ~10 minutes): checkpoint A is the micro model at its initialisation, with
the control's words given their structure (one direction for each class of its words: singular nouns, plural
nouns, and the verb forms that agree with each, which training on an agreement construction tells apart) and the
planted words untouched, never trained; checkpoint B is A with the planted words given the same kind of structure.
Every stage from there on is the real one: the construction's SAE features and crosscoder latents (each checkpoint
read alone) must appear at B and not at A, with the SAE features at B new by the development analysis's own
matching; the control's must be there at both.
"""

from __future__ import annotations

import shutil

import pytest
import torch

A, B, S = 8, 16, 12  # checkpoint A = step 8, before the planted step 12; B = 16, after it


@pytest.fixture(scope="module")
def planted_stages(tmp_path_factory):
    from sfcd.config import compose
    from sfcd.crosscoders.stage import train_crosscoders
    from sfcd.data.corpus import build_corpus, corpus_tokenizer
    from sfcd.development import groundtruth as G
    from sfcd.models.presets import random_checkpoint
    from sfcd.sae.stage import train_saes

    rd = tmp_path_factory.mktemp("planted_stages") / "run"
    base = [
        "experiment=test",
        f"run_dir={rd}",
        f"corpus.planted.step={S}",
        "corpus.planted.weight=0.3",
        "corpus.planted.control_weight=0.3",
    ]
    cfg = compose(base)
    run = build_corpus(cfg)
    kinds = G.planted_meta(run)["token_ids"]
    classes = G.planted_classes(kinds)

    from transformers import AutoModelForCausalLM

    # checkpoint A: the micro model at its initialisation (every embedding as the planted words' are before S)
    random_checkpoint(rd / "model" / f"step{A}", cfg.model, corpus_tokenizer(run))
    model = AutoModelForCausalLM.from_pretrained(str(rd / "model" / f"step{A}"))
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)  # seeds 0-5 tried: every assertion below holds at each
    scale = float(emb.norm(dim=1).mean())

    def learn(kind: str) -> None:
        """Give ``kind``'s words the structure training gives them: a direction for each class (role and number)."""
        names = list(dict.fromkeys(classes[kind]))
        dirs = dict(zip(names, torch.linalg.qr(torch.randn(emb.shape[1], len(names), generator=g))[0].T, strict=True))
        with torch.no_grad():
            for tid, c in zip(kinds[kind], classes[kind], strict=True):
                emb[tid] = scale * (dirs[c] + 0.15 * torch.randn(emb.shape[1], generator=g) / emb.shape[1] ** 0.5)

    learn("control")
    model.save_pretrained(str(rd / "model" / f"step{A}"))
    shutil.copytree(rd / "model" / f"step{A}", rd / "model" / f"step{B}")
    learn("planted")
    model.save_pretrained(str(rd / "model" / f"step{B}"))

    budget = ["sae.n_tokens=131072", "sae.k=4", "crosscoder.n_tokens=32768", "crosscoder.k=4"]
    budget += ["crosscoder.batch_size=128", "crosscoder.lr=0.003"]
    for step in (A, B):  # each step's SAE seeded by its step, as the study seeds them (no shared initialisation)
        train_saes(compose([*base, *budget, "sae.sites=[embed]", f"step={step}", f"sae.seed={step}"]))
    train_crosscoders(compose([*base, *budget, "crosscoder.sites=[embed]", f"crosscoder.steps=[{A},{B}]"]))
    return cfg, run, kinds, classes


def _read(planted_stages, encoders):
    """{step: {kind: the construction's features}} for ``encoders`` {step: encode}, on the held-out windows."""
    import sfcd
    from sfcd.data.tokens import read_tokens
    from sfcd.development import groundtruth as G

    cfg, run, kinds, classes = planted_stages
    windows = G.held_out_windows(read_tokens(run.tokens("val")), cfg.model.seq_len, cfg.corpus.val_tokens)
    out = {}
    for step, encode in encoders.items():
        model = sfcd.load_model(run.root, step=step)
        c = G.concentration(encode, G.stream([model], "embed", windows, (0, 1)), kinds, classes)
        out[step] = {k: c.features(k) for k in kinds}
    return out


def test_saes_date_the_planted_construction_and_matching_calls_its_features_new(planted_stages):
    # catches: the corpus stage's planted token ids or the structure rule's classes out of step with the words
    # (no class-following features at B, or the control's missing); SAEs read from the wrong checkpoint (B's
    # features at A); the development analysis's lineage carrying the new features back to A through matches below
    # the threshold (by either matching)
    import sfcd
    from sfcd.development import groundtruth as G
    from sfcd.development.analysis import site_development, site_signatures
    from sfcd.development.findings import first_steps
    from sfcd.development.saes import sae_folder

    cfg, run, _, _ = planted_stages
    found = _read(planted_stages, {s: sfcd.load_sae(sae_folder(run, s, "embed")).encode for s in (A, B)})
    steps = [A, B]
    assert G.onset(steps, [bool(found[s]["planted"]) for s in steps]) == B == G.first_after(steps, S), found
    assert G.onset(steps, [bool(found[s]["control"]) for s in steps]) == A, found
    # the SAEs' own dates under both matchings of the development analysis (activation correlation, the study's
    # default, and decoder cosine): a planted feature of B is not a feature of A's SAE. (That the control's are
    # carried needs SAEs larger than these micro ones: benchmarks/planted_development.py measures it.)
    thr = cfg.study.shared_threshold
    for sig in (site_signatures(cfg, run, steps, "embed", {}), None):
        dev = site_development(run, steps, "embed", thr, None, signatures=sig)
        assert set(first_steps(steps, dev["matchings"], found[B]["planted"], thr)) == {B}, dev["matched_by"]


def test_crosscoder_read_one_checkpoint_at_a_time_dates_it_and_its_decoder_norms_do_not(planted_stages):
    # catches: a checkpoint's view built from another checkpoint's block (the views' order swapped: B's planted
    # latents then read at A); and shows why the view is the reading: the decoder-norm emergence dates them at A
    from safetensors.torch import load_file

    import sfcd
    from sfcd.crosscoders.view import alone_view
    from sfcd.development import groundtruth as G

    _, run, _, _ = planted_stages
    folder = run.root / "crosscoders" / "embed"
    cc = sfcd.load_crosscoder(folder)
    assert list(cc.cfg["steps"]) == [A, B]
    found = _read(planted_stages, {s: alone_view(cc, m).encode for m, s in enumerate([A, B])})
    # at B the construction has latents; at A, where its words are untrained tokens, none. A latent's encoder
    # block for A can learn to recognise the words' random embeddings from what B gives it (seed 3 here without
    # the coherence rule: one latent at A, on words that follow their classes); the coherence rule keeps it out,
    # as those words share no direction at A
    assert G.onset([A, B], [bool(found[s]["planted"]) for s in (A, B)]) == B, found
    assert found[A]["control"] and found[B]["control"], found
    # the crosscoder's own emergence (decoder norm >= 0.3 of its largest from a checkpoint on) puts B's planted
    # latents at A too: their decoder at A holds the words' untrained embeddings (why the view above is used)
    emerged = load_file(str(folder / "latents.safetensors"))["emerged"]
    assert all(int(emerged[j]) == 0 for j in found[B]["planted"]), [int(emerged[j]) for j in found[B]["planted"]]
