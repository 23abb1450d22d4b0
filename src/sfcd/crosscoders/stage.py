"""The ``crosscoder`` stage: one acausal crosscoder per site over K checkpoints, trained on the K checkpoints'
activations at the same tokens, then evaluated and read.

The K models run over the same windows (same seed, same exclusions) and their chunks are joined per token
(:class:`sfcd.activations.stream.ConcatSource`): memory is one chunk of ``K x d`` per token and site, whatever
``crosscoder.n_tokens``. Training is the SAE stage's loop (:class:`sfcd.sae.train.SAEModule`: Lightning, resumable,
deterministic, DDP), with crosscoder classes as the dictionaries; the settings ``crosscoder.*`` does not name
(betas, warmup, decay, clip, buffer dtype, harvest batch, exclusions, context length) are ``sae.*``'s.

Output per site, ``crosscoders/<site>/``: cfg.json + crosscoder_weights.safetensors (:mod:`sfcd.crosscoders.io`),
``step<N>/`` (each checkpoint's block as a SAELens SAE, seen alone), latents.safetensors (per latent and
checkpoint: decoder norms, RelDec, presence, emergence, death, cosines, Latent Scaling betas, density),
latents.json (per checkpoint: FVE, CE loss score, shares present / exclusive / emerged / died), latents.png,
and metrics.json (written last: it marks the crosscoder complete).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sfcd.activations.cache import torch_dtype
from sfcd.activations.harvest import harvest_rows, token_windows
from sfcd.activations.stream import ConcatSource, HarvestSource, check_buffer_fits
from sfcd.crosscoders.io import checkpoint_sae, save_checkpoint_saes, save_crosscoder
from sfcd.crosscoders.model import CROSSCODERS, Crosscoder
from sfcd.crosscoders.reading import Accumulator, decoder_stats, emergence_counts, summary
from sfcd.crosscoders.view import JointView
from sfcd.data.tokens import read_tokens
from sfcd.devices import work_device
from sfcd.errors import ConfigError, InputError
from sfcd.io import read_json, save_safetensors, write_json
from sfcd.models.loading import checkpoint
from sfcd.models.sites import Site, expand_sites, site_dim
from sfcd.paths import RunDir
from sfcd.sae import evaluate as E
from sfcd.sae.train import SAEModule, SAESpec, buffer_rows, prepare_state_dir, settings_of, train_module

log = logging.getLogger(__name__)

#: crosscoder.* keys that replace sae.*'s in the training loop
_LOOP_KEYS = ("lr", "batch_size", "n_tokens", "buffer_tokens", "seed", "checkpoint_every")


@dataclass
class CrosscoderSpec(SAESpec):
    def build(self) -> Crosscoder:
        return CROSSCODERS[self.architecture](self.d_in, self.d_sae, seed=self.seed, **self.hparams)


def crosscoder_steps(cfg: DictConfig) -> list[int]:
    """``crosscoder.steps``, else the study's steps (``study.steps``, or chosen from the train log), checked: at
    least two, none twice, in increasing order."""
    steps = [int(s) for s in (cfg.crosscoder.steps or cfg.study.steps)]
    if not steps and not cfg.model.source:
        from sfcd.study import study_steps

        steps = study_steps(cfg, RunDir(cfg.run_dir).require())["steps"]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        raise ConfigError(f"crosscoder.steps lists step {twice} more than once; list each checkpoint once")
    if len(steps) < 2:
        raise ConfigError(
            f"crosscoder.steps={steps}: a crosscoder reads K >= 2 checkpoints (K = 1 is an SAE: use `sfcd sae`)"
        )
    if steps != sorted(steps):
        raise ConfigError(f"crosscoder.steps={steps}: list the checkpoints in training order")
    return steps


def _loop_cfg(cfg: DictConfig) -> DictConfig:
    """``sae.*`` with the training-loop keys of ``crosscoder.*``: what :class:`SAEModule` reads."""
    return OmegaConf.merge(cfg.sae, {k: cfg.crosscoder[k] for k in _LOOP_KEYS}, {"init_from": None, "sweep": {}})


def _sites_and_width(c: DictConfig, models: list, steps: list[int]) -> tuple[list[Site], dict[str, int]]:
    sites = expand_sites(list(c.sites), models[-1])
    for model in models:
        expand_sites([s.name for s in sites], model)  # a site another checkpoint lacks: a clear error
    dims = {}
    for s in sites:
        widths = {step: site_dim(model, s) for model, step in zip(models, steps, strict=True)}
        if len(set(widths.values())) != 1:
            raise InputError(
                f"site {s.name} has different widths across checkpoints {widths}; a crosscoder needs one width "
                "per site: use checkpoints of one model"
            )
        dims[s.name] = widths[steps[0]]
    return sites, dims


def train_crosscoders(cfg: DictConfig, callbacks: list | None = None) -> list[Path]:
    """Train, evaluate, read and save a crosscoder per site in ``crosscoder.sites`` over ``crosscoder.steps``;
    skip those complete (for the same steps); resume."""
    c = cfg.crosscoder
    if c.architecture not in CROSSCODERS:
        raise ConfigError(f"crosscoder.architecture={c.architecture!r}; expected one of {sorted(CROSSCODERS)}")
    steps = crosscoder_steps(cfg)
    run = RunDir(cfg.run_dir)
    if not cfg.model.source:
        have = run.require().model_steps()
        missing = [s for s in steps if s not in have]
        if missing:
            raise InputError(f"crosscoder.steps {missing} are not checkpoints of {run.model}; the steps there: {have}")
    device = work_device(cfg.trainer)
    loaded = [checkpoint(cfg, s) for s in steps]
    models, tokenizer = [m.to(device) for m, _, _ in loaded], loaded[-1][1]
    for m in models:
        m.requires_grad_(False)
    sites, dims = _sites_and_width(c, models, steps)
    out_root = run.root / "crosscoders"

    def complete(s: Site) -> bool:
        m = out_root / s.name / "metrics.json"
        done = read_json(m) if m.exists() else {}
        return done.get("steps") == steps and done.get("architecture") == c.architecture

    todo = [s for s in sites if not complete(s)]
    if not todo:
        log.info("the crosscoders of %s in %s are complete; skipping", [s.name for s in sites], out_root)
        return [out_root / s.name for s in sites]
    if (out_root / "circuits").exists():  # found on the crosscoders about to be replaced
        log.info("removing %s: its circuits were found on earlier crosscoders", out_root / "circuits")
        shutil.rmtree(out_root / "circuits")
    xcfg = _loop_cfg(cfg)
    K, total = len(steps), max(1, c.n_tokens // c.batch_size)
    rows = buffer_rows(xcfg, total)
    check_buffer_fits(rows, {s.name: K * dims[s.name] for s in todo}, torch_dtype(xcfg.buffer_dtype), device)
    seq_len = cfg.sae.seq_len or cfg.model.seq_len
    excl = set(tokenizer.all_special_ids) if cfg.sae.exclude_special else set()
    tokens = read_tokens(run.tokens("train"))
    source = ConcatSource(
        [
            HarvestSource(m, tokens, todo, dims, seq_len, rows, xcfg.seed, excl, xcfg.harvest_batch, xcfg.buffer_dtype)
            for m in models
        ]
    )
    hp = {"n_blocks": K, "dead_tokens": cfg.sae.dead_tokens}
    hp |= {"k": c.k, "aux_coeff": cfg.sae.aux_coeff} if c.architecture == "batchtopk" else {}
    hp |= {"l1_coeff": c.l1_coeff, "l1_warmup": c.l1_warmup} if c.architecture == "l1" else {}
    specs = [
        CrosscoderSpec(s.name, s.name, c.architecture, K * dims[s.name], c.expansion * dims[s.name], c.lr, c.seed, hp)
        for s in todo
    ]
    state_dir = out_root / ".train"
    prepare_state_dir(state_dir, {**settings_of(specs, xcfg, total), "steps": steps})
    module = SAEModule(specs, xcfg, total)
    train_module(module, cfg.trainer, state_dir, source, callbacks)
    module.source = source = None
    val = read_tokens(run.tokens("val"))
    eval_windows = token_windows(val, seq_len, int(c.eval_tokens * 1.25 / seq_len) + 2)
    ce_windows = token_windows(val, seq_len, max(1, c.ce_tokens // seq_len))
    meta = {
        "steps": steps,
        "model_source": cfg.model.source or str(run.root),
        "context_size": seq_len,
        "exclude_special_tokens": sorted(excl),
        "dataset_path": str(run.tokens("train")),
    }
    written = []
    for spec, cc in zip(specs, module.saes, strict=True):
        site = next(s for s in todo if s.name == spec.site)
        cc = cc.to(device).eval()  # Lightning's teardown leaves the trained module on the CPU
        written.append(_finish(cc, site, models, steps, eval_windows, ce_windows, excl, c, xcfg, meta, out_root))
    shutil.rmtree(state_dir, ignore_errors=True)
    return [out_root / s.name for s in sites]


def _eval_acts(models: list, site: Site, dims: dict, windows: np.ndarray, n: int, excl, batch: int) -> torch.Tensor:
    """[n, K*d]: the K checkpoints' activations at ``site`` on the same held-out tokens."""
    parts = []
    for m in models:
        wins = (windows[b : b + batch] for b in range(0, len(windows), batch))
        parts.append(harvest_rows(m, wins, [site], dims, n, excl)[site.name])
    return torch.cat(parts, dim=1)


def _finish(cc: Crosscoder, site: Site, models, steps, eval_windows, ce_windows, excl, c, xcfg, meta, out_root) -> Path:
    K, folder = len(steps), out_root / site.name
    x = _eval_acts(models, site, {site.name: cc.d}, eval_windows, c.eval_tokens, excl, xcfg.harvest_batch)
    acc = Accumulator(cc)
    for xb in x.split(4096):
        acc.add(xb)
    density = (acc.fired.double() / max(1, acc.n)).cpu()
    live = density > 0
    stats = decoder_stats(cc, c.presence)
    beta = acc.latent_scaling()
    summ = summary(stats, beta, live, steps, c.scaling_flag)
    fve = acc.fve()
    save_crosscoder(cc, folder, {**meta, "site": site.name})  # both copy the weights to the CPU themselves
    cc.cfg = read_json(folder / "cfg.json")
    save_checkpoint_saes(cc, folder, {"sfcd_site": site.name, "model_name": meta["model_source"]})
    for k, row in enumerate(summ["per_checkpoint"]):
        solo, _ = E.reconstruction_metrics(checkpoint_sae(cc, k).to(x.device), x[:, k * cc.d : (k + 1) * cc.d])
        others = {j: models[j] for j in range(K) if j != k}
        view = JointView(cc, k, site, others)
        handle = view.attach(models[k])
        try:
            ce = E.spliced_losses(models[k], site, view, ce_windows, excl)
        finally:
            handle.remove()
        row |= {"fve": fve[k], "fve_alone": solo["fve"], "ce_loss_score": ce["ce_loss_score"]}
        log.info(
            "crosscoder %s @ step %d: FVE %.3f (block alone %.3f), CE score %.3f, present %.3f",
            site.name,
            steps[k],
            fve[k],
            solo["fve"],
            ce["ce_loss_score"],
            row["present"],
        )
    save_safetensors(
        folder / "latents.safetensors",
        {
            **{k: v.float() if v.dtype == torch.bool else v for k, v in stats.items()},
            "beta": beta,
            "density": density.float(),
        },
    )
    counts = emergence_counts(stats, live, K)
    latents = {
        "site": site.name,
        "steps": steps,
        "presence": c.presence,
        "emerged_at": {str(s): int(n) for s, n in zip(steps, counts, strict=True)},
        **summ,
    }
    write_json(folder / "latents.json", latents)
    from sfcd.report.plots import crosscoder_latents_plot

    crosscoder_latents_plot(latents, stats, live, folder / "latents.png")
    metrics = {
        "site": site.name,
        "architecture": c.architecture,
        "steps": steps,
        "d": cc.d,
        "d_sae": cc.d_sae,
        "l0": acc.l0 / max(1, acc.n),
        "dead_fraction": float((~live).float().mean()),
        "eval_tokens": acc.n,
        "train_tokens": max(1, c.n_tokens // c.batch_size) * c.batch_size,
        "fve": {str(s): r["fve"] for s, r in zip(steps, summ["per_checkpoint"], strict=True)},
        "ce_loss_score": {str(s): r["ce_loss_score"] for s, r in zip(steps, summ["per_checkpoint"], strict=True)},
        "shared_by_all": summ["shared_by_all"],
    }
    write_json(folder / "metrics.json", metrics)
    return folder
