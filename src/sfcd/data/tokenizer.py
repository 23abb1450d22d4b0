"""Tokenizers: a byte-level BPE (the GPT-NeoX kind) trained with HF ``tokenizers`` for a built-in corpus,
saved in HF format; hub models bring their own."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sfcd.errors import MissingArtifactError

EOS = "<|endoftext|>"  # id 0, also the BOS, as in Pythia
PAD = "<|padding|>"  # id 1, as in Pythia


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; encoding with special tokens prepends ``<|endoftext|>`` (BOS).

    Training stops early once every word is one token, so a small closed vocabulary yields a small model
    vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer_dir(path: Path):
    """A tokenizer saved with ``save_pretrained`` in ``path``."""
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise MissingArtifactError(f"no tokenizer in {path}; expected tokenizer.json (HF format) there")
    return AutoTokenizer.from_pretrained(str(path))
