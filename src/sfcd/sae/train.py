"""The ``sae`` stage: train one or many SAEs from one activation stream with Lightning, then evaluate and
write each in the SAELens layout.

Many SAEs (every site, and/or a hyperparameter grid ``sae.sweep``) train side by side on the same batches;
each has its own parameter group, gradient clip and seed-determined initialisation, so an SAE trained with
others is the SAE trained alone. The training state is saved every ``sae.checkpoint_every`` steps and a rerun
resumes from it; batches are a function of the step (:class:`sfcd.activations.stream.StreamBatches`), streamed
chunk by chunk from a model or an activation file in bounded memory, on the device of the trainer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from sfcd.activations.stream import ArraySource, ChunkSource, StreamBatches, prefetch_on
from sfcd.errors import ConfigError, SfcdError
from sfcd.io import read_json, write_json
from sfcd.sae.base import SAE, extremes, geometric_median, read_dead_sets
from sfcd.sae.registry import sae_class
from sfcd.sae.sparse_ops import release_workspace
from sfcd.training import SaveEvery, clip_grad_norms_, make_trainer

log = logging.getLogger(__name__)

#: config keys that are hyperparameters of an SAE (passed to its class), by architecture
HPARAMS = {
    "relu": ("l1_coeff", "l1_warmup", "resample_every", "dead_tokens"),
    "relu_reference": ("l1_coeff", "resample_every", "resample_tokens", "resample_density", "schedule_scale"),
    "topk": ("k", "aux_coeff", "dead_tokens"),
    "batchtopk": ("k", "aux_coeff", "dead_tokens"),
    "jumprelu": ("l0_coeff", "bandwidth", "threshold_init"),
    "transcoder": ("k", "aux_coeff", "dead_tokens", "skip"),
}
#: the version of how a resumable state stores an SAE (2: the encoder as ``W_enc_T``, [d_sae, d_in]); a state of
#: another version is started afresh (:func:`prepare_state_dir`) rather than misread
STATE_LAYOUT = 2
SWEEPABLE = {"architecture", "expansion", "d_sae", "lr", "seed", *{k for ks in HPARAMS.values() for k in ks}}


@dataclass
class SAESpec:
    """One SAE (or transcoder) to train: where its output goes, which site it reconstructs, its shape and
    hyperparameters. A transcoder reads ``in_site`` (``mlp_in.<l>``) and reconstructs ``site`` (``mlp.<l>``)."""

    name: str
    site: str
    architecture: str
    d_in: int
    d_sae: int
    lr: float
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)
    in_site: str | None = None

    @property
    def input_site(self) -> str:
        """The site whose activations it encodes."""
        return self.in_site or self.site

    @property
    def key(self) -> str:
        """Its unique name among the SAEs and transcoders trained together (logs, densities): a transcoder of
        ``mlp.<l>`` is ``transcoder/mlp.<l>`` beside the SAE ``mlp.<l>`` (both write folders named ``mlp.<l>``)."""
        return f"transcoder/{self.name}" if self.in_site else self.name

    def build(self) -> SAE:
        return sae_class(self.architecture)(self.d_in, self.d_sae, seed=self.seed, **self.hparams)


def merge_param_groups(checkpoint: dict, runs: list[int]) -> None:
    """A training state saved with one optimizer parameter group per SAE (before they were grouped by runs of
    equal lr, :meth:`SAEModule._lr_runs`), rewritten in place to the groups ``runs`` describes: each run's groups
    joined in order (the parameters keep their indices, so their Adam moments stay theirs) and the LR scheduler's
    per-group lists cut to one entry per group. A state already in that layout is left as it is."""
    opts, scheds = checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or []
    if len(opts) != 1 or len(opts[0]["param_groups"]) != sum(runs) or len(runs) == sum(runs):
        return
    old, merged, i = opts[0]["param_groups"], [], 0
    for n in runs:
        merged.append({**old[i], "params": [p for g in old[i : i + n] for p in g["params"]]})
        i += n
    opts[0]["param_groups"] = merged
    firsts = [sum(runs[:j]) for j in range(len(runs))]
    for sched in scheds:
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            if isinstance(sched.get(key), list) and len(sched[key]) == sum(runs):
                sched[key] = [sched[key][j] for j in firsts]


def make_specs(
    sae_cfg: DictConfig, site_dims: dict[str, int], transcoder_dims: dict[str, int] | None = None
) -> list[SAESpec]:
    """Sites x the sweep grid. The output name is the site, plus ``@key=value,...`` for swept values. Then one
    transcoder per MLP output site in ``transcoder_dims`` (named by the site; ``sae.transcoder`` over the SAE
    settings; not swept), reading ``mlp_in.<l>``."""
    sweep = OmegaConf.to_container(sae_cfg.sweep, resolve=True) or {}
    unknown = set(sweep) - SWEEPABLE
    if unknown:
        raise ConfigError(f"sae.sweep keys {sorted(unknown)} cannot be swept; sweepable: {sorted(SWEEPABLE)}")
    keys = sorted(sweep)
    grid = list(itertools.product(*(sweep[k] if isinstance(sweep[k], list) else [sweep[k]] for k in keys)))
    per_site = OmegaConf.to_container(sae_cfg.per_site, resolve=True) or {}
    for key, over in per_site.items():
        bad = set(over or {}) - SWEEPABLE
        if bad:
            raise ConfigError(
                f"sae.per_site.{key} sets {sorted(bad)}, which cannot differ by site; allowed: {sorted(SWEEPABLE)}"
            )
    specs = []
    for site, d_in in site_dims.items():
        # the site's own settings: its exact name's entry over its kind's (resid.1 over resid)
        own = {**(per_site.get(site.split(".")[0]) or {}), **(per_site.get(site) or {})}
        for values in grid:
            c = {**OmegaConf.to_container(sae_cfg, resolve=True), **own, **dict(zip(keys, values, strict=True))}
            sae_class(c["architecture"])  # clear error for an unknown architecture
            d_sae = int(c["d_sae"] or c["expansion"] * d_in)
            suffix = ",".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
            hp = {k: c[k] for k in HPARAMS[c["architecture"]]}
            specs.append(
                SAESpec(
                    f"{site}@{suffix}" if suffix else site,
                    site,
                    c["architecture"],
                    d_in,
                    d_sae,
                    float(c["lr"]),
                    int(c["seed"]),
                    hp,
                )
            )
    return specs + transcoder_specs(sae_cfg, transcoder_dims or {})


def transcoder_specs(sae_cfg: DictConfig, dims: dict[str, int]) -> list[SAESpec]:
    """One TopK transcoder per MLP output site (``mlp.<l>`` -> its width): the SAE settings of that site
    (``sae.per_site``) with ``sae.transcoder``'s set ones over them (an ``expansion`` set there wins over the
    SAEs' ``d_sae``)."""
    over = {k: v for k, v in (OmegaConf.to_container(sae_cfg.transcoder, resolve=True) or {}).items() if v is not None}
    per_site = OmegaConf.to_container(sae_cfg.per_site, resolve=True) or {}
    specs = []
    for site, d in dims.items():
        # the SAE settings of the same site (sae.per_site: mlp, mlp.<l>), so that a transcoder and the SAE of
        # its MLP's output are the same size unless sae.transcoder says otherwise
        own = {
            k: v
            for k, v in {**(per_site.get("mlp") or {}), **(per_site.get(site) or {})}.items()
            if k != "architecture"
        }
        c = {**OmegaConf.to_container(sae_cfg, resolve=True), **own, **over}
        if "expansion" in over and "d_sae" not in over:
            c["d_sae"] = None
        hp = {k: c[k] for k in HPARAMS["transcoder"]}
        d_sae = int(c["d_sae"] or c["expansion"] * d)
        in_site = "mlp_in." + site.split(".")[1]
        specs.append(SAESpec(site, site, "transcoder", d, d_sae, float(c["lr"]), int(c["seed"]), hp, in_site))
    return specs


@torch.no_grad()
def warm_start(sae: SAE, folder: Path) -> None:
    """Start from a saved SAE (same architecture and shape), or a saved transcoder: its folded weights are unfolded
    with this one's input (and output) scale, so the warm-started one computes the saved one's function on raw
    activations."""
    from sfcd.errors import InputError
    from sfcd.sae.io import load_sae, load_transcoder

    old = load_transcoder(folder) if sae.is_transcoder else load_sae(folder)
    if (old.d_in, old.d_sae) != (sae.d_in, sae.d_sae):
        raise InputError(
            f"cannot warm-start from {folder}: its shape {(old.d_in, old.d_sae)} is not {(sae.d_in, sae.d_sae)}"
        )
    if sae.is_transcoder:  # raw -> scaled units: inputs times scale, outputs times out_scale
        if (old.W_skip is None) != (sae.W_skip is None):
            raise InputError(f"cannot warm-start from {folder}: its skip path differs (sae.transcoder.skip)")
        s, t = sae.scale, sae.out_scale
        sae.W_enc.copy_(old.W_enc / s)
        sae.b_enc.copy_(old.b_enc)
        sae.W_dec.copy_(old.W_dec * t)
        sae.b_dec.copy_(old.b_dec * t)
        if sae.W_skip is not None:
            sae.W_skip.copy_(old.W_skip * (t / s))
        return
    s = sae.scale
    sae.W_enc.copy_(old.W_enc / s)
    sae.b_enc.copy_(old.b_enc)
    sae.W_dec.copy_(old.W_dec * s)
    sae.b_dec.copy_(old.b_dec * s)
    if hasattr(old, "log_threshold") and hasattr(sae, "log_threshold"):
        sae.log_threshold.copy_(old.log_threshold)
    if hasattr(old, "threshold") and hasattr(sae, "threshold") and not hasattr(sae, "log_threshold"):
        sae.threshold.copy_(old.threshold.reshape(-1)[0])  # BatchTopK: one threshold (exported per latent)
    if sae.unit_norm_decoder:
        # the new input scale leaves decoder rows of norm s_new / s_old; the first renormalisation would rescale
        # the function, so move each row's norm into its latent now (exact: relu(n z) = n relu(z), and top-k
        # ranks are kept because every row has the same norm)
        n = sae.W_dec.norm(dim=1)
        sae.W_dec.div_(n[:, None])
        sae.W_enc.mul_(n[None, :])
        sae.b_enc.mul_(n)
        if hasattr(sae, "threshold") and not hasattr(sae, "log_threshold"):
            sae.threshold.mul_(n.mean())


#: batch key of the row numbers (in the chunk) of a rank's slice, under DDP
ROWS = "__rows__"


class _RankBatches(StreamBatches):
    """A rank's slice of each global batch, with its row numbers (so ranks can rebuild the one-process batch)."""

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return {**super().batch(step), ROWS: self.rows(step)}


def lr_factor(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    warmup, decay_start = max(1, int(warmup_frac * total)), int((1 - decay_frac) * total)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start and decay_frac > 0:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


class SAEModule(L.LightningModule):
    """Several SAEs trained side by side (manual optimization: a clip and decoder projection per SAE)."""

    def __init__(self, specs: list[SAESpec], sae_cfg: DictConfig, total_steps: int, source: ChunkSource | None = None):
        super().__init__()
        self.specs, self.cfg, self.total_steps, self.source = specs, sae_cfg, total_steps, source
        keys = [s.key for s in specs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:  # their logs, densities and output folders are keyed by it
            raise ConfigError(
                f"two SAEs trained together are both named {twice}: a value listed twice in sae.sweep (or a site "
                "twice); list each once"
            )
        self.saes = nn.ModuleList(s.build() for s in specs)
        self.automatic_optimization = False
        # one CPU generator per SAE (draws do not depend on the device, nor on which other SAEs train beside it:
        # a site-parallel shard resamples as the job training every site does); saved with the training state
        self._gens = [torch.Generator().manual_seed(sae_cfg.seed) for _ in specs]
        self._first_bad: torch.Tensor | None = None  # see _note_bad
        self._grad_clip = float(sae_cfg.grad_clip)  # read at every step: a float, not an OmegaConf lookup
        self._compile, self._fns = bool(sae_cfg.get("compile", False)), None  # see _loss_fns

    @property
    def _g(self) -> torch.Generator:
        """The first SAE's resampling generator (a module of one SAE: its only one)."""
        return self._gens[0]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # no state after a bad step is saved (every rank raises: the flags are reduced)
        checkpoint["sfcd_resample_generators"] = [g.get_state() for g in self._gens]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for g, state in zip(self._gens, checkpoint.get("sfcd_resample_generators", []), strict=False):
            g.set_state(state)
        merge_param_groups(checkpoint, self._lr_runs())

    @torch.no_grad()
    def initialise(self, data: ChunkSource | dict[str, np.ndarray]) -> None:
        """Input scale (E||x|| = sqrt(d_in)) and, for top-k SAEs, b_dec at the geometric median of a batch."""
        samples = data.sample(8192) if isinstance(data, ChunkSource) else None
        for spec, sae in zip(self.specs, self.saes, strict=True):
            if samples is not None:
                sample, target = samples[spec.input_site], samples[spec.site]
            else:
                sample = torch.from_numpy(np.asarray(data[spec.input_site][:8192], dtype=np.float32))
                target = torch.from_numpy(np.asarray(data[spec.site][:8192], dtype=np.float32))
            ok = torch.isfinite(sample).all(1) & torch.isfinite(target).all(1)  # a bad row: at its training step
            sample, target = sample[ok], target[ok]
            if sae.normalize_input:
                try:
                    sae.fit_input_scale(sample)
                    if sae.is_transcoder:
                        sae.fit_output_scale(target)
                except ValueError as e:
                    raise SfcdError(f"activations at {spec.input_site} or {spec.site}: {e}") from None
            if sae.is_transcoder:
                sae.init_biases(sample * sae.scale, target * sae.out_scale)
            if sae.apply_b_dec_to_input and sae.b_dec_at_median:
                sae.b_dec.copy_(geometric_median(sample[:4096] * sae.scale))
            start = self.cfg.transcoder.get("init_from") if sae.is_transcoder else self.cfg.get("init_from")
            if start:
                warm_start(sae, Path(start) / spec.name)

    def _lr_runs(self) -> list[int]:
        """How many consecutive SAEs share each parameter group: one group per run of SAEs with the same lr (one
        group for all, unless a sweep varies the lr), each SAE's parameters in their order, so a step's Adam is
        one call (one fused kernel) per group rather than per SAE."""
        runs: list[int] = []
        for i, spec in enumerate(self.specs):
            if i and spec.lr == self.specs[i - 1].lr:
                runs[-1] += 1
            else:
                runs.append(1)
        return runs

    def configure_optimizers(self):
        groups, start = [], 0
        for n in self._lr_runs():
            params = [p for sae in self.saes[start : start + n] for p in sae.parameters()]
            groups.append({"params": params, "lr": self.specs[start].lr})
            start += n
        # fused: one kernel for every parameter's update (CPU and CUDA), several times faster than the loop of
        # per-op kernels (bench_sae.py); elsewhere torch's default
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        opt = torch.optim.Adam(groups, betas=tuple(self.cfg.betas), fused=fused or None)
        total, warmup, decay = self.total_steps, float(self.cfg.warmup_frac), float(self.cfg.decay_frac)
        # called for every parameter group at every step: floats, not OmegaConf lookups
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, decay))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        if self.cfg.batch_size % t.world_size:
            raise ConfigError(
                f"sae.batch_size={self.cfg.batch_size} does not split evenly over {t.world_size} DDP processes; "
                "use a multiple of the number of devices"
            )
        self.source.to(self.device)  # harvest where the SAEs train; batches are made on that device
        cls = _RankBatches if t.world_size > 1 else StreamBatches
        self.stream = cls(
            self.source,
            self.cfg.batch_size,
            self.cfg.seed,
            start=t.global_step,
            rank=t.global_rank,
            world=t.world_size,
            prefetch=prefetch_on(self.cfg.get("prefetch", "auto"), self.device),
            stop=self.total_steps,
        )
        return DataLoader(self.stream, batch_size=None, num_workers=0)

    def _world(self) -> int:
        """Processes whose gradients are averaged (1 outside DDP)."""
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.trainer.world_size if ready and self._trainer is not None else 1

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Each SAE's forward in turn, then the backward, each SAE's clip and decoder projection, and one
        optimizer step for all.

        Where every SAE's graph is small (:attr:`SAE.small_graph`: TopK's sparse path, whose graph keeps no
        [B, d_sae] tensor), one backward pass over the sum of their losses (the same gradients: each loss reaches its
        own parameters only), so that the host's work around a pass (Lightning's hooks, autograd's entry) is paid
        once a step rather than once per SAE: on a GPU, where the host's work is the floor of an all-sites step
        (``bench_sae.host_overhead``). Otherwise each SAE's backward right after its forward, so that one graph
        with [B, d_sae] tensors is alive at a time.

        Under DDP each rank holds a slice of the global batch. DDP's own reducer expects every parameter's
        gradient from each backward pass, but here each backward reaches one SAE only, so it is switched off
        (``block_backward_sync``) and each SAE's gradients are all-reduced (averaged) right after its backward,
        asynchronously, overlapping the next SAE's compute; the clip and projection then see the global
        gradient, as in one process. Which latents fired is reduced too (logical or), so dead-latent counts, AuxK
        and resampling agree on every rank and with one process."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        step = self.global_step
        progress = step / max(1, self.total_steps)
        world = self._world()
        opt.zero_grad(set_to_none=True)
        outs, pending, checks, losses = [], [], [], []
        # one pass for all (above); not under DDP, where each SAE's all-reduce overlaps the next SAE's compute
        joint = world == 1 and all(sae.small_graph for sae in self.saes)
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)  # DDP's: no_sync
        # AuxK's dead sets, where a latent may have died since the last look, in one host read for every SAE (on a
        # GPU one sync a step, not one per SAE, each of which would drain the GPU's queue)
        read_dead_sets(self.saes)
        with no_sync():
            for spec, sae, loss_fn in zip(self.specs, self.saes, self._loss_fns(), strict=True):
                x = batch[spec.input_site]
                if sae.is_transcoder:
                    y = batch[spec.site]
                    out = loss_fn(x * sae.scale, progress, target=y * sae.out_scale)
                    ext = extremes(x, y)
                else:
                    out = loss_fn(x * sae.scale, progress)
                    ext = extremes(x)
                # the input's extremes and the loss, finite or not: tested for all SAEs at once after the loop, kept
                # on the device (_note_bad) and read at intervals, not at every step
                checks.append(torch.cat([ext.float(), out["loss"].detach().reshape(1).float()]))
                if joint:
                    losses.append(out["loss"])
                else:
                    self.manual_backward(out["loss"])
                if world > 1:  # the same parameters get gradients on every rank: the graph does not depend on data
                    pending += [
                        torch.distributed.all_reduce(p.grad, async_op=True)
                        for p in sae.parameters()
                        if p.grad is not None
                    ]
                outs.append({k: v.detach() for k, v in out.items() if k in ("fired", "mse", "l0", "per_token_mse")})
                del out
            if losses:  # inside no_sync: under a DDP strategy with one process, DDP's reducer stays off too
                self.manual_backward(torch.stack(losses).sum())
        fin = torch.stack(checks).isfinite()  # [SAEs, (smallest input, largest input, loss)]
        fired, bad = [o["fired"] for o in outs], ~torch.stack([fin[:, 0] & fin[:, 1], fin[:, 2]], 1)  # (input, loss)
        if world > 1:  # which latents fired on any rank, and any rank's bad input or loss: one reduction
            flat = torch.cat([f.to(torch.int32) for f in fired] + [bad.flatten().to(torch.int32)])
            torch.distributed.all_reduce(flat)
            *fired, bad = flat.split([f.numel() for f in fired] + [bad.numel()])
            fired, bad = [f > 0 for f in fired], (bad > 0).view(-1, 2)
        # a bad batch or a diverged SAE stops the run, on every rank at once (the flags are reduced), before any
        # state after it is saved: each check's first bad step kept on the device and read where the host reads
        # anyway (the logging interval, a save, a resampling pass, the run's end), not once a step
        self._note_bad(bad, step)
        if world > 1:
            for h in pending:
                h.wait()
            torch._foreach_div_([p.grad for p in self.saes.parameters() if p.grad is not None], world)
        if self._grad_clip > 0:  # each SAE's own clip, all in one pass
            clip_grad_norms_([list(sae.parameters()) for sae in self.saes], self._grad_clip)
        resample = []
        for i, (spec, sae, out) in enumerate(zip(self.specs, self.saes, outs, strict=True)):
            x = batch[spec.input_site]
            sae.record_firing(fired[i], len(x) * world)
            sae.before_step()
            every = sae.resample_period()
            if every and (step + 1) % every == 0 and "per_token_mse" in out:
                resample.append((spec, sae, x * sae.scale, out["per_token_mse"]))
        opt.step()
        sched.step()
        for sae in self.saes:
            sae.after_step()
        log_now = (step + 1) % self.trainer.log_every_n_steps == 0
        if log_now or step + 1 >= self.total_steps:
            # the checks' flags read (raising for a bad step) at the run's end, and at the logging interval with
            # every SAE's MSE and L0, in one read
            values = self.check_finite(torch.stack([torch.stack([o["mse"], o["l0"]]) for o in outs]))
            if log_now:
                self._log_metrics(step, values)
        if resample:
            # before resampling from the batch: an inf in it would make the draw's weights NaN (torch.multinomial's
            # error, not the check's); resampling reads the device anyway
            self.check_finite()
            if world > 1:  # every rank resamples from the global batch, in one process's row order
                resample = [(spec, sae, *self._gather(batch[ROWS], x, per)) for spec, sae, x, per in resample]
            self._resample(opt, resample, step)

    def _loss_fns(self) -> list:
        """Each SAE's ``training_loss``; with ``sae.compile``, through ``torch.compile`` where its class
        :attr:`~sfcd.sae.base.SAE.compiles` (ReLU; the others train eager, with a warning). Built on first use, in
        the process that trains (ddp_spawn's ranks pickle the module before it; a copy drops them,
        ``__getstate__``).

        SAEs of one class, shape and hyperparameters share compiled code (parameters are its inputs; dynamo
        specialises on the hyperparameters, and on a float argument's first value: the first step, ``progress ==
        0``, and the steps after it are two compiles). Dynamo keeps ``recompile_limit`` (8) versions of a function
        and runs the rest eager, silently, so the limit is raised to hold two per such group (a sweep of ten
        ``l1_coeff`` values would otherwise train six of its SAEs eager)."""
        if self._fns is None:
            fast = [self._compile and sae.compiles for sae in self.saes]
            if any(fast):
                groups = {
                    (type(sae), sae.d_in, sae.d_sae, repr(sorted(sae.hparams.items())))
                    for sae, f in zip(self.saes, fast, strict=True)
                    if f
                }
                config = torch._dynamo.config
                config.recompile_limit = max(config.recompile_limit, 2 * len(groups) + 2)
            slow = sorted({sae.architecture for sae, f in zip(self.saes, fast, strict=True) if self._compile and not f})
            if slow:
                log.warning("sae.compile: %s train eager (SAE.compiles: slower, or recompiling)", ", ".join(slow))
            self._fns = [
                torch.compile(sae.training_loss) if f else sae.training_loss
                for sae, f in zip(self.saes, fast, strict=True)
            ]
        return self._fns

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_fns"] = None  # compiled bound methods of these SAEs: a copy builds its own
        return state

    def _log_metrics(self, step: int, values: list[list[float]]) -> None:
        """Every SAE's MSE and L0 (``values``, one [mse, l0] per SAE, read from the device) to the loggers (CSV,
        TensorBoard) at ``step``, and the first SAE's on the progress bar.

        The progress bar's two as host tensors: Lightning's result collection keeps the last logged value and the
        bar reads it (``.item()``) at every step after, so a number, which ``self.log`` makes a tensor on the
        module's device, or a device tensor, would be a host sync at every step on a GPU. The rest to the
        loggers directly (``Logger.log_metrics``, as Lightning's own logger connector writes them), not through
        ``self.log``: Lightning's ``self.log`` costs about 1,900 Python calls a metric (its result collection
        moves each metric's whole state to the value's device on every call), 75,000 a logging step at 19 sites,
        six times a plain step's host work (``bench_sae.host_overhead``). So ``trainer.callback_metrics`` and
        ``progress_bar_metrics`` hold only the progress bar's two, and ``logged_metrics`` none."""
        metrics = {}
        for spec, (mse_v, l0_v) in zip(self.specs, values, strict=True):
            metrics[f"{spec.key}/mse"], metrics[f"{spec.key}/l0"] = mse_v, l0_v
        for name in list(metrics)[:2]:
            self.log(name, torch.tensor(metrics[name]), prog_bar=True, logger=False)  # logged with the rest below
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()

    @torch.no_grad()
    def _note_bad(self, bad: torch.Tensor, step: int) -> None:
        """Keep, on the device, the first step at which each SAE's input (column 0) or loss (column 1) was
        not finite (-1: none yet), from this step's flags ``bad`` [SAEs, 2]."""
        first = self._first_bad
        if first is None or first.device != bad.device or first.shape != bad.shape:
            first = self._first_bad = torch.full(bad.shape, -1, dtype=torch.long, device=bad.device)
        first.copy_(torch.where(bad & (first < 0), step, first))

    def check_finite(self, values: torch.Tensor | None = None) -> list[list[float]]:
        """Read the checks' flags (one host read, with ``values`` [n, m] if given, whose rows it returns as
        lists) and raise for the earliest bad step: NaN or inf in a site's activations, or an SAE's non-finite
        loss."""
        first = self._first_bad
        if first is None:
            return [] if values is None else values.tolist()
        parts = [first.flatten().double()] + ([] if values is None else [values.flatten().double()])
        flat = torch.cat(parts).tolist()
        firsts, rest = flat[: first.numel()], flat[first.numel() :]
        bad = [(int(s), i // 2, i % 2) for i, s in enumerate(firsts) if s >= 0]
        if bad:
            step, i, loss = min(bad)  # the earliest step; at one step, the first SAE's (its input before its loss)
            spec = self.specs[i]
            if not loss:
                raise SfcdError(
                    f"NaN or inf in the activations of site {spec.input_site}"
                    + (f" or {spec.site}" if spec.in_site else "")
                    + f" at training step {step}; "
                    "stopped, the last good training state is kept (check the model or the file)"
                )
            raise SfcdError(
                f"SAE {spec.name} diverged (a non-finite loss) at training step {step}; "
                "stopped, the last good training state is kept: lower sae.lr"
            )
        width = 0 if values is None else values.shape[1]
        return [rest[i : i + width] for i in range(0, len(rest), width)] if width else []

    @torch.no_grad()
    def _gather(self, rows: torch.Tensor, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's slice of the batch, joined and put in the order one process batches them (by row)."""

        def cat(t: torch.Tensor) -> torch.Tensor:
            out = [torch.empty_like(t) for _ in range(self._world())]
            torch.distributed.all_gather(out, t.contiguous())
            return torch.cat(out)

        order = cat(rows).argsort()
        return [cat(t)[order] for t in parts]

    @torch.no_grad()
    def _resample(self, opt, items: list, step: int) -> None:
        """Resample each SAE's dead features (after the optimiser's step, as both recipes do)."""
        fresh = [(spec, sae) for spec, sae, *_ in items if sae.resample_criterion == "fresh_density"]
        density = self.fresh_density(fresh, draw=step + 1) if fresh else {}
        for spec, sae, x, per_token in items:
            if sae.resample_criterion == "fresh_density":
                dead = density[spec.key] < float(sae.hparams["resample_density"])
            else:
                dead = sae.tokens_since_fired > sae.hparams.get("dead_tokens", 100_000)
            n = int(dead.sum())
            log.info("%s: resampling %d dead features at step %d", spec.name, n, step + 1)
            if n == 0:
                continue
            sae.resample(dead, x, per_token, self._gens[self.specs.index(spec)])
            if not sae.resample_resets_adam:
                continue
            for p, rows in ((sae.W_dec, (dead,)), (sae.W_enc_T, (dead,)), (sae.b_enc, (dead,))):
                state = opt.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][rows] = 0.0

    @torch.no_grad()
    def fresh_density(self, items: list[tuple[SAESpec, SAE]], draw: int) -> dict[str, torch.Tensor]:
        """Each SAE's feature density over its ``resample_sample_tokens()`` fresh activations (rows of the
        source outside the training order, the same on every rank), read block by block and encoded in
        batches of ``sae.batch_size`` rows, so memory is one block and one batch of latents."""
        n = max(sae.resample_sample_tokens() for _, sae in items)
        counts = {spec.key: torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_enc.device) for spec, sae in items}
        seen = 0
        for block in self.source.fresh(n, draw):
            rows = len(next(iter(block.values())))
            for spec, sae in items:
                take = max(0, min(rows, sae.resample_sample_tokens() - seen))
                for xb in block[spec.input_site][:take].split(int(self.cfg.batch_size)):
                    f = sae.activation(sae.pre_acts(xb.to(sae.W_enc.device, torch.float32) * sae.scale))
                    counts[spec.key] += (f > 0).sum(0)
            seen += rows
        return {spec.key: counts[spec.key] / sae.resample_sample_tokens() for spec, sae in items}


def buffer_rows(sae_cfg: DictConfig, total_steps: int) -> int:
    """Rows of one stream chunk: ``sae.buffer_tokens`` rounded down to whole batches, and no more than the run
    needs."""
    b = int(sae_cfg.batch_size)
    rows = min(int(sae_cfg.buffer_tokens), total_steps * b) // b * b
    if rows < b:
        raise ConfigError(
            f"sae.buffer_tokens={sae_cfg.buffer_tokens} holds less than one batch of sae.batch_size={b}; "
            "raise sae.buffer_tokens or lower sae.batch_size"
        )
    return rows


def train_module(
    module: SAEModule,
    trainer_cfg: DictConfig,
    state_dir: Path,
    data: ChunkSource | dict[str, np.ndarray],
    callbacks: list | None = None,
) -> SAEModule:
    """Fit (or resume) ``module`` for ``module.total_steps`` steps on a stream (or arrays, streamed the same way)."""
    if not isinstance(data, ChunkSource):
        rows = buffer_rows(module.cfg, module.total_steps)
        data = ArraySource(data, rows, module.cfg.seed, dtype=module.cfg.buffer_dtype)
    state = state_dir / "last.ckpt"
    if not state.exists():
        module.initialise(data)
    module.source = data
    saves = SaveEvery(state, module.cfg.checkpoint_every, module.cfg.get("checkpoint_minutes", 0.0))
    trainer = make_trainer(trainer_cfg, module.total_steps, state_dir, [saves, *(callbacks or [])])
    if state.exists():
        log.info("resuming SAE training from %s", state)
    try:
        trainer.fit(module, ckpt_path=str(state) if state.exists() else None, weights_only=True)
    finally:
        stream = getattr(module, "stream", None)
        if stream is not None:  # a prefetch in flight ends before anything else runs the model
            stream.close()
        release_workspace()
    # spawned ranks (ddp_spawn) return rank 0's weights and the trainer's state, not its step counter
    spawned_and_done = trainer.world_size > 1 and trainer.state.finished and not trainer.interrupted
    if trainer.global_step < module.total_steps and not spawned_and_done:
        raise SfcdError(
            f"SAE training stopped at step {trainer.global_step} of {module.total_steps}; "
            "run the same command again to resume"
        )
    return module


def shard_specs(specs: list[SAESpec], sae_cfg: DictConfig) -> list[SAESpec]:
    """The SAEs of shard ``sae.shard`` of ``sae.shards``: every ``shards``-th site (in the order of the sites),
    with all of a site's SAEs (its sweep), so one stream serves each site. An SAE is the same whichever shard or
    job trains it: its initialisation, batches and resampling draws depend on its own spec and site only."""
    n, i = int(sae_cfg.get("shards", 1)), int(sae_cfg.get("shard", 0))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(
            f"sae.shard={i} of sae.shards={n}: expected shards >= 1 and 0 <= shard < shards, e.g. "
            "sae.shards=4 sae.shard=0,1,2,3 (one job each)"
        )
    sites = list(dict.fromkeys(s.site for s in specs))
    mine = set(sites[i::n])
    return [s for s in specs if s.site in mine]


def state_dir_name(sae_cfg: DictConfig) -> str:
    """The resumable state's folder under ``saes/step<N>/``: ``.train``, or one per shard, so that shard jobs
    writing the same checkpoint's SAEs at the same time never share (or reset) a training state."""
    n = int(sae_cfg.get("shards", 1))
    return ".train" if n == 1 else f".train-shard{int(sae_cfg.shard)}of{n}"


def settings_of(specs: list[SAESpec], sae_cfg: DictConfig, total: int, harvest_autocast: str | None = None) -> dict:
    """What the resumable state depends on. Not the shard: it only picks the specs, which are listed; not when
    states are saved, whether chunks are prefetched, nor whether the loss is compiled (none changes what a state
    holds). The harvest's autocast dtype as resolved for this device (``harvest_autocast``), not the setting:
    ``auto`` means another dtype on another device, and so other activations."""
    sae = OmegaConf.to_container(sae_cfg, resolve=True)
    for key in ("shard", "shards", "checkpoint_minutes", "prefetch", "harvest_autocast", "compile"):
        sae.pop(key, None)
    return {
        "specs": [s.__dict__ for s in specs],
        "total_steps": total,
        "sae": sae,
        "harvest_autocast": harvest_autocast,
        "layout": STATE_LAYOUT,
    }


def prepare_state_dir(state_dir: Path, settings: dict) -> None:
    """Keep a resumable state only if it was made with the same settings."""
    path = state_dir / "settings.json"
    if path.exists() and read_json(path) != settings:
        log.info("the SAE settings changed; starting the training afresh")
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)
