"""``features.transcoders=true``: dashboards of a checkpoint's transcoders, read at the MLP's input."""

from __future__ import annotations

import torch

from sfcd.config import compose


def test_transcoder_dashboards_read_the_mlp_input_and_write_to_the_mlp_output(own_run):
    """A transcoder's dashboard (features/step<N>/transcoders/mlp.1/): the activations of its top contexts equal
    sparsify's own SparseCoder on the MLP's input (read here with a plain hook on the layer norm before the MLP,
    on the context's tokens), and its logit effects are its sparsify decoder rows through the unembedding. Bug
    caught: the transcoder read at the MLP's output (the SAE's site). (Its decoder rows in output units:
    test_sparsify_computes_the_saved_transcoder.)"""
    from sparsify import SparseCoder
    from transformers import AutoModelForCausalLM

    from sfcd.features import api
    from sfcd.features.stage import build_features
    from sfcd.paths import RunDir
    from sfcd.sae.stage import train_saes

    base = ["experiment=test", f"run_dir={own_run.run_dir}"]
    train_saes(compose([*base, "sae.sites=[]", "sae.transcoders=[mlp.1]", "sae.n_tokens=4096", "sae.ce_tokens=0"]))
    over = ["features.saes=[resid.0]", "features.transcoders=true", "features.n_tokens=2048", "features.top_k=3"]
    over += ["features.window_left=64", "features.window_right=0", "features.logit_k=5"]  # whole prefixes shown
    outs = build_features(compose([*base, *over]))
    folder = outs[-1]
    assert folder.parent.name == "transcoders" and folder.name == "mlp.1"

    run = RunDir(own_run.run_dir)
    step = run.model_steps()[-1]
    coder = SparseCoder.load_from_disk(run.transcoders(step) / "mlp.1")
    model = AutoModelForCausalLM.from_pretrained(str(run.model_step(step))).eval()
    seen = {}
    hook = model.gpt_neox.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.update(x=o))
    index = api.load_index(folder)
    checked = 0
    try:
        for f in range(len(index["density"])):
            rec, _ = api.load_record(folder, f)
            for ctx in rec["top"][:1]:
                ids = torch.tensor([ctx["ids"][: ctx["at"] + 1]])
                with torch.no_grad():
                    model(ids)
                    out = coder.encode(seen["x"][0, -1:])
                acts = dict(zip(out.top_indices[0].tolist(), out.top_acts[0].tolist(), strict=True))
                assert abs(acts.get(f, 0.0) - ctx["acts"][ctx["at"]]) <= 1e-4 * max(1.0, abs(acts.get(f, 0.0)))
                checked += 1
            if f < 8:  # logit effects: the sparsify decoder row through the unembedding
                eff = coder.W_dec[f].detach() @ model.get_output_embeddings().weight.detach().t()
                top = eff.topk(5)
                assert [i for i, _ in rec["logits_pos"]] == top.indices.tolist()
                got = torch.tensor([v for _, v in rec["logits_pos"]])  # (4 decimals in the file)
                torch.testing.assert_close(got, top.values, atol=1e-4, rtol=1e-3)
    finally:
        hook.remove()
    assert checked >= 5
