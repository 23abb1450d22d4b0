"""SAE files: written in the SAELens (v6) layout; read from SAELens, dictionary_learning and sparsify layouts.
Transcoders: written and read in sparsify's ``transcode`` layout.

Whatever the source, :func:`load_sae` returns one of sfcd's SAE classes computing exactly that library's
encode/decode (:func:`load_transcoder`: a :class:`~sfcd.sae.transcoder.Transcoder` computing sparsify's). Weight
files are safetensors; dictionary_learning's ``ae.pt`` is read with ``torch.load(weights_only=True)``.

SAELens 6 has no TopK transcoder (its ``transcoder``/``skip_transcoder`` are ReLU, the JumpReLU ones threshold
each latent) and its sparsify loader drops ``W_skip``; no SAELens file of an sfcd transcoder is written, since
SAELens would compute another function from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sfcd.errors import InputError, MissingArtifactError
from sfcd.io import atomic_dir, dumps, save_safetensors
from sfcd.sae.base import SAE
from sfcd.sae.jumprelu import JumpReLUSAE
from sfcd.sae.relu import ReLUSAE
from sfcd.sae.topk import GroupMaxSAE, TopKSAE
from sfcd.sae.transcoder import Transcoder

SAELENS_VERSION = "6.0.0"
SAELENS_REQUIRED = ("d_in", "d_sae", "architecture")

#: sfcd site -> the TransformerLens hook name SAELens users know
_HOOK_NAMES = {
    "embed": "hook_embed",
    "attn": "blocks.{l}.hook_attn_out",
    "mlp": "blocks.{l}.hook_mlp_out",
    "resid": "blocks.{l}.hook_resid_post",
    "mlp_act": "blocks.{l}.mlp.hook_post",
    # circuit-tracer's name for the MLP's input (after the layer norm's weight and bias); TransformerLens's
    # ln2.hook_normalized is before them (the same only with fold_ln), so it is not this site's value
    "mlp_in": "blocks.{l}.mlp.hook_in",
}


#: ``HookedTransformer.from_pretrained`` kwargs under which TransformerLens's hook values equal the activations
#: of the plain ``transformers`` model (its defaults fold LayerNorm and centre the writing weights)
TRANSFORMER_LENS_KWARGS = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}


def hook_name(site: str) -> str:
    kind, _, layer = site.partition(".")
    return _HOOK_NAMES.get(kind, site).format(l=layer)


def save_sae(
    sae: SAE, folder: str | Path, metadata: dict[str, Any] | None = None, density: torch.Tensor | None = None
) -> Path:
    """Write ``cfg.json``, ``sae_weights.safetensors`` and (given ``density``) ``sparsity.safetensors``, all at
    once (a temp folder renamed into place)."""
    if sae.is_transcoder:
        raise InputError(
            "a TopK transcoder has no SAELens layout that SAELens would compute it from (no TopK transcoder, and "
            "its sparsify loader drops W_skip); write it with sfcd.sae.io.save_transcoder (sparsify's layout)"
        )
    cfg_extra, tensors = sae.export()
    meta = dict(metadata or {})
    site = meta.get("sfcd_site", "")
    cfg = {
        **cfg_extra,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "hook_name": hook_name(site) if site else meta.get("hook_name", ""),
            "hook_head_index": None,
            "prepend_bos": meta.pop("prepend_bos", False),  # sfcd harvests windows of packed text
            "exclude_special_tokens": meta.pop("exclude_special_tokens", True),
            "sfcd_architecture": sae.architecture,
            "sfcd_hparams": {k: v for k, v in sae.hparams.items() if isinstance(v, (int, float, str, bool))},
            **meta,
        },
    }
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "cfg.json").write_text(dumps(cfg, indent=2) + "\n")
        save_safetensors(tmp / "sae_weights.safetensors", {k: v.float() for k, v in tensors.items()})
        if density is not None:
            save_safetensors(tmp / "sparsity.safetensors", {"sparsity": torch.log10(density.float() + 1e-10)})
    return folder


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise MissingArtifactError(f"weight file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:
        raise InputError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "it may be corrupt or truncated: retrain or re-download it"
        ) from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingArtifactError(f"{path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}; expected a JSON object")
    return obj


def _expect_keys(tensors: dict, expected: set[str], path: Path, what: str) -> None:
    if set(tensors) != expected:
        raise InputError(
            f"{path} holds tensors {sorted(tensors)}; a {what} SAE has exactly {sorted(expected)} "
            "(is this a weight file of another kind?)"
        )


def _build(cls: type[SAE], W_enc, b_enc, W_dec, b_dec, apply_b_dec: bool, path: Path, **hparams) -> SAE:
    d_in, d_sae = W_enc.shape
    shapes = {
        "W_enc": (W_enc.shape, (d_in, d_sae)),
        "b_enc": (b_enc.shape, (d_sae,)),
        "W_dec": (W_dec.shape, (d_sae, d_in)),
        "b_dec": (b_dec.shape, (d_in,)),
    }
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise InputError(f"{path}: {name} has shape {tuple(got)}; expected {want}")
    sae = cls(d_in, d_sae, **hparams)
    sae.apply_b_dec_to_input = apply_b_dec  # the file's choice overrides the class default
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(t.float())
    return sae.eval()


def _build_linear(cls: type[SAE], state: dict, b_dec_key: str, path: Path, **hparams) -> SAE:
    """dictionary_learning's ``nn.Linear`` layout: ``encoder.weight`` [d_sae, d_in], ``decoder.weight`` [d_in, d_sae],
    the input bias ``b_dec_key`` subtracted before encoding and added after decoding."""
    W_enc, W_dec = state["encoder.weight"].t(), state["decoder.weight"].t()
    return _build(cls, W_enc, state["encoder.bias"], W_dec, state[b_dec_key], True, path, **hparams)


def _set_threshold(sae: JumpReLUSAE, threshold: torch.Tensor) -> JumpReLUSAE:
    with torch.no_grad():
        sae.log_threshold.copy_(threshold.float().clamp_min(1e-30).log())
    return sae


def load_saelens(folder: Path) -> SAE:
    cfg = _read_json(folder / "cfg.json")
    missing = [k for k in SAELENS_REQUIRED if k not in cfg]
    if missing:
        raise InputError(
            f"{folder / 'cfg.json'} lacks keys {missing}; an SAELens cfg.json needs {list(SAELENS_REQUIRED)}"
        )
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise InputError(
            f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
            "fold the scaling into the weights and write 'none'"
        )
    t = _load_safetensors(folder / "sae_weights.safetensors")
    arch, path = cfg["architecture"], folder / "sae_weights.safetensors"
    base = {"W_enc", "b_enc", "W_dec", "b_dec"}
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", arch == "topk"))
    if arch == "standard":
        _expect_keys(t, base, path, "standard")
        sae = _build(ReLUSAE, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], apply_b_dec, path, l1_coeff=0.0)
    elif arch == "topk":
        _expect_keys(t, base, path, "topk")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise InputError(f"{folder}: rescale_acts_by_decoder_norm=true is not supported by sfcd")
        if "k" not in cfg:
            raise InputError(f"{folder / 'cfg.json'} lacks key 'k', which a topk SAE needs")
        sae = _build(TopKSAE, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], apply_b_dec, path, k=int(cfg["k"]))
    elif arch == "jumprelu":
        _expect_keys(t, base | {"threshold"}, path, "jumprelu")
        sae = _build(JumpReLUSAE, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], apply_b_dec, path, l0_coeff=0.0)
        _set_threshold(sae, t["threshold"])
    else:
        raise InputError(f"{folder}: SAE architecture {arch!r} is not supported; sfcd reads standard, topk, jumprelu")
    sae.metadata = cfg.get("metadata", {})
    return sae


def load_dictionary_learning(folder: Path) -> SAE:
    """dictionary_learning's ``ae.pt`` + ``config.json`` (AutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK,
    BatchTopKSAE, MatryoshkaBatchTopKSAE). Without ``config.json`` (the Sparse Feature Circuits release) the
    class is told by the state dict's keys: only AutoEncoder and JumpReluAutoEncoder are unambiguous."""
    if (folder / "config.json").exists():
        config = _read_json(folder / "config.json")
        trainer = config.get("trainer", {})
        cls_name = trainer.get("dict_class")
        if not cls_name:
            raise InputError(
                f"{folder / 'config.json'} lacks trainer.dict_class; expected a dictionary_learning config"
            )
    else:
        trainer, cls_name = {}, None
    try:
        state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"{folder / 'ae.pt'} could not be read as a weights-only torch file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    path = folder / "ae.pt"
    if cls_name is None:
        keys = set(state) if isinstance(state, dict) else set()
        by_keys = {
            frozenset({"bias", "encoder.weight", "encoder.bias", "decoder.weight"}): "AutoEncoder",
            frozenset({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}): "JumpReluAutoEncoder",
        }
        cls_name = by_keys.get(frozenset(keys))
        if cls_name is None:
            raise InputError(
                f"{path}: no config.json, and its keys {sorted(keys)[:8]} are not a dictionary_learning AutoEncoder "
                "(bias, encoder.weight, encoder.bias, decoder.weight) or JumpReluAutoEncoder; add the config.json "
                "that dictionary_learning saved beside it"
            )
    if cls_name == "AutoEncoder":
        _expect_keys(state, {"bias", "encoder.weight", "encoder.bias", "decoder.weight"}, path, "AutoEncoder")
        return _build_linear(ReLUSAE, state, "bias", path, l1_coeff=0.0)
    if cls_name == "JumpReluAutoEncoder":
        keys = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
        _expect_keys(state, keys, path, "JumpReluAutoEncoder")
        sae = _build(
            JumpReLUSAE, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], False, path, l0_coeff=0.0
        )
        return _set_threshold(sae, state["threshold"])
    if cls_name == "AutoEncoderTopK":
        k = int(state["k"]) if "k" in state else trainer.get("k")
        keys = {k2 for k2 in state if k2 not in ("k", "threshold")}
        _expect_keys(
            {k2: None for k2 in keys},
            {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
            path,
            "AutoEncoderTopK",
        )
        return _build_linear(TopKSAE, state, "b_dec", path, k=int(k))
    if cls_name == "BatchTopKSAE":
        # dictionary_learning's default trainer: encode = relu(encoder(x - b_dec)) kept where > threshold (one
        # scalar, a running estimate; -1 until trained), decode = decoder(f) + b_dec: a JumpReLU at inference
        keys = {"k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"}
        _expect_keys(state, keys, path, "BatchTopKSAE")
        sae = _build_linear(JumpReLUSAE, state, "b_dec", path, l0_coeff=0.0)
        return _set_threshold(sae, _relu_threshold(state["threshold"], sae.d_sae))
    if cls_name == "MatryoshkaBatchTopKSAE":
        # the same inference rule on nested groups of latents (group_sizes); every group is active once
        # trained, and latents past the last group never fire (threshold +inf)
        keys = {"k", "threshold", "group_sizes", "W_enc", "b_enc", "W_dec", "b_dec"}
        _expect_keys(state, keys, path, "MatryoshkaBatchTopKSAE")
        sae = _build(
            JumpReLUSAE, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], True, path, l0_coeff=0.0
        )
        threshold = _relu_threshold(state["threshold"], sae.d_sae)
        threshold[int(state["group_sizes"].sum()) :] = float("inf")
        return _set_threshold(sae, threshold)
    raise InputError(
        f"{folder}: dictionary_learning class {cls_name!r} is not supported; sfcd reads AutoEncoder, "
        "JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE"
    )


def _relu_threshold(threshold: torch.Tensor, d_sae: int) -> torch.Tensor:
    """A per-latent threshold for ``relu(pre) * (relu(pre) > t)``: with t < 0 (untrained) that is ``relu(pre)``,
    which sfcd's JumpReLU ``pre * (pre > t)`` computes at t = 0."""
    return threshold.float().clamp_min(0.0).expand(d_sae).clone()


def load_sparsify(folder: Path) -> SAE:
    """EleutherAI sparsify: ``cfg.json`` (with ``k``) + ``sae.safetensors`` (``encoder.*``, ``W_dec``, ``b_dec``).

    ``activation: topk`` (the default) and ``groupmax`` are computed as sparsify does; transcoders
    (``transcode: true``) and skip connections map a module's input to its output, which is not an SAE of one
    site: they are refused, never loaded as one."""
    cfg = _read_json(folder / "cfg.json")
    if cfg.get("transcode"):
        raise InputError(
            f"{folder} is a sparsify transcoder (transcode: true): it reads a module's input and predicts its "
            "output, so it is not an SAE of one site; load it with sfcd.load_transcoder"
        )
    path = folder / "sae.safetensors"
    t = _load_safetensors(path)
    if "W_skip" in t or cfg.get("skip_connection"):
        raise InputError(f"{folder} has a skip connection (W_skip), which sfcd's SAEs do not compute; not loaded")
    _expect_keys(t, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, path, "sparsify")
    if "k" not in cfg:
        raise InputError(f"{folder / 'cfg.json'} lacks key 'k', which a sparsify SAE needs")
    activation = cfg.get("activation", "topk")
    classes = {"topk": TopKSAE, "groupmax": GroupMaxSAE}
    if activation not in classes:
        raise InputError(f"{folder}: sparsify activation {activation!r} is not supported; sfcd reads topk, groupmax")
    k, d_sae = int(cfg["k"]), t["encoder.weight"].shape[0]
    if activation == "groupmax" and d_sae % k:
        raise InputError(f"{folder}: groupmax needs d_sae ({d_sae}) divisible by k ({k})")
    return _build(
        classes[activation], t["encoder.weight"].t(), t["encoder.bias"], t["W_dec"], t["b_dec"], True, path, k=k
    )


def load_sae(path: str | Path) -> SAE:
    """An SAE from a folder in the SAELens, dictionary_learning or sparsify layout (detected from its files)."""
    folder = Path(path)
    if not folder.is_dir():
        raise MissingArtifactError(f"SAE folder {folder} does not exist")
    if (folder / "sae_weights.safetensors").exists():
        return load_saelens(folder)
    if (folder / "ae.pt").exists():
        return load_dictionary_learning(folder)
    if (folder / "sae.safetensors").exists():
        return load_sparsify(folder)
    raise InputError(
        f"{folder} holds no SAE: expected sae_weights.safetensors + cfg.json (SAELens), "
        "ae.pt + config.json (dictionary_learning) or sae.safetensors + cfg.json (sparsify)"
    )


def save_transcoder(
    tc: Transcoder, folder: str | Path, metadata: dict[str, Any] | None = None, density: torch.Tensor | None = None
) -> Path:
    """Write sparsify's transcoder layout, all at once: ``cfg.json`` (its ``SparseCoderConfig`` with ``d_in``,
    ``transcode: true``; sfcd's provenance under the extra key ``sfcd``, which sparsify's loader drops) and
    ``sae.safetensors`` (``encoder.weight`` [F, d_in], ``encoder.bias``, ``W_dec`` [F, d_in], ``b_dec``,
    ``W_skip`` [d_in, d_in]); and (given ``density``) ``sparsity.safetensors`` as the SAEs have it.
    ``sparsify.SparseCoder.load_from_disk(folder)`` computes the same function."""
    if tc.d_out != tc.d_in:
        raise InputError(
            f"sparsify's transcoders map d_in to d_in; this one maps {tc.d_in} to {tc.d_out} and has no sparsify file"
        )
    cfg_sfcd, t = tc.export()
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, tc.d_sae // tc.d_in),
        "normalize_decoder": False,
        "num_latents": tc.d_sae,
        "k": tc.k,
        "multi_topk": False,
        "skip_connection": "W_skip" in t,
        "transcode": True,
        "d_in": tc.d_in,
        "sfcd": {**cfg_sfcd, "hparams": _plain(tc.hparams), **(metadata or {})},
    }
    tensors = {"encoder.weight": t["W_enc"].t(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "cfg.json").write_text(dumps(cfg, indent=2) + "\n")
        save_safetensors(tmp / "sae.safetensors", {k: v.float().contiguous() for k, v in tensors.items()})
        if density is not None:
            save_safetensors(tmp / "sparsity.safetensors", {"sparsity": torch.log10(density.float() + 1e-10)})
    return folder


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}


def load_transcoder(path: str | Path) -> Transcoder:
    """A transcoder from a folder in sparsify's layout (``cfg.json`` with ``transcode: true`` and
    ``sae.safetensors``; sfcd writes the same), computing what sparsify computes: TopK of
    ``relu(x W_enc + b_enc)``, decoded, plus ``W_skip x`` when the file has it."""
    folder = Path(path)
    if not folder.is_dir():
        raise MissingArtifactError(f"transcoder folder {folder} does not exist")
    cfg = _read_json(folder / "cfg.json")
    if not cfg.get("transcode"):
        raise InputError(
            f"{folder} is not a transcoder (its cfg.json has no transcode: true); load an SAE with sfcd.load_sae"
        )
    if cfg.get("activation", "topk") != "topk":
        raise InputError(f"{folder}: sparsify activation {cfg.get('activation')!r}; sfcd reads topk transcoders")
    path_w = folder / "sae.safetensors"
    t = _load_safetensors(path_w)
    skip = "W_skip" in t
    _expect_keys(
        t,
        {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | ({"W_skip"} if skip else set()),
        path_w,
        "sparsify transcoder",
    )
    if "k" not in cfg:
        raise InputError(f"{folder / 'cfg.json'} lacks key 'k', which a sparsify transcoder needs")
    d_sae, d_in = t["encoder.weight"].shape
    want = {"encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "W_skip": (d_in, d_in)}
    for name, shape in want.items():
        if name in t and tuple(t[name].shape) != shape:
            raise InputError(f"{path_w}: {name} has shape {tuple(t[name].shape)}; expected {shape}")
    tc = Transcoder(d_in, d_sae, k=int(cfg["k"]), skip=skip)
    with torch.no_grad():
        tc.W_enc.copy_(t["encoder.weight"].t().float())
        tc.b_enc.copy_(t["encoder.bias"].float())
        tc.W_dec.copy_(t["W_dec"].float())
        tc.b_dec.copy_(t["b_dec"].float())
        if skip:
            tc.W_skip.copy_(t["W_skip"].float())
    tc.sfcd_meta = cfg.get("sfcd", {})
    return tc.eval()


def is_transcoder_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a transcoder in sparsify's layout (``cfg.json`` with ``transcode: true``)."""
    cfg = Path(folder) / "cfg.json"
    return cfg.is_file() and bool(_read_json(cfg).get("transcode"))


def load_dictionary(path: str | Path) -> SAE:
    """An SAE (:func:`load_sae`) or, for a folder in sparsify's transcoder layout, a transcoder
    (:func:`load_transcoder`)."""
    return load_transcoder(path) if is_transcoder_folder(path) else load_sae(path)
