"""Architecture names -> SAE classes."""

from __future__ import annotations

from sfcd.errors import ConfigError
from sfcd.sae.base import SAE
from sfcd.sae.batchtopk import BatchTopKSAE
from sfcd.sae.jumprelu import JumpReLUSAE
from sfcd.sae.relu import ReferenceReLUSAE, ReLUSAE
from sfcd.sae.topk import TopKSAE
from sfcd.sae.transcoder import Transcoder

ARCHITECTURES: dict[str, type[SAE]] = {
    c.architecture: c for c in (ReLUSAE, ReferenceReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, Transcoder)
}


def sae_class(name: str) -> type[SAE]:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown SAE architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]
