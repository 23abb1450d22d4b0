"""The ``sae`` stage: activations of a checkpoint (or a plain file), streamed in bounded memory on the device of
the work -> trained, evaluated SAEs (and transcoders) on disk.

Output per SAE, ``saes/step<N>/<name>/``: cfg.json, sae_weights.safetensors, sparsity.safetensors (SAELens
layout), metrics.json (written last: it marks the SAE complete) and density.png. Per transcoder
(``sae.transcoders``), ``transcoders/step<N>/mlp.<l>/``: cfg.json and sae.safetensors (sparsify's transcode
layout), sparsity.safetensors, metrics.json and density.png; trained from the same stream as the SAEs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from sfcd.activations.cache import read_activation_file, torch_dtype
from sfcd.activations.harvest import harvest_autocast, harvest_rows, token_windows
from sfcd.activations.stream import ArraySource, HarvestSource, check_buffer_fits, prefetch_on
from sfcd.data.tokens import read_tokens
from sfcd.errors import InputError
from sfcd.io import read_json, write_json
from sfcd.models.loading import checkpoint, provenance
from sfcd.models.sites import Site, expand_sites, mlp_input_site, parse_site, site_dim
from sfcd.paths import RunDir
from sfcd.sae import evaluate as E
from sfcd.sae.base import SAE
from sfcd.sae.io import TRANSFORMER_LENS_KWARGS, hook_name, save_sae, save_transcoder
from sfcd.sae.train import (
    SAEModule,
    buffer_rows,
    make_specs,
    prepare_state_dir,
    settings_of,
    shard_specs,
    state_dir_name,
    train_module,
)
from sfcd.training import trainer_device

log = logging.getLogger(__name__)


def check_sae_fits(sae: SAE, model, site: Site) -> None:
    """A clear error when an SAE's input width is not the site's."""
    d = site_dim(model, site)
    if sae.d_in != d:
        raise InputError(
            f"the SAE reads {sae.d_in}-dimensional inputs but site {site.name} of this model is "
            f"{d}-dimensional; use an SAE trained on this site"
        )


def _special_ids(tokenizer, exclude: bool) -> set[int]:
    return set(tokenizer.all_special_ids) if exclude else set()


def _check_buffer(s: DictConfig, rows: int, dims: dict[str, int], device: torch.device) -> None:
    """The stream's buffer against the device's free memory: ``sae.buffer_dtype`` values, two chunks with
    ``sae.prefetch``."""
    check_buffer_fits(rows, dims, torch_dtype(s.buffer_dtype), device, 2 if prefetch_on(s.prefetch, device) else 1)


def _file_source(cfg: DictConfig, total: int, device: torch.device):
    """A plain activation file: the last ``eval_tokens`` rows (at most a tenth) held out, the rest streamed."""
    s = cfg.sae
    arr = read_activation_file(s.activations)
    n_eval = min(s.eval_tokens, len(arr) // 10)
    train = arr[: len(arr) - n_eval]  # a view of the memory map: nothing is read yet
    if len(train) < s.batch_size:
        raise InputError(
            f"activation file {s.activations} holds {len(train)} training rows, fewer than one batch of "
            f"sae.batch_size={s.batch_size}; lower sae.batch_size or use a longer file"
        )
    if total * s.batch_size > len(train):
        log.info(
            "sae.n_tokens=%d is %.1f passes over the %d training rows of %s; epochs repeat",
            total * s.batch_size,
            total * s.batch_size / len(train),
            len(train),
            s.activations,
        )
    rows = buffer_rows(s, total)
    _check_buffer(s, rows, {"file": arr.shape[1]}, device)
    source = ArraySource({"file": train}, rows, s.seed, device, s.buffer_dtype)
    evals = {"file": torch.from_numpy(np.array(arr[len(arr) - n_eval :], dtype=np.float32)).to(device)}
    return source, evals, arr.shape[1]


def _check_file_width(out_root: Path, specs: list, width: int, path: str) -> None:
    """SAEs already in ``saes/file-<stem>/`` were trained on a file of this name: refuse one of another width,
    which would otherwise be skipped as complete."""
    for sp in specs:
        m = out_root / sp.name / "metrics.json"
        if m.exists() and (old := read_json(m).get("d_in")) != width:
            raise InputError(
                f"activation file {path} is {width}-dimensional but {m.parent} was trained on a {old}-dimensional "
                "file of the same name; use another run_dir, or rename the file"
            )


def train_saes(cfg: DictConfig, callbacks: list | None = None) -> list[Path]:
    """Train, evaluate and save the SAEs ``cfg.sae`` asks for; skip those already complete; resume.

    Activations stream chunk by chunk (:mod:`sfcd.activations.stream`) on the device of ``cfg.trainer``; memory
    is bounded by ``sae.buffer_tokens``, not by ``sae.n_tokens``."""
    s = cfg.sae
    run = RunDir(cfg.run_dir)
    device = trainer_device(cfg.trainer)  # a shard job's pinned GPU (trainer.devices=[i])
    total = max(1, s.n_tokens // s.batch_size)
    model = tokenizer = None
    tc_dims: dict[str, int] = {}
    tc_root: Path | None = None  # transcoders/step<N>/ (a model's run only)
    if s.activations and s.get("transcoders"):
        raise InputError(
            "sae.transcoders needs a model (an MLP's input and output from one forward pass), not an activation "
            "file; drop sae.activations or sae.transcoders"
        )
    if s.activations:
        source, eval_arrays, width = _file_source(cfg, total, device)
        site_dims = {"file": width}
        out_root = run.root / "saes" / f"file-{Path(s.activations).stem}"
        sites: list[Site] = []
        meta_base = {"dataset_path": str(s.activations), "prepend_bos": False}
    else:
        model, tokenizer, step = checkpoint(cfg, cfg.step)
        model.to(device)
        sites = expand_sites(list(s.sites), model) if list(s.sites) or not s.get("transcoders") else []
        site_dims = {x.name: site_dim(model, x) for x in sites}
        mlps = expand_sites(list(s.get("transcoders") or []), model) if s.get("transcoders") else []
        tc_dims = {x.name: site_dim(model, x) for x in mlps}
        sites = list({x.name: x for x in [*sites, *mlps, *(mlp_input_site(x) for x in mlps)]}.values())
        out_root = run.root / "saes" / f"step{step}"
        tc_root = run.transcoders(step)
        seq_len = s.seq_len or cfg.model.seq_len
        excl = _special_ids(tokenizer, s.exclude_special)
        meta_base = {
            "model_name": cfg.model.source or str(run.model_step(step)),
            # which checkpoint exactly: source, revision/step, dtype used and stored, sha256 of the weights
            "sfcd_model": provenance(model),
            "sfcd_init_from": s.init_from,
            "sfcd_step": step,
            "dataset_path": str(run.tokens("train")),
            "context_size": seq_len,
            # windows are slices of the packed token stream: no BOS is prepended to them
            "prepend_bos": False,
            "exclude_special_tokens": sorted(excl) if excl else False,
            # TransformerLens folds and centres weights by default, which changes resid/attn/mlp hook values;
            # with these it computes the same activations as the transformers model these SAEs were trained on
            "model_from_pretrained_kwargs": dict(TRANSFORMER_LENS_KWARGS),
        }
        fast = harvest_autocast(s.harvest_autocast, model)
        # the training activations' forward passes under autocast in this dtype (null: model.dtype's own)
        meta_base["sfcd_harvest_autocast"] = str(fast).removeprefix("torch.") if fast else None
    specs = shard_specs(make_specs(s, site_dims, tc_dims), s)  # sae.shards > 1: this job's share of the sites

    def folder_of(spec) -> Path:
        return (tc_root if spec.in_site else out_root) / spec.name

    if not specs:
        log.info("shard %d of %d has no sites (%d in all); nothing to train", s.shard, s.shards, len(site_dims))
        return []
    if s.activations:
        _check_file_width(out_root, specs, width, s.activations)
    todo = [sp for sp in specs if not (folder_of(sp) / "metrics.json").exists()]
    if not todo:
        log.info("all %d SAEs in %s are complete; skipping", len(specs), out_root)
        return [folder_of(sp) for sp in specs]
    need = sorted({sp.site for sp in todo} | {sp.input_site for sp in todo})
    rows = buffer_rows(s, total)
    if model is not None:
        need_sites = [x for x in sites if x.name in need]
        dims = {x.name: site_dim(model, x) for x in need_sites}
        _check_buffer(s, rows, dims, device)
        source = HarvestSource(
            model,
            read_tokens(run.tokens("train")),
            need_sites,
            dims,
            seq_len,
            rows,
            s.seed,
            excl,
            s.harvest_batch,
            s.buffer_dtype,
            cache_dir=run.root / "activations" / f"step{step}" if s.cache else None,
            cache_meta={"model": meta_base["model_name"], "step": step, "tokens": str(run.tokens("train"))},
            autocast=fast,
        )
    state_dir = out_root / state_dir_name(s)  # one per shard: concurrent shard jobs never share it
    prepare_state_dir(state_dir, settings_of(todo, s, total, meta_base.get("sfcd_harvest_autocast")))
    module = SAEModule(todo, s, total)
    train_module(module, cfg.trainer, state_dir, source, callbacks)
    if not module.trainer.is_global_zero:  # DDP's other ranks (trainer=ddp): rank 0 evaluates and writes
        return []
    module.source = source = None  # the last chunk goes before the evaluation's activations come
    written = []
    if model is not None:
        val = read_tokens(run.tokens("val"))
        eval_windows = token_windows(val, seq_len, int(s.eval_tokens * 1.25 / seq_len) + 2)  # BOS/EOS margin
        ce_windows = token_windows(val, seq_len, max(1, (s.ce_tokens or s.eval_tokens) // seq_len))
    current: tuple[tuple[str, ...], dict[str, torch.Tensor]] | None = None
    for spec, sae in zip(todo, module.saes, strict=True):  # specs are grouped by site
        wanted = tuple(dict.fromkeys([spec.input_site, spec.site]))
        if model is not None and (current is None or current[0] != wanted):
            current = None  # one site's evaluation activations at a time: eval_tokens x d, not x sum(d)
            xs = [parse_site(n, model) for n in wanted]
            batches = (eval_windows[b : b + s.harvest_batch] for b in range(0, len(eval_windows), s.harvest_batch))
            dims = {x.name: site_dim(model, x) for x in xs}
            current = (wanted, harvest_rows(model, batches, xs, dims, s.eval_tokens, excl))
        acts = current[1] if model is not None else eval_arrays
        sae = sae.to(device).eval()
        target = acts[spec.site] if spec.in_site else None
        metrics, fired = E.reconstruction_metrics(sae, acts[spec.input_site], target=target)
        dens, density = E.density_metrics(fired, len(acts[spec.input_site]))
        metrics |= dens
        if model is not None and s.ce_tokens != 0:  # 0: no CE/KL scores (the study's seed baselines)
            in_site = parse_site(spec.in_site, model) if spec.in_site else None
            metrics |= E.spliced_losses(model, parse_site(spec.site, model), sae, ce_windows, excl, in_site=in_site)
        metrics |= {
            "name": spec.name,
            "site": spec.site,
            **({"input_site": spec.in_site} if spec.in_site else {}),
            "architecture": spec.architecture,
            "d_in": spec.d_in,
            "d_sae": spec.d_sae,
            "train_tokens": total * s.batch_size,
            "hparams": spec.hparams,
            "lr": spec.lr,
            "training": {  # how it was trained, beyond the hyperparameters (the reference comparison reads it)
                "seed": spec.seed,
                "batch_size": s.batch_size,
                "betas": list(s.betas),
                "warmup_frac": s.warmup_frac,
                "decay_frac": s.decay_frac,
                "grad_clip": s.grad_clip,
                "buffer_tokens": buffer_rows(s, total),
                "buffer_dtype": s.buffer_dtype,
                "precision": str(cfg.trainer.precision),
            },
        }
        folder = folder_of(spec)
        sae = sae.cpu()
        if spec.in_site:  # a transcoder: sparsify's layout, with sfcd's provenance and both sites' hook names
            meta = {**meta_base, "sfcd_site": spec.site, "sfcd_input_site": spec.in_site}
            meta |= {"hook_name": hook_name(spec.in_site), "hook_name_out": hook_name(spec.site)}
            save_transcoder(sae, folder, meta, density.cpu())
        else:
            save_sae(sae, folder, {**meta_base, "sfcd_site": spec.site if spec.site != "file" else ""}, density.cpu())
        E.density_histogram(
            density.cpu(), folder / "density.png", f"{spec.name} ({spec.architecture}, d_sae {spec.d_sae})"
        )
        write_json(folder / "metrics.json", metrics)
        log.info(
            "SAE %s: L0 %.1f, FVE %.3f, CE score %s, dead %.3f",
            spec.name,
            metrics["l0"],
            metrics["fve"],
            f"{metrics['ce_loss_score']:.3f}" if "ce_loss_score" in metrics else "-",
            metrics["dead_fraction"],
        )
        written.append(folder)
    shutil.rmtree(state_dir, ignore_errors=True)
    log.info("wrote %d of the %d SAEs and transcoders asked for (the others were complete)", len(written), len(specs))
    return [folder_of(sp) for sp in specs]  # every one asked for, as when all were complete
