"""circuit-tracer 0.5.0's side of the check: the same model, transcoders and token ids run through circuit-tracer's
own code (a TransformerLens HookedTransformer with circuit-tracer's replacement hooks, ``circuit_tracer.attribute``
with no pruning, ``compute_graph_scores``). Reads ``<out>/sfcd_graph.npz`` for the token ids and the Hugging Face
activations to cross-check against; writes ``<out>/tokenizer_tf4/`` and ``<out>/ct_graph.npz``.

Run with circuit-tracer's venv (torch 2.13.0, circuit-tracer 0.5.0, transformer-lens 3.2.1, transformers 4.57.3),
never with sfcd's. Three conversions matter for identical graphs:

* The transcoders' input hook is circuit-tracer's ``mlp.hook_in`` (the MLP's real input, the output of
  ``ln2`` with its weight and bias), not ``ln2.hook_normalized``: in TransformerLens the latter is
  ``(x - mean) / scale`` *before* the LayerNorm's weight and bias (``transformer_lens/components/layer_norm.py``),
  so it differs from Hugging Face's ``post_attention_layernorm`` output (by ~1.35 here) and the graph is wrong.
  sfcd's transcoder ``cfg.json`` names ``blocks.<l>.mlp.hook_in`` as ``hook_name`` since this check (it named
  ``ln2.hook_normalized`` before); ``--input-hook ln2.hook_normalized`` reproduces that mistake on purpose.
* Token ids, not the prompt string, are passed to ``circuit_tracer.attribute``: its ``ensure_tokenized`` picks the
  leading special token with ``next(filter(None, [bos, pad, eos, ...]))``, which skips a BOS of id 0 (falsy) and
  takes PAD (id 1) here, while sfcd puts the BOS (id 0) first. Both ids are printed.
* sfcd's model folder holds a transformers-5 tokenizer (``tokenizer_config.json`` names ``TokenizersBackend``, which
  transformers 4.57.3 does not know). The same ``tokenizer.json`` with the same special tokens is re-saved in the
  transformers-4 format under ``<out>/tokenizer_tf4/`` and reloaded from there (TransformerLens reloads a tokenizer
  by its ``name_or_path``).
"""

import argparse
import gc
import json
from pathlib import Path

import numpy as np
import torch
from circuit_tracer import attribute
from circuit_tracer.graph import compute_graph_scores
from circuit_tracer.replacement_model.common import ensure_tokenized
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
from safetensors.torch import load_file
from torch import nn
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="sfcd run with model/step<N>/ and transcoders/step<N>/")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--prompt", default="The athlete that the chefs", help="only to show circuit-tracer's BOS pick")
    p.add_argument("--out", type=Path, required=True, help="work folder holding sfcd_graph.npz")
    p.add_argument("--input-hook", default="mlp.hook_in", help="transcoder input hook (see the module docstring)")
    p.add_argument("--output", default="ct_graph.npz", help="file name under --out")
    return p.parse_args()


def resave_tokenizer(model_dir: Path, dest: Path):
    """The model's tokenizer.json and special tokens, saved in the transformers-4 format and reloaded from there."""
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in SPECIAL_KEYS if isinstance(cfg.get(k), str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **special)
    tok.save_pretrained(str(dest))
    return AutoTokenizer.from_pretrained(str(dest))


def load_transcoders(tc_dir: Path, n_layers: int, input_hook: str) -> TranscoderSet:
    """sparsify-layout transcoders (``cfg.json`` + ``sae.safetensors``) as circuit-tracer SingleLayerTranscoders."""
    tcs = {}
    for layer in range(n_layers):
        d = tc_dir / f"mlp.{layer}"
        c = json.loads((d / "cfg.json").read_text())
        t = load_file(str(d / "sae.safetensors"))
        assert c["activation"] == "topk" and c["transcode"] and c["skip_connection"], c
        n_latents, d_model = t["encoder.weight"].shape
        act = nn.Sequential(nn.ReLU(), TopK(int(c["k"])))  # sparsify: topk(relu(x W_enc^T + b_enc))
        tc = SingleLayerTranscoder(
            d_model, n_latents, act, layer, skip_connection=True, device=torch.device("cpu"), dtype=torch.float32
        )
        tc.load_state_dict(
            {
                "W_enc": t["encoder.weight"],
                "b_enc": t["encoder.bias"],
                "W_dec": t["W_dec"],
                "b_dec": t["b_dec"],
                "W_skip": t["W_skip"],
            }
        )
        tcs[layer] = tc
    return TranscoderSet(tcs, feature_input_hook=input_hook, feature_output_hook="hook_mlp_out", scan="sfcd-check")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model_dir = args.run_dir / "model" / f"step{args.step}"
    ref = np.load(args.out / "sfcd_graph.npz")

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tok = resave_tokenizer(model_dir, args.out / "tokenizer_tf4")
    cfg = get_pretrained_model_config(str(model_dir), fold_ln=False, device="cpu", dtype=torch.float32)
    tset = load_transcoders(args.run_dir / "transcoders" / f"step{args.step}", cfg.n_layers, args.input_hook)

    # HookedTransformer with the HF weights, nothing folded or centred, then circuit-tracer's replacement hooks
    model = TransformerLensReplacementModel(cfg, tokenizer=tok, move_to_device=True)
    model.load_and_process_state_dict(
        convert_neox_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model._configure_replacement_model(tset)
    model.eval()

    ids_from_string = ensure_tokenized(args.prompt, tok, "cpu", cfg.model_name)
    ids = torch.tensor(ref["token_ids"])
    with torch.no_grad():
        tl_logits = model(ids[None])[0].numpy()
        hf_logits = hf(ids[None]).logits[0].numpy()
    _, cache = model.run_with_cache(ids[None])
    mlp_in = np.stack([cache[f"blocks.{i}.{args.input_hook}"][0].numpy() for i in range(cfg.n_layers)])
    mlp_out = np.stack([cache[f"blocks.{i}.hook_mlp_out"][0].numpy() for i in range(cfg.n_layers)])
    checks = {
        "side": "circuit-tracer",
        "sfcd_ids": ids.tolist(),
        "ct_ids_from_string": ids_from_string.tolist(),
        "max_abs_logits_tl_vs_hf_tf4": float(np.abs(tl_logits - hf_logits).max()),
        "max_abs_logits_tl_vs_hf_sfcd": float(np.abs(tl_logits - ref["hf_logits"]).max()),
        f"max_abs_{args.input_hook}_vs_hf_mlp_in": float(np.abs(mlp_in - ref["mlp_in"]).max()),
        "max_abs_hook_mlp_out_vs_hf_mlp_out": float(np.abs(mlp_out - ref["mlp_out"]).max()),
    }
    print(json.dumps(checks))

    g = attribute(ids, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=256, max_feature_nodes=None)
    rep, comp = compute_graph_scores(g)
    np.savez(
        args.out / args.output,
        token_ids=g.input_tokens.cpu().numpy(),
        active_features=g.active_features.cpu().numpy(),
        activations=g.activation_values.cpu().numpy(),
        selected=g.selected_features.cpu().numpy(),
        logit_ids=np.array([t.vocab_idx for t in g.logit_targets]),
        probabilities=g.logit_probabilities.cpu().numpy(),
        adjacency=g.adjacency_matrix.cpu().numpy(),
        replacement=rep,
        completeness=comp,
        tl_logits=tl_logits,
        ids_from_string=ids_from_string.cpu().numpy(),
        mlp_in_max_abs_diff=checks[f"max_abs_{args.input_hook}_vs_hf_mlp_in"],
    )
    summary = {
        "side": "circuit-tracer",
        "n_features": int(g.selected_features.shape[0]),
        "logits": [t.vocab_idx for t in g.logit_targets],
        "replacement": float(rep),
        "completeness": float(comp),
        "adjacency_shape": list(g.adjacency_matrix.shape),
    }
    print(json.dumps(summary))
    # drop the hooked model while torch is still importable (its __del__ fails during interpreter shutdown)
    del model, g
    gc.collect()


if __name__ == "__main__":
    main()
