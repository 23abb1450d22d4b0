"""Model presets -> ``GPTNeoXConfig``: the Pythia architecture (parallel attention + MLP, rotary, untied)."""

from __future__ import annotations

from omegaconf import DictConfig

from sfcd.errors import ConfigError


def neox_config(model: DictConfig, vocab_size: int, bos_id: int = 0, eos_id: int = 0):
    """The ``GPTNeoXConfig`` of a size preset (``cfg.model``) for a tokenizer of ``vocab_size`` tokens."""
    from transformers import GPTNeoXConfig

    if model.d_model % model.n_heads:
        raise ConfigError(f"model.d_model={model.d_model} is not divisible by model.n_heads={model.n_heads}")
    if model.seq_len > model.max_position:
        raise ConfigError(f"model.seq_len={model.seq_len} exceeds model.max_position={model.max_position}")
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=model.d_model,
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        intermediate_size=model.d_mlp,
        hidden_act="gelu",
        max_position_embeddings=model.max_position,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": model.rotary_pct,
        },
        use_parallel_residual=True,
        tie_word_embeddings=False,
        layer_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation=model.attn_implementation,
    )


def random_checkpoint(folder, model: DictConfig, tokenizer, vocab_size: int | None = None, seed: int = 0):
    """A ``save_pretrained`` folder (+ ``tokenizer``) of a randomly initialised model of preset ``model``'s shape
    (e.g. ``model=pythia-70m-deduped``: 6 layers, d_model 512, vocab 50,304), usable as ``model.source``:
    the hub's code path, offline. Returns the folder."""
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    vocab = vocab_size or len(tokenizer)
    net = GPTNeoXForCausalLM(neox_config(model, vocab, tokenizer.bos_token_id or 0, tokenizer.eos_token_id or 0))
    net.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
