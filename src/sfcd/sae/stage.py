"""The ``sae`` stage: activations of a checkpoint (or a plain file) -> trained, evaluated SAEs on disk.

Output per SAE, ``saes/step<N>/<name>/``: cfg.json, sae_weights.safetensors, sparsity.safetensors (SAELens
layout), metrics.json (written last: it marks the SAE complete) and density.png.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from sfcd.activations.cache import read_activation_file
from sfcd.activations.harvest import token_windows
from sfcd.data.tokens import read_tokens
from sfcd.errors import ConfigError, InputError
from sfcd.io import write_json
from sfcd.models.loading import checkpoint
from sfcd.models.sites import Site, parse_site, site_dim, valid_sites
from sfcd.paths import RunDir
from sfcd.sae import evaluate as E
from sfcd.sae.base import SAE
from sfcd.sae.data import cached_or_harvest, harvest_arrays
from sfcd.sae.io import save_sae
from sfcd.sae.train import SAEModule, make_specs, prepare_state_dir, settings_of, train_module

log = logging.getLogger(__name__)

DEFAULT_KINDS = ("attn", "mlp", "resid")


def expand_sites(names: list[str], model) -> list[Site]:
    """Site names, with ``all`` meaning ``embed`` and every layer's ``attn``, ``mlp`` and ``resid``."""
    out: list[str] = []
    for n in names:
        if n == "all":
            out += [s for s in valid_sites(model) if s == "embed" or s.split(".")[0] in DEFAULT_KINDS]
        else:
            out.append(n)
    if not out:
        raise ConfigError("sae.sites is empty; name sites (e.g. sae.sites=[resid.0,mlp.1]) or use [all]")
    return [parse_site(n, model) for n in dict.fromkeys(out)]


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


def train_saes(cfg: DictConfig, callbacks: list | None = None) -> list[Path]:
    """Train, evaluate and save the SAEs ``cfg.sae`` asks for; skip those already complete; resume."""
    s = cfg.sae
    run = RunDir(cfg.run_dir)
    model = tokenizer = None
    if s.activations:
        arr = read_activation_file(s.activations)
        n_eval = min(s.eval_tokens, len(arr) // 10)
        train_arrays = {"file": arr[: len(arr) - n_eval][: s.n_tokens]}
        eval_arrays = {"file": np.asarray(arr[len(arr) - n_eval :], dtype=np.float32)}
        site_dims = {"file": arr.shape[1]}
        out_root = run.root / "saes" / f"file-{Path(s.activations).stem}"
        sites: list[Site] = []
        meta_base = {"dataset_path": str(s.activations)}
    else:
        model, tokenizer, step = checkpoint(cfg, cfg.step)
        sites = expand_sites(list(s.sites), model)
        site_dims = {x.name: site_dim(model, x) for x in sites}
        out_root = run.root / "saes" / f"step{step}"
        meta_base = {
            "model_name": cfg.model.source or str(run.model_step(step)),
            "sfcd_init_from": s.init_from,
            "sfcd_step": step,
            "dataset_path": str(run.tokens("train")),
            "context_size": s.seq_len or cfg.model.seq_len,
            "exclude_special_tokens": bool(s.exclude_special),
        }
    specs = make_specs(s, site_dims)
    todo = [sp for sp in specs if not (out_root / sp.name / "metrics.json").exists()]
    if not todo:
        log.info("all %d SAEs in %s are complete; skipping", len(specs), out_root)
        return [out_root / sp.name for sp in specs]
    need = sorted({sp.site for sp in todo})
    seq_len = s.seq_len or cfg.model.seq_len
    if model is not None:
        excl = _special_ids(tokenizer, s.exclude_special)
        need_sites = [x for x in sites if x.name in need]
        train_arrays = cached_or_harvest(
            run.root / "activations" / f"step{step}",
            model,
            read_tokens(run.tokens("train")),
            need_sites,
            s.n_tokens,
            seq_len,
            s.harvest_batch,
            excl,
            {"model": meta_base["model_name"], "step": step},
            bool(s.cache),
        )
        val = read_tokens(run.tokens("val"))
        eval_arrays = harvest_arrays(model, val, need_sites, s.eval_tokens, seq_len, s.harvest_batch, excl)
    total = (
        max(1, min(len(a) for a in train_arrays.values()) // s.batch_size)
        if s.activations
        else max(1, s.n_tokens // s.batch_size)
    )
    state_dir = out_root / ".train"
    prepare_state_dir(state_dir, settings_of(todo, s, total))
    module = SAEModule(todo, s, total)
    train_module(module, cfg.trainer, state_dir, {k: train_arrays[k] for k in need}, callbacks)
    written = []
    for spec, sae in zip(todo, module.saes, strict=True):
        sae = sae.cpu().eval()
        metrics, fired = E.reconstruction_metrics(sae, eval_arrays[spec.site])
        dens, density = E.density_metrics(fired, len(eval_arrays[spec.site]))
        metrics |= dens
        if model is not None:
            windows = token_windows(val, seq_len, max(1, s.eval_tokens // seq_len))
            metrics |= E.spliced_losses(model, parse_site(spec.site, model), sae, windows)
        metrics |= {
            "name": spec.name,
            "site": spec.site,
            "architecture": spec.architecture,
            "d_in": spec.d_in,
            "d_sae": spec.d_sae,
            "train_tokens": total * s.batch_size,
            "hparams": spec.hparams,
            "lr": spec.lr,
        }
        folder = out_root / spec.name
        save_sae(sae, folder, {**meta_base, "sfcd_site": spec.site if spec.site != "file" else ""}, density)
        E.density_histogram(density, folder / "density.png", f"{spec.name} ({spec.architecture}, d_sae {spec.d_sae})")
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
    return written
