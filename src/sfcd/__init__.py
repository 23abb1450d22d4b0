"""sfcd: sparse feature circuit development.

Train sparse autoencoders on a language model's activations, find sparse feature circuits, and follow both
through the model's training checkpoints. Nothing heavy is imported until it is used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_model", "load_tokenizer", "load_sae", "load_crosscoder", "compose", "RunDir", "SfcdError"]

_LAZY = {
    "load_model": "sfcd.models.loading",
    "load_tokenizer": "sfcd.models.loading",
    "load_sae": "sfcd.sae.io",
    "load_crosscoder": "sfcd.crosscoders.io",
    "compose": "sfcd.config",
    "RunDir": "sfcd.paths",
    "SfcdError": "sfcd.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfcd' has no attribute {name!r}")
