"""The ``crosscoder`` stage: one acausal crosscoder per site over K checkpoints, trained on the K checkpoints'
activations at the same tokens, then evaluated and read.

The K models run over the same windows (same seed, same exclusions) and their chunks are joined per token
(:class:`sfcd.activations.stream.ConcatSource`): memory is one chunk of ``K x d`` per token and site, whatever
``crosscoder.n_tokens``. Before anything is trained or removed, :func:`plan_training` counts every part (models,
chunks, weights, gradients, Adam, a batch; :mod:`sfcd.crosscoders.memory`): the sites train together when they
fit, in groups one after another when not, and a site that cannot fit alone stops the stage with one line naming
what would. Evaluation streams (one harvest batch of ``K x d`` at a time): after training, one pass over
``crosscoder.scaling_tokens`` training tokens (every site of the group at once) gives Latent Scaling, support counts
and each checkpoint's mean activation (the block means that checkpoint-alone views need); then each site's held-out
``eval_tokens`` give FVE (joint and alone) and densities, and ``ce_tokens`` each checkpoint's CE loss score alone.
Training is the SAE stage's loop
(:class:`sfcd.sae.train.SAEModule`: Lightning, resumable, deterministic, DDP), with crosscoder classes as the
dictionaries; the settings ``crosscoder.*`` does not name (betas, warmup, decay, clip, buffer dtype, harvest
batch, exclusions, context length) are ``sae.*``'s.

Output per site, ``crosscoders/<site>/``: cfg.json + crosscoder_weights.safetensors (:mod:`sfcd.crosscoders.io`),
``step<N>/`` (each checkpoint alone as a SAELens SAE), latents.safetensors (per latent and checkpoint: decoder norms,
RelDec and its bins, presence, onset, offset, transient, gaps, emergence, death, cosines, Latent Scaling betas and
ratios with intervals, support, density), latents.json (per checkpoint: FVE, CE loss score, shares present /
exclusive / onset / offset / emerged / died / per RelDec bin; histograms; support quantiles), latents.png,
and metrics.json (written last: it marks the crosscoder complete).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sfcd.activations.cache import torch_dtype
from sfcd.activations.harvest import harvest, token_windows
from sfcd.activations.stream import ConcatSource, HarvestSource
from sfcd.crosscoders.io import save_checkpoint_saes, save_crosscoder
from sfcd.crosscoders.memory import GIB, HEADROOM, PlanInputs, Schedule, describe, fmt_bytes, schedule_sites
from sfcd.crosscoders.model import CROSSCODERS, Crosscoder
from sfcd.crosscoders.reading import Accumulator, decoder_stats, emergence_counts, lifecycle_counts, summary
from sfcd.crosscoders.view import alone_view
from sfcd.data.tokens import read_tokens
from sfcd.devices import available_bytes, work_device
from sfcd.errors import ConfigError, InputError
from sfcd.io import read_json, save_safetensors, write_json
from sfcd.models.loading import checkpoint, provenance, warn_identical
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
        from sfcd.models.train_log import study_steps

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
    """``sae.*`` with the training-loop keys of ``crosscoder.*``: what :class:`SAEModule` reads. No prefetch: the
    memory plan (:mod:`sfcd.crosscoders.memory`) counts one joined chunk, the largest part at large K. Eager
    losses (``sae.compile`` is measured for SAEs only)."""
    return OmegaConf.merge(
        cfg.sae,
        {k: cfg.crosscoder[k] for k in _LOOP_KEYS},
        {"init_from": None, "sweep": {}, "prefetch": False, "compile": False},
    )


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
    xcfg = _loop_cfg(cfg)
    K, total = len(steps), max(1, c.n_tokens // c.batch_size)
    rows = buffer_rows(xcfg, total)
    # before anything is removed or trained: a crosscoder that cannot fit stops here, nothing lost
    schedule = plan_training(cfg, rows, K, {s.name: dims[s.name] for s in todo}, models, device)
    if (out_root / "circuits").exists():  # found on the crosscoders about to be replaced
        log.info("removing %s: its circuits were found on earlier crosscoders", out_root / "circuits")
        shutil.rmtree(out_root / "circuits")
    seq_len = cfg.sae.seq_len or cfg.model.seq_len
    excl = set(tokenizer.all_special_ids) if cfg.sae.exclude_special else set()
    tokens = read_tokens(run.tokens("train"))
    hp = {"n_blocks": K, "dead_tokens": cfg.sae.dead_tokens}
    hp |= {"k": c.k, "aux_coeff": cfg.sae.aux_coeff} if c.architecture == "batchtopk" else {}
    hp |= {"l1_coeff": c.l1_coeff, "l1_warmup": c.l1_warmup} if c.architecture == "l1" else {}
    val = read_tokens(run.tokens("val"))
    eval_windows = token_windows(val, seq_len, int(c.eval_tokens * 1.25 / seq_len) + 2)
    ce_windows = token_windows(val, seq_len, max(1, c.ce_tokens // seq_len))
    provenances = {s: provenance(m) for s, m in zip(steps, models, strict=True)}
    meta = {
        "steps": steps,
        "model_source": cfg.model.source or str(run.root),
        # which checkpoints exactly (source, step, dtype used and stored, weights sha256), and any two identical
        "sfcd_models": {str(s): p for s, p in provenances.items()},
        "identical_checkpoints": warn_identical(provenances),
        "context_size": seq_len,
        "exclude_special_tokens": sorted(excl),
        "dataset_path": str(run.tokens("train")),
    }
    rank0 = True
    for group in schedule.groups:
        group_sites = [s for s in todo if s.name in group]
        source = ConcatSource(
            [
                HarvestSource(
                    m, tokens, group_sites, dims, seq_len, rows, xcfg.seed, excl, xcfg.harvest_batch, xcfg.buffer_dtype
                )
                for m in models
            ]
        )
        specs = [
            CrosscoderSpec(
                s.name, s.name, c.architecture, K * dims[s.name], c.expansion * dims[s.name], c.lr, c.seed, hp
            )
            for s in group_sites
        ]
        state_dir = out_root / ".train" / "+".join(group)
        prepare_state_dir(state_dir, {**settings_of(specs, xcfg, total), "steps": steps})
        module = SAEModule(specs, xcfg, total)
        train_module(module, cfg.trainer, state_dir, source, callbacks)
        module.source = source = None
        rank0 = module.trainer.is_global_zero
        if not rank0:  # DDP's other ranks: rank 0 evaluates and writes
            continue
        # Lightning's teardown leaves the trained modules on the CPU
        ccs = {spec.site: cc.to(device).eval() for spec, cc in zip(specs, module.saes, strict=True)}
        scaled = _scaling_pass(ccs, models, group_sites, tokens, seq_len, int(c.scaling_tokens), excl, c, xcfg)
        for site in group_sites:
            _finish(
                ccs[site.name],
                scaled[site.name],
                site,
                models,
                steps,
                eval_windows,
                ce_windows,
                excl,
                c,
                xcfg,
                meta,
                out_root,
            )
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not rank0:
        return []
    shutil.rmtree(out_root / ".train", ignore_errors=True)
    return [out_root / s.name for s in sites]


def plan_training(cfg: DictConfig, rows: int, K: int, dims: dict[str, int], models: list, device) -> Schedule:
    """The groups of sites trained together (:func:`sfcd.crosscoders.memory.schedule_sites`) under
    ``crosscoder.memory_limit`` GiB, or, when it is 0, 0.8 x what the device had free before the K models were
    put on it; an :class:`InputError` of one line when not even one site fits."""
    c, xcfg = cfg.crosscoder, _loop_cfg(cfg)
    precision = str(cfg.trainer.precision)
    model_each = max(
        sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()) if t.device == torch.device(device))
        for m in models
    )
    inputs = PlanInputs(
        K=K,
        expansion=int(c.expansion),
        rows=rows,
        batch_size=int(c.batch_size),
        buffer_dtype=torch_dtype(xcfg.buffer_dtype),
        param_dtype=torch.bfloat16 if precision.startswith("bf16-true") else torch.float32,
        adam_states=2,
        autocast_dtype=torch.bfloat16 if precision.endswith("mixed") else None,
        model_bytes_each=model_each,
    )
    if c.memory_limit and c.memory_limit > 0:
        limit, where = int(c.memory_limit * GIB), "crosscoder.memory_limit allows"
    else:
        free = available_bytes(torch.device(device))
        limit = int(HEADROOM * free) + K * model_each  # the models were counted out of `free` already
        where = f"that {HEADROOM:g} x the free memory of {device} allows (or set crosscoder.memory_limit)"
    schedule = schedule_sites(dims, inputs, limit, where)
    for group, parts in zip(schedule.groups, schedule.plans, strict=True):
        log.info("crosscoders of %s trained together: %s of %s", group, describe(parts), fmt_bytes(limit))
    if not schedule.together:
        log.info(
            "the %d sites do not fit together in %s: training them in %d groups, one after another",
            len(dims),
            fmt_bytes(limit),
            len(schedule.groups),
        )
    return schedule


def _eval_blocks(models: list, site: Site, windows: np.ndarray, n: int, excl, batch: int) -> Iterator[torch.Tensor]:
    """Blocks [b, K*d] of the K checkpoints' activations at ``site`` on the same held-out tokens (one harvest
    batch of windows each, ``n`` rows in all): memory is one block, whatever ``n``."""
    seen = 0
    for b in range(0, len(windows), batch):
        w = windows[b : b + batch]
        x = torch.cat([next(harvest(m, [w], [site], exclude_ids=excl))[site.name] for m in models], dim=1)
        x = x[: n - seen]
        seen += len(x)
        yield x
        if seen >= n:
            return


def _scaling_pass(
    ccs: dict[str, Crosscoder], models: list, sites: list[Site], tokens: np.ndarray, seq_len: int, n: int, excl, c, xcfg
) -> dict[str, Accumulator]:
    """One streamed pass over the first ``n`` rows of the training tokens (consecutive windows, read lazily from
    the memory-mapped file) through the K models, every site of the group at once: per site an
    :class:`Accumulator` with ``crosscoder.scaling_blocks`` blocks (Latent Scaling sums, support counts, and the
    block means). Memory: one harvest batch of K x d per site and the accumulators' fixed sums, whatever ``n``."""
    accs = {s.name: Accumulator(ccs[s.name], blocks=c.scaling_blocks) for s in sites}
    batch = int(xcfg.harvest_batch)
    n_windows = len(tokens) // seq_len
    seen = 0
    for b in range(0, n_windows, batch):
        w = np.asarray(tokens[b * seq_len : min(n_windows, b + batch) * seq_len], dtype=np.int64).reshape(-1, seq_len)
        acts = [next(harvest(m, [w], sites, exclude_ids=excl)) for m in models]
        rows = 0
        for s in sites:
            x = torch.cat([a[s.name] for a in acts], dim=1)[: n - seen]
            rows = len(x)
            for xb in x.split(2048):
                accs[s.name].add(xb)
        seen += rows
        if seen >= n:
            break
    if seen < n:
        log.warning(
            "Latent Scaling: the training tokens hold %d rows, fewer than crosscoder.scaling_tokens=%d", seen, n
        )
    for s in sites:
        cc = ccs[s.name]
        with torch.no_grad():
            cc.block_mean.copy_(accs[s.name].means().reshape(-1).to(cc.block_mean.device))
    return accs


def _finish(
    cc: Crosscoder,
    scaled: Accumulator,
    site: Site,
    models,
    steps,
    eval_windows,
    ce_windows,
    excl,
    c,
    xcfg,
    meta,
    out_root,
) -> Path:
    K, folder = len(steps), out_root / site.name
    # FVE (the crosscoder's and each checkpoint's alone), densities and L0 over the held-out evaluation tokens;
    # Latent Scaling and the block means came from the scaling pass over the training tokens (scaled)
    acc = Accumulator(cc, blocks=1)
    for block in _eval_blocks(models, site, eval_windows, c.eval_tokens, excl, xcfg.harvest_batch):
        for xb in block.split(2048):
            acc.add(xb)
    density = (acc.fired.double() / max(1, acc.n)).cpu()
    live = density > 0
    stats = decoder_stats(cc, c.presence)
    scaling = scaled.latent_scaling(resamples=c.scaling_resamples, seed=c.seed)
    beta = scaling["beta"]
    summ = summary(stats, beta, live, steps, c.scaling_flag, scaling)
    fve, fve_alone = acc.fve(), acc.fve_alone()
    save_crosscoder(cc, folder, {**meta, "site": site.name})  # both copy the weights to the CPU themselves
    cc.cfg = read_json(folder / "cfg.json")
    save_checkpoint_saes(cc, folder, {"sfcd_site": site.name, "model_name": meta["model_source"]})
    for k, row in enumerate(summ["per_checkpoint"]):
        ce = E.spliced_losses(models[k], site, alone_view(cc, k), ce_windows, excl)
        row |= {"fve": fve[k], "fve_alone": fve_alone[k], "ce_loss_score": ce["ce_loss_score"]}
        log.info(
            "crosscoder %s @ step %d: FVE %.3f (alone %.3f), CE score alone %.3f, present %.3f",
            site.name,
            steps[k],
            fve[k],
            fve_alone[k],
            ce["ce_loss_score"],
            row["present"],
        )
    save_safetensors(
        folder / "latents.safetensors",
        {
            **{k: v.float() if v.dtype == torch.bool else v for k, v in stats.items()},
            **{k: v for k, v in scaling.items()},
            "density": density.float(),
        },
    )
    counts = emergence_counts(stats, live, K)
    life = lifecycle_counts(stats, live, K)
    latents = {
        "site": site.name,
        "steps": steps,
        "presence": c.presence,
        "rules": {
            "present": f"decoder norm >= {c.presence:g} x the latent's largest (the relative-norm rule)",
            "reldec_bins": "Bayazit et al.: RelDec < 0.3 absent, 0.3-0.7 shared, > 0.7 dominant (K-way, and per "
            "adjacent pair)",
            "onset": "first checkpoint present; offset: the one after the last present (none when present at the "
            "last); transient: absent at the first and the last checkpoint; gap: absent between two present ones",
            "emerged": "present from that checkpoint to the last",
        },
        "emerged_at": {str(s): int(n) for s, n in zip(steps, counts, strict=True)},
        "onset_at": {str(s): int(n) for s, n in zip(steps, life["onset"], strict=True)},
        "offset_at": {str(s): int(n) for s, n in zip(steps, life["offset"], strict=True)},
        "transient_onset_at": {str(s): int(n) for s, n in zip(steps, life["transient_onset"], strict=True)},
        "latent_scaling": {
            "tokens": scaled.n,
            "data": "the first crosscoder.scaling_tokens rows of the training tokens, in file order",
            "blocks": scaled.blocks,
            "resamples": int(c.scaling_resamples),
            "ratios": "nu_eps (error + own term), nu_r (reconstruction - own term), each / its strongest "
            "checkpoint's; intervals: 2.5-97.5 percentiles over block resamples (latents.safetensors)",
        },
        "alone": "checkpoint m alone: the other checkpoints' encoder terms at their mean activation (block_means)",
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
        "latent_scaling_tokens": scaled.n,
        "train_tokens": max(1, c.n_tokens // c.batch_size) * c.batch_size,
        "fve": {str(s): r["fve"] for s, r in zip(steps, summ["per_checkpoint"], strict=True)},
        "ce_loss_score": {str(s): r["ce_loss_score"] for s, r in zip(steps, summ["per_checkpoint"], strict=True)},
        "shared_by_all": summ["shared_by_all"],
    }
    write_json(folder / "metrics.json", metrics)
    return folder
