"""Crosscoder files and the per-checkpoint views.

``crosscoders/<site>/``: ``cfg.json`` (architecture, per-checkpoint width ``d``, ``d_sae``, the ``steps`` in block
order, the site, where the checkpoints' models come from) and ``crosscoder_weights.safetensors``:
``W_enc`` [K, d, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, K, d], ``b_dec`` [K, d], ``scales`` [K],
``threshold`` [] (BatchTopK) and ``block_means`` [K, d] (each checkpoint's mean activation in raw units over the
crosscoder's held-out evaluation tokens; absent in crosscoders trained before it was saved). Weights are kept in
the normalised units the crosscoder trained in (so decoder norms compare across checkpoints); block m reads
``a^m * scales[m]``.

Checkpoint m *alone* (:func:`checkpoint_sae`: the circuit stage's dictionary, the spliced CE loss, ``fve_alone``,
and the SAELens folders ``crosscoders/<site>/step<N>/``) is an ordinary SAE on m's raw activations: the other
checkpoints' encoder terms ``sum_{m' != m} a^{m'} s_{m'} W_enc^{m'}`` are replaced by their expectation
``sum_{m' != m} E[a^{m'}] s_{m'} W_enc^{m'}`` (folded into its ``b_enc``), so nothing token-specific from another
checkpoint reaches m's latents and no other checkpoint's model is needed. The joint view with the other checkpoints
run on the same tokens (:class:`sfcd.crosscoders.view.JointView`) is an explicit opt-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sfcd.crosscoders.model import CROSSCODERS, BatchTopKCrosscoder, Crosscoder
from sfcd.errors import InputError, MissingArtifactError
from sfcd.io import atomic_dir, dumps, read_json, save_safetensors
from sfcd.sae.base import SAE
from sfcd.sae.io import _load_safetensors, save_sae
from sfcd.sae.jumprelu import JumpReLUSAE
from sfcd.sae.relu import ReLUSAE

WEIGHTS = "crosscoder_weights.safetensors"


def is_crosscoder(folder: str | Path) -> bool:
    return (Path(folder) / WEIGHTS).is_file()


def save_crosscoder(cc: Crosscoder, folder: str | Path, meta: dict[str, Any]) -> Path:
    """``cfg.json`` and the weights, at once (a temp folder renamed into place). ``meta`` needs ``steps``."""
    K, d, m = cc.n_blocks, cc.d, cc.d_sae
    if len(meta["steps"]) != K:
        raise ValueError(f"{len(meta['steps'])} steps for {K} blocks")
    kind = next(k for k, c in CROSSCODERS.items() if isinstance(cc, c))
    cfg = {
        "architecture": kind,
        "d": d,
        "d_sae": m,
        "n_checkpoints": K,
        "hparams": {k: v for k, v in cc.hparams.items() if isinstance(v, (int, float, str, bool))},
        **meta,
    }
    with torch.no_grad():
        tensors = {
            "W_enc": cc.W_enc.view(K, d, m),
            "b_enc": cc.b_enc,
            "W_dec": cc.W_dec.view(m, K, d),
            "b_dec": cc.b_dec.view(K, d),
            "scales": cc.block_scales(),
            "threshold": cc.threshold,
        }
        if cc.has_block_means():
            tensors["block_means"] = cc.block_mean.view(K, d)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "cfg.json").write_text(dumps(cfg, indent=2) + "\n")
        save_safetensors(tmp / WEIGHTS, tensors)
    return folder


def load_crosscoder(path: str | Path) -> Crosscoder:
    """A crosscoder from its folder; ``.cfg`` holds its ``cfg.json`` (steps, site, model source)."""
    folder = Path(path)
    if not is_crosscoder(folder):
        raise MissingArtifactError(f"{folder} holds no crosscoder (no {WEIGHTS}); train one with `sfcd crosscoder`")
    cfg = read_json(folder / "cfg.json")
    if cfg.get("architecture") not in CROSSCODERS:
        raise InputError(
            f"{folder}/cfg.json: architecture {cfg.get('architecture')!r}; expected one of {sorted(CROSSCODERS)}"
        )
    t = _load_safetensors(folder / WEIGHTS)
    K, d, m = int(cfg["n_checkpoints"]), int(cfg["d"]), int(cfg["d_sae"])
    want = {
        "W_enc": (K, d, m),
        "b_enc": (m,),
        "W_dec": (m, K, d),
        "b_dec": (K, d),
        "scales": (K,),
        "threshold": (),
    }
    if "block_means" in t:
        want["block_means"] = (K, d)
    for name, shape in want.items():
        if name not in t or tuple(t[name].shape) != shape:
            got = tuple(t[name].shape) if name in t else "missing"
            raise InputError(f"{folder / WEIGHTS}: {name} is {got}; expected {shape} (from cfg.json)")
    cc = CROSSCODERS[cfg["architecture"]](K * d, m, **{**cfg.get("hparams", {}), "n_blocks": K})
    with torch.no_grad():
        cc.W_enc.copy_(t["W_enc"].reshape(K * d, m))
        cc.b_enc.copy_(t["b_enc"])
        cc.W_dec.copy_(t["W_dec"].reshape(m, K * d))
        cc.b_dec.copy_(t["b_dec"].reshape(K * d))
        cc.scale.copy_(t["scales"].repeat_interleave(d))
        cc.threshold.copy_(t["threshold"])
        if "block_means" in t:
            cc.block_mean.copy_(t["block_means"].reshape(K * d))
    cc.cfg = cfg
    return cc.eval()


def block_index(cc: Crosscoder, step: int) -> int:
    steps = list(cc.cfg["steps"])
    if step not in steps:
        raise MissingArtifactError(f"the crosscoder was trained on steps {steps}; step {step} is not one of them")
    return steps.index(step)


@torch.no_grad()
def checkpoint_sae(cc: Crosscoder, m: int) -> SAE:
    """Checkpoint ``m`` alone as an ordinary SAE on its raw activations: ``W_enc^m s_m`` and the encoder bias
    :meth:`Crosscoder.alone_bias` (the other checkpoints at their mean activation; see the module docstring).
    BatchTopK becomes JumpReLU with threshold ``theta / sum_m' ||W_dec,i^m'||``; L1 becomes ReLU. A crosscoder
    without block means is a :class:`MissingArtifactError`."""
    d, k = cc.d, cc.d_sae
    s = cc.block_scales()[m]
    blk = slice(m * d, (m + 1) * d)
    if isinstance(cc, BatchTopKCrosscoder):
        sae: SAE = JumpReLUSAE(d, k)
        sae.log_threshold.copy_((cc.threshold / cc.decoder_norms().sum(1).clamp_min(1e-12)).clamp_min(1e-30).log())
    else:
        sae = ReLUSAE(d, k)
    sae.W_enc.copy_(cc.W_enc[blk] * s)
    sae.b_enc.copy_(cc.alone_bias(m))
    sae.W_dec.copy_(cc.W_dec[:, blk] / s)
    sae.b_dec.copy_(cc.b_dec[blk] / s)
    return sae.eval()


def save_checkpoint_saes(cc: Crosscoder, folder: Path, meta: dict[str, Any]) -> list[Path]:
    """Every checkpoint's :func:`checkpoint_sae` as a SAELens folder ``<folder>/step<N>/``, with that checkpoint's
    provenance (``sfcd_model``, and its folder or hub id as ``model_name``) when the crosscoder recorded it."""
    out = []
    models = cc.cfg.get("sfcd_models") or {}
    for m, step in enumerate(cc.cfg["steps"]):
        note = "crosscoder block seen alone: the other checkpoints' encoder terms at their mean activation (b_enc)"
        own = models.get(str(step))
        extra = {"sfcd_model": own, "model_name": own.get("path") or meta.get("model_name")} if own else {}
        out.append(
            save_sae(
                checkpoint_sae(cc, m),
                folder / f"step{step}",
                {**meta, **extra, "sfcd_step": step, "sfcd_crosscoder": str(folder), "sfcd_view": note},
            )
        )
    return out
