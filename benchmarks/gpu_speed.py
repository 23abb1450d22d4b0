"""SAE training speed on one GPU, measured right (issue 21, item 1): steady-state step time, against a floor computed
from this device's own matmul rate and memory bandwidth, measured in the same run.

Run it before and after every speed change, whenever a GPU is available, and keep both outputs:

    python benchmarks/gpu_speed.py                          # cuda, the full profile (under 5 minutes on an H100/H200)
    python benchmarks/gpu_speed.py --out DIR                # figures, traces and kernel tables in DIR
    python benchmarks/gpu_speed.py --out DIR --compile      # (a) also with torch.compile'd losses (minutes more)
    python benchmarks/gpu_speed.py --device cpu --profile small   # tiny shapes: what the tests run here

What it measures, on the trainer the pythia preset uses (``trainer=gpu``: one GPU, bf16-mixed) with the preset's
SAE settings (``experiment=pythia``: k 32, lr, AuxK after 10M silent tokens) and checkpoint saves off
(``sae.checkpoint_every=0``):

(a) one SAE per architecture (relu, jumprelu, topk, batchtopk), d_in 512, d_sae 32,768, batch 4,096, trained
    through the real path (``SAEModule`` + ``train_module``) on cached random activations; with ``--compile``,
    the architectures whose loss compiles (``SAE.compiles``: ReLU) also with ``sae.compile=true``
    (``torch.compile``'d losses: 1.32x on this project's CPU, ``bench_sae.py``'s ``compile_speedup``), the row
    marked ``"compile": true``; then TopK again with an eighth of its latents counted dead at every step
    (``"dead_latents"``; AuxK on, as in a long run once latents die, which random activations in a short run never
    do; its trace ``trace_topk_dead.json``);
(b) the 19 sites of a Pythia-70m-shaped model (random weights, ``random_checkpoint``) trained from one activation
    stream by the real ``sae`` stage (``train_saes``), TopK at d_sae 32,768, k 32: the stream's tokens/s (batch
    rows a second, each row feeding every site's SAE), and the projected time of a 50M-token checkpoint;
(c) the harvest alone at every site in float32, bfloat16 and float16 autocast;
(d) ``host_ms_per_step_sites19``: 19 TopK SAEs at tiny shapes (``bench_sae.host_overhead``), so the step is the
    host's Python, Lightning and kernel-launch work, which the GPU's kernels cannot hide: the floor of (b)'s step.

Step times come from a Lightning callback that records CUDA events at ``on_train_batch_start`` and
``on_train_batch_end`` (read only when training ends: the measurement adds no host synchronisation; on the CPU,
``time.perf_counter``). The first steps (warm-up) are left out. Per figure:

- ``step_ms_median`` / ``step_ms_mean``: one step, batch start to batch end;
- ``loop_ms_per_step``: end of the last warm-up step to end of the last timed step, over the timed steps: also
  what the loop does between steps (fetching the batch, logging); ``tokens_per_s`` = batch / this;
- in (b), the harvest of a stream chunk (the model's forward passes) is timed on its own (the source's ``chunk``,
  wrapped by the callback) and counted once per chunk of steps: ``tokens_per_s`` is the stream's rate, harvest
  included, and ``training_tokens_per_s`` the rate without it;
- the floor: the dense encoder matmul (2 x batch x d_in x d_sae FLOPs per SAE) at the bf16 matmul rate of that
  shape (``x @ W`` timed here), plus Adam's memory traffic (reads param, grad, exp_avg, exp_avg_sq, writes param,
  exp_avg, exp_avg_sq: 7 x 4 bytes per float32 parameter) at the bandwidth of a large device-to-device copy timed
  here; every part is printed, and ``fraction_of_floor`` = tokens_per_s / floor_tokens_per_s;
- the issue's target beside it (>= 1.5M tokens/s for one TopK SAE at 32k; >= 85k stream tokens/s for the 19
  sites; the issue's own estimate for TopK at this shape: ~0.9 ms a step, ~4.5M tokens/s); ``meets_target`` only
  in the full profile (the targets are for its shapes);
- ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over the training (null on the CPU).
- ``host_syncs_per_step`` and ``sync_sites`` (TopK and the all-sites run, on a GPU): host synchronisations a step,
  counted by CUDA's sync debug mode over a few steps after the profiled ones, each from its batch's start to the
  next one's (what Lightning and the callbacks do after a step counts with it: the progress bar reads the logged
  values at every step), and the five places (file:line) that made most (null on the CPU).

A ``torch.profiler`` trace of a few steady-state steps (after the timed ones, so profiling does not touch the
figures) of the TopK run and of the all-sites run: ``trace_<name>.json`` (chrome://tracing, Perfetto) and
``top_kernels_<name>.txt`` (the ops by self device time; on the CPU by self CPU time).

Output: one JSON line per figure on stdout, the same lines in ``<out>/figures.jsonl``; the runs themselves (SAEs,
model, corpus) go to a temp folder, removed at the end, or stay in ``--work DIR``.
The small profile (``--device cpu``'s default) uses tiny shapes and the micro model, whose sites are all the sites
it has (7, not 19: its row says how many).
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

ARCHS = ("relu", "jumprelu", "topk", "batchtopk")
#: the pythia preset's SAE settings carried over (experiment=pythia), besides the shapes set here
PRESET_KEYS = ("k", "lr", "dead_tokens", "aux_coeff", "threshold_init", "bandwidth", "l1_coeff", "l0_coeff")
#: Adam's traffic per float32 parameter and step: reads param, grad, exp_avg, exp_avg_sq; writes the three states
ADAM_BYTES_PER_PARAM = 7 * 4
PYTHIA_TOKENS = 50_000_000
TARGETS = {"topk": 1.5e6, "all_sites": 85e3}  # tokens/s, from issue 21
ISSUE_ESTIMATE = {"topk": {"ms_per_step": 0.9, "tokens_per_s": 4.5e6}}

PROFILES = {
    "full": {
        "d_in": 512,
        "d_sae": 32768,
        "batch": 4096,
        "warmup": 10,  # steps left out
        "timed": 50,  # steps timed: 60 a run
        "profile_steps": (2, 3),  # profiler warm-up and active steps, after the timed ones
        "sync_steps": 3,  # then steps whose host synchronisations are counted
        "rows": 8 * 4096,  # cached random activations (a), cycled
        "model": "pythia-70m-deduped",
        "vocab": 50304,
        "site_warmup": 10,
        "site_timed": 30,  # 40 steps of the stream
        "chunk_steps": 20,  # sae.buffer_tokens = 20 batches: chunks harvested at steps 0 and 20 (and 40)
        "corpus_tokens": 400_000,
        "eval_tokens": 8192,
        "harvest_windows": 512,  # 65,536 tokens through every site, per dtype
        "matmul_reps": 20,
        "copy_bytes": 1 << 30,
    },
    "small": {
        "d_in": 64,
        "d_sae": 256,
        "batch": 256,
        "warmup": 2,
        "timed": 4,
        "profile_steps": (1, 1),
        "sync_steps": 1,
        "rows": 4 * 256,
        "model": "micro",
        "vocab": None,
        "site_warmup": 2,
        "site_timed": 4,
        "chunk_steps": 3,
        "corpus_tokens": 60_000,
        "eval_tokens": 1024,
        "harvest_windows": 64,
        "matmul_reps": 10,
        "copy_bytes": 16 << 20,
    },
}


def emit(row: dict, sink) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    sink.write(line + "\n")
    sink.flush()


def trainer_overrides(device: str) -> list[str]:
    if device == "cuda":
        return ["trainer=gpu"]  # one GPU, bf16-mixed
    return ["trainer=cpu", "trainer.precision=bf16-mixed"]


@functools.cache
def preset_overrides() -> tuple[str, ...]:
    from sfcd.config import compose

    preset = compose(["experiment=pythia"]).sae
    return tuple(f"sae.{k}={preset[k]}" for k in PRESET_KEYS)


class Clock:
    """Marks on the device's timeline: CUDA events (recorded, not waited for) or, on the CPU, perf_counter."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        """From mark ``a`` to mark ``b`` (CUDA: after the events completed; call ``sync`` first)."""
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def timed_per_call(fn, reps: int, clock: Clock) -> float:
    """Seconds per call of ``fn``, after three untimed calls."""
    for _ in range(3):
        fn()
    clock.sync()
    a = clock.mark()
    for _ in range(reps):
        fn()
    b = clock.mark()
    clock.sync()
    return clock.seconds(a, b) / reps


def matmul_seconds(device: torch.device, batch: int, d_in: int, d_sae: int, reps: int) -> float:
    """Seconds per bf16 ``[batch, d_in] @ [d_in, d_sae]`` on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d_in, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(d_in, d_sae, device=device, dtype=torch.bfloat16, generator=g)
    y = torch.empty(batch, d_sae, device=device, dtype=torch.bfloat16)
    return timed_per_call(lambda: torch.mm(x, w, out=y), reps, Clock(device.type == "cuda"))


def copy_seconds(device: torch.device, n_bytes: int) -> float:
    """Seconds per device-to-device copy of ``n_bytes``."""
    src = torch.ones(n_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return timed_per_call(lambda: dst.copy_(src), 10, Clock(device.type == "cuda"))


def device_rates(device: torch.device, batch: int, d_in: int, d_sae: int, prof: dict) -> tuple[float, float]:
    """(bf16 FLOP/s of the encoder matmul [batch, d_in] @ [d_in, d_sae], copy bandwidth in bytes/s), measured now."""
    mm = matmul_seconds(device, batch, d_in, d_sae, prof["matmul_reps"])
    cp = copy_seconds(device, prof["copy_bytes"])
    return 2 * batch * d_in * d_sae / mm, 2 * prof["copy_bytes"] / cp  # a copy reads and writes every byte


class StepTimer(L.Callback):
    """Marks at each training batch's start and end, read when training ends; optionally steps a profiler and
    times the stream's chunk harvests (the source's ``chunk``, wrapped here; with ``harvest_overlaps``, made on the
    prefetch thread, they are not taken out of the loop's time). With ``sync_steps``, the host
    synchronisations of that many steps from step ``sync_from`` on are counted, each from its batch's start to the
    next batch's (CUDA's sync debug mode warns at each; after the timed and profiled steps, since the warnings cost
    time) with where they come from."""

    def __init__(
        self,
        device: torch.device,
        warmup: int,
        timed: int,
        profiler=None,
        time_chunks: bool = False,
        sync_from: int = 0,
        sync_steps: int = 0,
        harvest_overlaps: bool = False,
    ):
        self.clock = Clock(device.type == "cuda")
        self.device, self.warmup, self.timed = device, warmup, timed
        self.profiler, self.time_chunks = profiler, time_chunks
        self.sync_from, self.sync_steps = sync_from, sync_steps
        self.harvest_overlaps = harvest_overlaps
        self._syncs: warnings.catch_warnings | None = None
        self.sync_records: list = []
        self.starts: list = []
        self.ends: list = []
        self.chunks: list[tuple[int, object, object]] = []  # (batches ended before it, start mark, end mark)
        self.n_params = 0
        self.result: dict = {}

    def setup(self, trainer, pl_module, stage):
        # before the loop's first fetch, which makes chunk 0 and (with prefetch) starts chunk 1 on its thread
        source = getattr(pl_module, "source", None)
        if self.time_chunks and source is not None:
            make = source.chunk

            def chunk(c, _make=make):
                a = self.clock.mark()
                out = _make(c)
                self.chunks.append((len(self.ends), a, self.clock.mark()))
                return out

            source.chunk = chunk

    def on_train_start(self, trainer, pl_module):
        self.n_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.profiler is not None:
            self.profiler.start()

    def on_train_batch_start(self, *args):
        # the counted steps whole: from a batch's start to the next one's, so what runs after a step (the progress
        # bar's reads of the logged values, the other callbacks, the loop's own work) is counted with it
        if self._syncs is not None and len(self.starts) == self.sync_from + self.sync_steps:
            self._stop_counting()
        if self.sync_steps and len(self.starts) == self.sync_from and self.device.type == "cuda":
            self._syncs = warnings.catch_warnings(record=True)
            self.sync_records = self._syncs.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.starts.append(self.clock.mark())

    def _stop_counting(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self._syncs.__exit__(None, None, None)
        self._syncs = None

    def on_train_batch_end(self, *args):
        self.ends.append(self.clock.mark())
        if self.profiler is not None:
            self.profiler.step()

    def on_train_end(self, trainer, pl_module):
        if self._syncs is not None:  # no step after the counted ones (the runs here have one)
            self._stop_counting()
        if self.profiler is not None:
            self.profiler.stop()
        w, t = self.warmup, self.timed
        if len(self.ends) < w + t:
            raise RuntimeError(f"{len(self.ends)} steps ran, fewer than {w} warm-up + {t} timed")
        self.clock.sync()  # the one wait, after the last step
        sec = self.clock.seconds
        steps = [sec(a, b) * 1e3 for a, b in zip(self.starts[w : w + t], self.ends[w : w + t], strict=True)]
        window = sec(self.ends[w - 1], self.ends[w + t - 1])
        # the steady harvests: not the first (cold), not those inside the profiled steps after the timed ones
        steady = [sec(a, b) for n, a, b in self.chunks if 0 < n < w + t]
        harvests = steady or [sec(a, b) for _, a, b in self.chunks]
        inside = [sec(a, b) for n, a, b in self.chunks if w <= n <= w + t - 1]  # after end w-1, before end w+t-1
        if self.harvest_overlaps:  # made on the prefetch thread, beside the steps: not a part of the loop's time
            inside = []
        self.result = {
            "step_ms_median": statistics.median(steps),
            "step_ms_mean": statistics.fmean(steps),
            "loop_ms_per_step": (window - sum(inside)) / t * 1e3,
            "window_ms_per_step": window / t * 1e3,
            "harvest_ms_per_chunk": statistics.fmean(harvests) * 1e3 if harvests else None,
            "harvests_timed": len(harvests),
            "harvests_in_window": len(inside),
            "peak_memory_gib": (
                torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            ),
            **self.sync_counts(),
        }

    def sync_counts(self) -> dict:
        """Host synchronisations a step over the counted steps, and the five places that made most (file:line of
        the warning; null on the CPU, where nothing is counted)."""
        if not self.sync_steps or self.device.type != "cuda":
            return {"host_syncs_per_step": None, "sync_sites": None}
        syncs = [w for w in self.sync_records if "synchroniz" in str(w.message)]
        where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        return {"host_syncs_per_step": len(syncs) / self.sync_steps, "sync_sites": dict(where.most_common(5))}


def make_profiler(device: torch.device, wait: int, prof: dict, name: str, out: Path):
    """A profiler that skips ``wait`` steps, warms up, records a few, and writes the trace and the top ops."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    warm, active = prof["profile_steps"]

    def written(p):
        p.export_chrome_trace(str(out / f"trace_{name}.json"))
        avg = p.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"  # torch >= 2.4 reads cuda as device
        head = f"{name}: {active} steady-state steps after {wait} (+{warm} profiler warm-up), sorted by {sort}\n"
        (out / f"top_kernels_{name}.txt").write_text(head + avg.table(sort_by=sort, row_limit=40) + "\n")

    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    steps = schedule(wait=wait, warmup=warm, active=active, repeat=1)
    return profile(activities=acts, schedule=steps, on_trace_ready=written)


def floor_fields(batch: int, shapes: list[tuple[int, int]], n_params: int, flops: float, bandwidth: float) -> dict:
    """The floor of one step, with its parts: each SAE's dense encoder matmul at ``flops``, and Adam's traffic over
    all ``n_params`` float32 parameters at ``bandwidth``."""
    enc = sum(2 * batch * d_in * d_sae for d_in, d_sae in shapes)
    opt = ADAM_BYTES_PER_PARAM * n_params
    floor_s = enc / flops + opt / bandwidth
    return {
        "encoder_flops_per_step": enc,
        "matmul_bf16_flops_per_s": flops,
        "encoder_ms": enc / flops * 1e3,
        "n_params": n_params,
        "optimizer_bytes_per_step": opt,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "optimizer_ms": opt / bandwidth * 1e3,
        "floor_ms_per_step": floor_s * 1e3,
        "floor_tokens_per_s": batch / floor_s,
    }


def rounded(row: dict) -> dict:
    """Times and rates to 4 significant figures for reading (the floor's parts stay exact)."""
    keep = {"encoder_flops_per_step", "matmul_bf16_flops_per_s", "optimizer_bytes_per_step", "n_params"}
    keep |= {"copy_bandwidth_bytes_per_s"}
    return {
        k: float(f"{v:.4g}") if isinstance(v, float) and k not in keep and math.isfinite(v) else v
        for k, v in row.items()
    }


def arch_figure(
    arch: str,
    acts: np.ndarray,
    prof: dict,
    tr: list[str],
    device,
    work: Path,
    out: Path,
    compile: bool = False,
    dead: int = 0,
) -> dict:
    """(a) one SAE of ``arch`` through SAEModule + train_module on cached activations; ``compile``: its loss
    through ``torch.compile`` (``sae.compile``; the compiles fall in the warm-up steps); ``dead``: that many
    latents counted dead at every step (``bench_sae.DeadLatents``: AuxK on, as in a long run once latents die;
    random activations in a short run leave none dead), profiled as ``<arch>_dead``."""
    from sfcd.config import compose
    from sfcd.sae.train import SAEModule, make_specs, train_module

    b, d_in, d_sae = prof["batch"], prof["d_in"], prof["d_sae"]
    cfg = compose(
        [
            "experiment=test",
            *tr,
            *preset_overrides(),
            f"sae.architecture={arch}",
            f"sae.d_sae={d_sae}",
            f"sae.batch_size={b}",
            "sae.checkpoint_every=0",
            f"sae.compile={compile}",
        ]
    )
    flops, bandwidth = device_rates(device, b, d_in, d_sae, prof)
    w, t = prof["warmup"], prof["timed"]
    name = f"{arch}{'-compiled' if compile else ''}{'_dead' if dead else ''}"
    profiler = make_profiler(device, w + t, prof, name, out) if arch == "topk" and not compile else None
    # profiled, then syncs counted, then one step whose start ends the count
    extra = (sum(prof["profile_steps"]) + prof["sync_steps"] + 1) if profiler else 0
    total = w + t + extra
    timer = StepTimer(
        device,
        w,
        t,
        profiler,
        sync_from=w + t + sum(prof["profile_steps"]),
        sync_steps=prof["sync_steps"] if extra else 0,
    )
    module = SAEModule(make_specs(cfg.sae, {"x": d_in}), cfg.sae, total)
    state = work / f"sae-{name}"
    state.mkdir(parents=True)
    train_module(module, cfg.trainer, state, {"x": acts}, [timer, *([bench_sae().DeadLatents(dead)] if dead else [])])
    r = timer.result
    tokens_per_s = b / (r["loop_ms_per_step"] / 1e3)
    floor = floor_fields(b, [(d_in, d_sae)], timer.n_params, flops, bandwidth)
    target = TARGETS.get(arch)
    return rounded(
        {
            "figure": "sae_step",
            "architecture": arch,
            "compile": compile,
            "dead_latents": dead,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": str(cfg.trainer.precision),
            "d_in": d_in,
            "d_sae": d_sae,
            "batch": b,
            "k": int(cfg.sae.k) if "topk" in arch else None,
            # the floor counts the encoder matmul and Adam only; a dense step (relu, jumprelu) also needs the
            # decoder's and three gradient matmuls of that size, so its fraction stays below about 0.2
            "floor_counts": "encoder matmul + Adam" + ("" if "topk" in arch else " (this step needs 5 matmuls)"),
            "n_saes": 1,
            "steps": total,
            "warmup_steps": w,
            "timed_steps": t,
            "step_ms_median": r["step_ms_median"],
            "step_ms_mean": r["step_ms_mean"],
            "loop_ms_per_step": r["loop_ms_per_step"],
            "tokens_per_s": tokens_per_s,
            **floor,
            "fraction_of_floor": tokens_per_s / floor["floor_tokens_per_s"],
            "target_tokens_per_s": target,
            "meets_target": (tokens_per_s >= target) if target and prof is PROFILES["full"] else None,
            "issue_estimate": ISSUE_ESTIMATE.get(arch),
            "peak_memory_gib": r["peak_memory_gib"],
            "host_syncs_per_step": r["host_syncs_per_step"],
            "sync_sites": r["sync_sites"],
        }
    )


def stream_inputs(prof: dict, work: Path) -> tuple:
    """The corpus run and the random Pythia-shaped checkpoint the stream figures harvest from (made once)."""
    from sfcd.config import compose
    from sfcd.data.corpus import build_corpus, corpus_tokenizer
    from sfcd.models.presets import random_checkpoint

    done = work / "corpus_run"
    shape = compose([f"model={prof['model']}"]).model
    if done.exists():
        return done, work / "model", shape
    # the model's weights are random, so any text serves: documents of 300 random words (the built-in grammar's
    # documents take seconds more to make)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(500)]
    text = work / "text.jsonl"
    with open(text, "w") as f:
        for _ in range(prof["corpus_tokens"] // 250):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=300))}) + "\n")
    corpus_run = build_corpus(
        compose(
            [
                "experiment=test",
                f"run_dir={work / 'corpus'}",
                "corpus=text",
                f"corpus.path={text}",
                f"corpus.n_tokens={prof['corpus_tokens']}",
                "corpus.val_tokens=20000",
            ]
        )
    )
    random_checkpoint(work / "model", shape, corpus_tokenizer(corpus_run), vocab_size=prof["vocab"])
    done.symlink_to(corpus_run.root)
    return done, work / "model", shape


def sites_figure(prof: dict, tr: list[str], device, work: Path, out: Path, prefetch: bool = True) -> dict:
    """(b) TopK SAEs at every site of the model, from one activation stream, through the real sae stage; with
    ``prefetch`` (``sae.prefetch``, the default on a GPU) the next chunk is harvested on a background thread while
    the SAEs train, else in the loop, between steps."""
    from sfcd.config import compose
    from sfcd.sae.stage import train_saes

    b, d_sae = prof["batch"], prof["d_sae"]
    corpus_root, model_dir, shape = stream_inputs(prof, work)
    name = "all_sites" if prefetch else "all_sites_no_prefetch"
    run = work / name
    run.mkdir()
    (run / "corpus").symlink_to(corpus_root.resolve() / "corpus")
    seq_len = min(128, shape.max_position)
    w, t = prof["site_warmup"], prof["site_timed"]
    profiler = make_profiler(device, w + t, prof, name, out) if prefetch else None
    # profiled, then syncs counted, then one step whose start ends the count
    extra = (sum(prof["profile_steps"]) + prof["sync_steps"] + 1) if profiler else 0
    total = w + t + extra
    cfg = compose(
        [
            "experiment=test",
            f"run_dir={run}",
            *tr,
            *preset_overrides(),
            f"model.source={model_dir}",
            f"model.seq_len={seq_len}",
            "step=0",
            "sae.architecture=topk",
            "sae.sites=[all]",
            f"sae.seq_len={seq_len}",
            f"sae.d_sae={d_sae}",
            f"sae.batch_size={b}",
            f"sae.n_tokens={total * b}",
            f"sae.buffer_tokens={prof['chunk_steps'] * b}",
            f"sae.eval_tokens={prof['eval_tokens']}",
            "sae.ce_tokens=0",
            "sae.checkpoint_every=0",
            f"sae.prefetch={str(prefetch).lower()}",
        ]
    )
    flops, bandwidth = device_rates(device, b, d_in=shape.d_model, d_sae=d_sae, prof=prof)
    timer = StepTimer(
        device,
        w,
        t,
        profiler,
        time_chunks=True,
        sync_from=w + t + sum(prof["profile_steps"]),
        sync_steps=prof["sync_steps"] if extra else 0,
        harvest_overlaps=prefetch,
    )
    folders = train_saes(cfg, [timer])
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    autocast = json.loads((folders[0] / "cfg.json").read_text()).get("sfcd_harvest_autocast")
    r = timer.result
    spc = prof["chunk_steps"]
    harvest_ms = r["harvest_ms_per_chunk"] or 0.0
    # with prefetch the harvests ran beside the steps: the loop's whole time a step (any wait for a chunk in it,
    # so then the training's rate is the stream's); without, in the loop: the steps' time, and a chunk's harvest
    # shared by its steps
    stream_ms = r["window_ms_per_step"] if prefetch else r["loop_ms_per_step"] + harvest_ms / spc
    tokens_per_s = b / (stream_ms / 1e3)
    floor = floor_fields(b, [(m["d_in"], m["d_sae"]) for m in metrics], timer.n_params, flops, bandwidth)
    target = TARGETS["all_sites"]
    return rounded(
        {
            "figure": "all_sites_stream" if prefetch else "all_sites_stream_no_prefetch",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": str(cfg.trainer.precision),
            "model": prof["model"],
            "sites": len(folders),
            "site_names": [m["site"] for m in metrics],
            "architecture": "topk",
            "k": int(cfg.sae.k),
            "d_in": shape.d_model,
            "d_sae": d_sae,
            "batch": b,
            "n_saes": len(metrics),
            "seq_len": seq_len,
            "steps": total,
            "warmup_steps": w,
            "timed_steps": t,
            "steps_per_chunk": spc,
            "prefetch": prefetch,
            "harvest_autocast": autocast,
            "step_ms_median": r["step_ms_median"],
            "step_ms_mean": r["step_ms_mean"],
            "loop_ms_per_step": r["loop_ms_per_step"],
            "window_ms_per_step": r["window_ms_per_step"],
            "harvest_ms_per_chunk": r["harvest_ms_per_chunk"],
            "harvests_timed": r["harvests_timed"],
            "training_tokens_per_s": b / (r["loop_ms_per_step"] / 1e3),
            "tokens_per_s": tokens_per_s,
            **floor,
            "fraction_of_floor": tokens_per_s / floor["floor_tokens_per_s"],
            "target_tokens_per_s": target,
            "meets_target": (tokens_per_s >= target) if prof is PROFILES["full"] else None,
            "projected_tokens": PYTHIA_TOKENS,
            "projected_minutes_per_checkpoint": PYTHIA_TOKENS / tokens_per_s / 60,
            "projection_note": "training and harvest at this rate; evaluation not included",
            "peak_memory_gib": r["peak_memory_gib"],
            "host_syncs_per_step": r["host_syncs_per_step"],
            "sync_sites": r["sync_sites"],
        }
    )


def harvest_figure(prof: dict, device, work: Path) -> dict:
    """(c) The harvest alone: every site of the Pythia-shaped model over the same windows, the forward in float32
    and under autocast in bfloat16 and float16 (``sae.harvest_autocast``), tokens/s each and how far each dtype's
    activations are from float32's (relative Frobenius error, the worst site)."""
    from sfcd.activations.harvest import harvest
    from sfcd.data.tokens import read_tokens
    from sfcd.models.loading import load_model
    from sfcd.models.sites import expand_sites
    from sfcd.paths import RunDir

    corpus_root, model_dir, shape = stream_inputs(prof, work)
    model = load_model(model_dir).to(device)
    sites = expand_sites(["all"], model)
    seq_len = min(128, shape.max_position)
    tokens = read_tokens(RunDir(corpus_root.resolve()).tokens("train"))
    n = prof["harvest_windows"]
    windows = np.asarray(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    clock = Clock(device.type == "cuda")
    rates, acts = {}, {}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        run = lambda dtype=dtype: list(harvest(model, windows, sites, batch_size=32, autocast=dtype))  # noqa: E731
        run()  # warm-up
        clock.sync()
        a = clock.mark()
        got = run()
        b = clock.mark()
        clock.sync()
        rates[name] = n * seq_len / clock.seconds(a, b)
        acts[name] = {s.name: torch.cat([g[s.name] for g in got]) for s in sites}
    ref = acts["float32"]

    def worst(name: str) -> float:
        return max(float((acts[name][k] - ref[k]).norm() / ref[k].norm()) for k in ref)

    return rounded(
        {
            "figure": "harvest_dtypes",
            "device": str(device),
            "model": prof["model"],
            "sites": len(sites),
            "windows": n,
            "seq_len": seq_len,
            "tokens": n * seq_len,
            "float32_tokens_per_s": rates["float32"],
            "bfloat16_tokens_per_s": rates["bfloat16"],
            "float16_tokens_per_s": rates["float16"],
            "bfloat16_speedup": rates["bfloat16"] / rates["float32"],
            "float16_speedup": rates["float16"] / rates["float32"],
            "bfloat16_worst_site_rel_error": worst("bfloat16"),
            "float16_worst_site_rel_error": worst("float16"),
        }
    )


def host_figure(tr: list[str], device: torch.device) -> dict:
    """(d) The host's own time a step, 19 TopK SAEs at tiny shapes on this trainer (``bench_sae.host_overhead``):
    on a GPU the Python, Lightning and kernel-launch work a step that the GPU's work cannot hide, so the floor of
    the all-sites run's step whatever its kernels cost; its Python calls a step beside it."""
    from sfcd.config import compose

    precision = str(compose(tr).trainer.precision)
    return {**bench_sae().host_overhead(19, trainer=tuple(tr)), "device": device.type, "precision": precision}


@functools.cache
def bench_sae():
    """``benchmarks/bench_sae.py``, beside this script, as a module (its host figure, its dead-latents callback)."""
    spec = importlib.util.spec_from_file_location("bench_sae", Path(__file__).with_name("bench_sae.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: full on cuda, small on cpu")
    ap.add_argument("--out", default="gpu_speed_out", help="figures, traces, kernel tables (default: %(default)s)")
    ap.add_argument("--work", default=None, help="keep the runs (SAEs, model, corpus) here (default: a temp folder)")
    ap.add_argument("--compile", action="store_true", help="also (a) with sae.compile=true (ReLU: SAE.compiles)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sfcd.config import compose
    from sfcd.devices import work_device
    from sfcd.errors import ConfigError
    from sfcd.sae.registry import sae_class

    tr = trainer_overrides(args.device)
    try:
        device = work_device(compose(tr).trainer)  # a clear error when cuda is asked for and absent
    except ConfigError as e:
        print(f"gpu_speed: {e}", file=sys.stderr)
        return 2
    prof = PROFILES[args.profile or ("full" if device.type == "cuda" else "small")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sfcd-gpu-speed-"))
    if work.exists() and any(work.iterdir()):  # SAEs already there would be skipped as complete, not trained
        print(f"gpu_speed: --work {work} is not empty; name a new or empty folder", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    try:
        with open(out / "figures.jsonl", "w") as sink:
            acts = np.random.default_rng(0).standard_normal((prof["rows"], prof["d_in"]), dtype=np.float32)
            for arch in ARCHS:
                emit(arch_figure(arch, acts, prof, tr, device, work, out), sink)
                if args.compile and sae_class(arch).compiles:
                    emit(arch_figure(arch, acts, prof, tr, device, work, out, compile=True), sink)
            # TopK with AuxK on: an eighth of the latents dead
            emit(arch_figure("topk", acts, prof, tr, device, work, out, dead=prof["d_sae"] // 8), sink)
            del acts
            emit(sites_figure(prof, tr, device, work, out, prefetch=True), sink)
            emit(sites_figure(prof, tr, device, work, out, prefetch=False), sink)
            emit(harvest_figure(prof, device, work), sink)
            emit(host_figure(tr, device), sink)
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
