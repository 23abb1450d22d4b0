"""SAE training throughput on cached activations, against this machine's fp32 matmul rate, measured in one run.

Prints one JSON line per figure. Shapes: d_in 512, d_sae 8192, batch 4096 (override with --d-in/--d-sae/--batch).
Each architecture trains through the real path (SAEModule on a Lightning Trainer); step times come from a
callback, the first steps (warm-up) left out. Issue 21's two CPU figures: ``topk_fraction_of_limit`` (TopK
tokens/s x 2 x d_in x d_sae over the encoder matmul's fp32 rate, measured into a preallocated output, so the limit
is the machine's and not its page faults) and ``sites19_fraction_of_limit`` (19 same-shape TopK SAEs, d_sae 4,096,
k 32 as the pythia preset, from one stream through the real loop). Their limit is measured in the run itself: one
encoder-shaped matmul before every step (outside the step's time), the median over the timed steps, so the
machine's rate is read under the same load as the steps (read before and after the run instead, it moved the
fraction by +-0.1 on this machine). SAELens's TopK training step at the same shape beside sfcd's.
``compile_speedup``: ReLU with ``sae.compile=true`` (``torch.compile``'d losses) over eager, alternating runs. Also:
harvesting every site of the demo-sized model vs a bare forward pass over the same tokens, and the stall of one
training-state save, written in the step (``AtomicCheckpointIO``) and behind it (Lightning's
``AsyncCheckpointIO`` over it, what sfcd's trainers use).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch


def matmul_rate(b: int, d: int, m: int, reps: int = 5, encoder_only: bool = False) -> float:
    """FLOP/s of the SAE's matmul shapes, [b, d] @ [d, m] and [b, m] @ [m, d] (``encoder_only``: the first alone,
    the only dense product of a TopK step), into preallocated outputs (the machine's rate, not its allocator's: a
    fresh [b, m] output is page-faulted in on every call)."""
    products = [(torch.randn(b, d), torch.randn(d, m), torch.empty(b, m))]
    if not encoder_only:
        products.append((torch.randn(b, m), torch.randn(m, d), torch.empty(b, d)))
    for _ in range(2):
        for x, w, out in products:
            torch.mm(x, w, out=out)
    t = time.perf_counter()
    for _ in range(reps):
        for x, w, out in products:
            torch.mm(x, w, out=out)
    return reps * len(products) * 2 * b * d * m / (time.perf_counter() - t)


def machine(b: int, d: int, m: int) -> dict:
    """What the fractions depend on besides the code: the CPU, its threads, its fp32 rate for the encoder's matmul
    and its memory bandwidth (a copy of 256 MB, past the caches). A TopK step's sparse kernels and top-k run at
    the speed of memory, its limit at the matmul's, so the same code reads a lower fraction on a machine whose
    matmul is faster for its memory (``gflops_per_gbps``)."""
    import platform

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else ():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    src, dst = torch.ones(2**26), torch.empty(2**26)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    gbps = 2 * src.numel() * 4 / min(times) / 1e9  # read and write
    gflops = matmul_rate(b, d, m, reps=3, encoder_only=True) / 1e9
    return {
        "figure": "machine",
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "encoder_matmul_gflops": round(gflops, 1),
        "copy_gbps": round(gbps, 1),
        "gflops_per_gbps": round(gflops / gbps, 2),
    }


class StepTimer(L.Callback):
    """Each step's time; with ``probe`` (a function returning a rate), ``probe()`` run before each step, outside
    its time, and its rates kept in ``rates``."""

    def __init__(self, probe=None):
        self.times: list[float] = []
        self.probe, self.rates = probe, []

    def on_train_batch_start(self, *a):
        if self.probe is not None:
            self.rates.append(self.probe())
        self._t = time.perf_counter()

    def on_train_batch_end(self, *a):
        self.times.append(time.perf_counter() - self._t)


class DeadLatents(L.Callback):
    """Counts the first ``n`` latents of every SAE as dead at every step (silent for longer than
    ``sae.dead_tokens``, whatever they did), so that AuxK runs in every step as it does in a long run once latents
    have died; these runs are far too short for a latent to die on its own (10M tokens). Their pre-activations
    stay as they are (about half of them positive), so AuxK fills all its k_aux slots: its most expensive case.
    """

    def __init__(self, n: int):
        self.n = n

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, *args):
        for sae in module.saes:
            sae.tokens_since_fired[: self.n] = 10**15


def sae_rate(
    arch: str,
    acts: np.ndarray,
    d_in: int,
    d_sae: int,
    batch: int,
    steps: int,
    k: int,
    sites: int = 1,
    dead: int = 0,
    limit: bool = False,
    overrides: tuple[str, ...] = (),
):
    """Stream tokens/s (batch rows per second) of ``sites`` same-shape SAEs trained side by side from one stream
    through the real loop (each row feeds every SAE); ``dead`` latents of each dead throughout (AuxK on). With
    ``limit``: (that, the encoder matmul's fp32 rate measured before each step, median over the timed steps)."""
    from sfcd.config import compose
    from sfcd.sae.train import SAEModule, make_specs, train_module

    cfg = compose(
        [
            f"sae.architecture={arch}",
            f"sae.batch_size={batch}",
            f"sae.d_sae={d_sae}",
            f"sae.k={k}",
            "sae.checkpoint_every=0",
            "trainer.precision=32-true",
            *overrides,
        ]
    )
    names = [f"s{i}" for i in range(sites)]
    module = SAEModule(make_specs(cfg.sae, dict.fromkeys(names, d_in)), cfg.sae, steps)
    timer = StepTimer((lambda: matmul_rate(batch, d_in, d_sae, reps=1, encoder_only=True)) if limit else None)
    with tempfile.TemporaryDirectory() as tmp:
        train_module(module, cfg.trainer, Path(tmp), dict.fromkeys(names, acts), [timer, DeadLatents(dead)])
    rate = batch / float(np.median(timer.times[2:]))
    return (rate, float(np.median(timer.rates[2:]))) if limit else rate


def saelens_topk_rate(acts: np.ndarray, d_in: int, d_sae: int, batch: int, steps: int, k: int) -> float | None:
    """SAELens's TopK training step at the same shape on the same rows: its ``training_forward_pass``, backward,
    gradient clip and Adam, as its ``SAETrainer`` steps (its default dense activations: with
    ``use_sparse_activations=True`` its backward fails on this torch, ``aten::view`` on SparseCPU). None when
    sae_lens is not installed."""
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        return None
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    times = []
    for step in range(steps):
        x = torch.from_numpy(acts[(step * batch) % len(acts) :][:batch])
        t = time.perf_counter()
        out = sae.training_forward_pass(TrainStepInput(x, {}, dead, step, False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times[2:]))


def harvest_vs_forward(n_tokens: int = 65536) -> dict:
    from transformers import GPTNeoXForCausalLM

    from sfcd.activations.harvest import harvest
    from sfcd.config import compose
    from sfcd.models.presets import neox_config
    from sfcd.models.sites import parse_site, valid_sites

    model = GPTNeoXForCausalLM(neox_config(compose(["model=tiny"]).model, 820)).eval()  # the demo's preset
    windows = np.random.default_rng(0).integers(0, 820, size=(n_tokens // 64, 64))
    sites = [parse_site(s, model) for s in valid_sites(model) if not s.startswith("mlp_act")]
    with torch.no_grad():
        for b in range(0, 64, 32):  # warm-up
            model(torch.from_numpy(windows[b : b + 32]))
        t = time.perf_counter()
        for b in range(0, len(windows), 32):
            model(torch.from_numpy(windows[b : b + 32]))
        bare = time.perf_counter() - t
    t = time.perf_counter()
    for _ in harvest(model, windows, sites, 32, {0}):
        pass
    h = time.perf_counter() - t
    return {
        "figure": "harvest_all_sites",
        "sites": len(sites),
        "tokens": n_tokens,
        "harvest_s": round(h, 3),
        "bare_forward_s": round(bare, 3),
        "ratio": round(h / bare, 3),
    }


def joint_pass_graph(d_in: int = 512, d_sae: int = 32768, batch: int = 4096, k: int = 32) -> dict:
    """What one TopK SAE's graph keeps for its backward at the pythia preset's shape, in MiB (the tensors saved by
    its autograd nodes, besides its parameters and its scaled input, each storage once; not the kept latents'
    [batch, k] indices, held by its sparse kernels' contexts: 1 MiB more), float32 and under bf16
    autocast, with no dead latents and with 256 (k_aux) and 2,048 dead (8 x k_aux, the most AuxK takes over their
    dense columns). Where all SAEs take one backward pass together (``SAE.small_graph``), each SAE's graph is kept
    until that pass: this times the sites, plus one scaled input ([batch, d_in]) each, is what the joint pass adds
    over one pass per SAE."""
    from sfcd.sae.topk import TopKSAE

    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(0))
    sae = TopKSAE(d_in, d_sae, seed=0, k=k, dead_tokens=10)
    skip = {p.untyped_storage().data_ptr() for p in sae.parameters()} | {x.untyped_storage().data_ptr()}
    out = {"figure": "joint_pass_graph_mib_per_sae", "d_in": d_in, "d_sae": d_sae, "batch": batch, "k": k}
    for dead in (0, d_in // 2, 8 * (d_in // 2)):
        sae.tokens_since_fired.zero_()
        sae.tokens_since_fired[:dead] = 1000
        for name, bf16 in (("fp32", False), ("bf16", True)):
            saved: dict[int, int] = {}

            def pack(t, saved=saved):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), hooks:
                loss = sae.training_loss(x, 0.5)["loss"]
            del loss
            out[f"{name}_dead{dead}"] = round(sum(n for p, n in saved.items() if p not in skip) / 2**20, 1)
    return out


def checkpoint_stall(d_in: int = 512, d_sae: int = 32768, reps: int = 3) -> dict:
    """How long a training-state save holds the step: the state of one TopK SAE at the pythia preset's width
    (weights and both Adam moments, ~400 MB) written in the step by sfcd's ``AtomicCheckpointIO`` and through
    Lightning's ``AsyncCheckpointIO`` over it (the call returns once every tensor is snapshotted); the write's
    own time beside them. The median of ``reps`` saves each."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from sfcd.training import AtomicCheckpointIO

    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(d_sae, d_in, generator=g) for name in ("W_enc_T", "W_dec")}
    moments = {name: {"exp_avg": w.clone(), "exp_avg_sq": w.clone()} for name, w in weights.items()}
    state = {"state_dict": weights, "optimizer_states": [moments]}
    nbytes = sum(t.numel() * 4 for t in weights.values()) * 3
    in_step, behind, written = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.ckpt"
        for _ in range(reps):
            t = time.perf_counter()
            AtomicCheckpointIO().save_checkpoint(state, path)
            in_step.append(time.perf_counter() - t)
            io = AsyncCheckpointIO(AtomicCheckpointIO())
            t = time.perf_counter()
            io.save_checkpoint(state, path)
            behind.append(time.perf_counter() - t)
            io.teardown()  # waits for the write
            written.append(time.perf_counter() - t)
    return {
        "figure": "checkpoint_stall",
        "state_mb": round(nbytes / 2**20),
        "in_step_ms": round(1e3 * float(np.median(in_step)), 1),
        "behind_ms": round(1e3 * float(np.median(behind)), 1),
        "behind_write_done_ms": round(1e3 * float(np.median(written)), 1),
        "stall_ratio": round(float(np.median(behind)) / float(np.median(in_step)), 3),
    }


def host_overhead(sites: int = 19, steps: int = 73, trainer: tuple[str, ...] = ("trainer.precision=32-true",)) -> dict:
    """The host's own time per training step: ``sites`` TopK SAEs from one stream at shapes so small (d_in 16,
    d_sae 64, batch 64, k 4) that the arithmetic is nothing and the step is the Python, Lightning and op-dispatch
    work around it (the loop's too). On a GPU the host queues the kernels while the GPU runs them, so a step takes
    at least this long whatever the GPU does: at 19 sites it is the floor the all-sites run cannot go below (the
    GPU machine's host is faster or slower than this one by its single-core speed). One logging step in ten
    included, as in training (``log_every_n_steps`` = 10): from one batch's start to the next's, the median over
    steps 10 to 59 without logging and the median of the logging ones (19 to 59), weighed 9 to 1; and the Python
    calls of one step of each kind (65, and the logging step 69, after the timed ones), a count that does not move
    with the machine's load. One stream chunk holds all 73 steps' rows, so no step makes a chunk. ``trainer``:
    overrides of the trainer (``benchmarks/gpu_speed.py`` runs it on a GPU, where it is the host and
    kernel-launch cost a step)."""
    acts = np.random.default_rng(0).standard_normal((64 * steps, 16), dtype=np.float32)
    names = [f"s{i}" for i in range(sites)]
    from sfcd.config import compose
    from sfcd.sae.train import SAEModule, make_specs, train_module

    cfg = compose(
        ["sae.architecture=topk", "sae.batch_size=64", "sae.d_sae=64", "sae.k=4", "sae.checkpoint_every=0", *trainer]
    )
    module = SAEModule(make_specs(cfg.sae, dict.fromkeys(names, 16)), cfg.sae, steps)

    class Starts(L.Callback):
        """The whole loop's time a step, batch start to batch start (this thread's CPU time: the machine's other
        load moved the wall time by +-25% run to run); and the Python function calls (a count that does not
        move run to run) of steps 65 and 69."""

        def __init__(self):
            self.starts: list[float] = []
            self.calls = {65: 0, 69: 0}

        def on_train_batch_start(self, trainer, module, batch, i):
            sys.setprofile(None)
            self.starts.append(time.thread_time())
            if i in self.calls:

                def count(frame, event, arg, i=i):
                    if event in ("call", "c_call"):
                        self.calls[i] += 1

                sys.setprofile(count)

    starts = Starts()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_module(module, cfg.trainer, Path(tmp), dict.fromkeys(names, acts), [starts])
    finally:
        sys.setprofile(None)
    gaps = np.diff(starts.starts)[:60]  # gaps[i]: step i's time, up to step 59
    logging = np.arange(len(gaps)) % 10 == 9
    plain, logged = float(np.median(gaps[10:][~logging[10:]])), float(np.median(gaps[10:][logging[10:]]))
    return {
        "figure": f"host_ms_per_step_sites{sites}",
        "value": round(1e3 * (0.9 * plain + 0.1 * logged), 2),  # one logging step in ten
        "per_sae_ms": round(1e3 * (0.9 * plain + 0.1 * logged) / sites, 3),
        "step_ms": round(1e3 * plain, 2),
        "logging_step_ms": round(1e3 * logged, 2),
        "python_calls_step": starts.calls[65],
        "python_calls_logging_step": starts.calls[69],
        "shape": "d_in 16, d_sae 64, batch 64, k 4",
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--sites", type=int, default=19, help="SAEs side by side from one stream, for sites19")
    p.add_argument("--sites-d-sae", type=int, default=4096)
    p.add_argument("--sites-k", type=int, default=32, help="the pythia preset's k")
    a = p.parse_args()
    torch.manual_seed(0)
    acts = np.random.default_rng(0).standard_normal((a.batch * 4, a.d_in), dtype=np.float32)
    # a dense SAE step is five matmuls of 2*B*D*M FLOPs (encoder, decoder, and the grads of W_enc, f, W_dec);
    # the matmul rate is measured just before and after each architecture's run, and the two averaged
    flops_per_token = 5 * 2 * a.d_in * a.d_sae
    print(json.dumps(machine(a.batch, a.d_in, a.d_sae)))
    rates = {}
    for arch in ("relu", "jumprelu", "topk", "batchtopk"):
        before = matmul_rate(a.batch, a.d_in, a.d_sae)
        rates[arch] = sae_rate(arch, acts, a.d_in, a.d_sae, a.batch, a.steps, a.k)
        peak = (before + matmul_rate(a.batch, a.d_in, a.d_sae)) / 2
        print(
            json.dumps(
                {
                    "figure": "sae_train",
                    "architecture": arch,
                    "d_in": a.d_in,
                    "d_sae": a.d_sae,
                    "batch": a.batch,
                    "k": a.k if "topk" in arch else None,
                    "tokens_per_s": round(rates[arch]),
                    "matmul_gflops": round(peak / 1e9, 1),
                    "fraction_of_matmul_rate": round(rates[arch] * flops_per_token / peak, 3),
                }
            )
        )
    print(
        json.dumps(
            {
                "figure": "topk_speedup_over_relu",
                "ratio": round(rates["topk"] / rates["relu"], 2),
                "batchtopk_ratio": round(rates["batchtopk"] / rates["relu"], 2),
            }
        )
    )
    # torch.compile'd losses (sae.compile: ReLU's, SAE.compiles) against eager, alternating (this machine's times
    # move +-20% within minutes); the compile itself is in the warm-up steps, left out
    for arch in ("relu",):
        eager, compiled = [], []
        for _ in range(2):
            eager.append(sae_rate(arch, acts, a.d_in, a.d_sae, a.batch, a.steps, a.k))
            compiled.append(
                sae_rate(arch, acts, a.d_in, a.d_sae, a.batch, a.steps, a.k, overrides=("sae.compile=true",))
            )
        print(
            json.dumps(
                {
                    "figure": "compile_speedup",
                    "architecture": arch,
                    "ratio": round(sum(compiled) / sum(eager), 3),
                    "eager_tokens_per_s": [round(r) for r in eager],
                    "compiled_tokens_per_s": [round(r) for r in compiled],
                }
            )
        )
    # a TopK step's only dense product is the encoder's, 2 * d_in * d_sae FLOPs per token: its time at the
    # machine's own fp32 rate for that matmul (measured before every step of this run) is the step's limit
    topk, enc_topk = sae_rate("topk", acts, a.d_in, a.d_sae, a.batch, a.steps, a.k, limit=True)
    limit = enc_topk / (2 * a.d_in * a.d_sae)
    print(
        json.dumps(
            {
                "figure": "topk_fraction_of_limit",
                "value": round(topk / limit, 3),
                "tokens_per_s": round(topk),
                "encoder_matmul_gflops": round(enc_topk / 1e9, 1),
                "d_in": a.d_in,
                "d_sae": a.d_sae,
                "k": a.k,
                "batch": a.batch,
            }
        )
    )
    # the same TopK SAE with an eighth of its latents dead: AuxK (k_aux = d_in / 2 among the dead) in every step
    auxk, enc_auxk = sae_rate("topk", acts, a.d_in, a.d_sae, a.batch, a.steps, a.k, dead=a.d_sae // 8, limit=True)
    limit_auxk = enc_auxk / (2 * a.d_in * a.d_sae)
    print(
        json.dumps(
            {
                "figure": "topk_auxk_fraction_of_limit",
                "value": round(auxk / limit_auxk, 3),
                "tokens_per_s": round(auxk),
                "dead_latents": a.d_sae // 8,
                "k_aux": a.d_in // 2,
            }
        )
    )
    peer = saelens_topk_rate(acts, a.d_in, a.d_sae, a.batch, a.steps, a.k)
    if peer is not None:
        print(
            json.dumps(
                {
                    "figure": "topk_speedup_over_saelens",
                    "ratio": round(rates["topk"] / peer, 2),
                    "saelens_tokens_per_s": round(peer),
                    "sfcd_tokens_per_s": round(rates["topk"]),  # the run without the limit's matmuls
                }
            )
        )
    # many same-shape SAEs from one stream through the real loop: stream rows/s x every SAE's encoder FLOPs
    n, m, k = a.sites, a.sites_d_sae, a.sites_k
    rate, rate_enc = sae_rate("topk", acts, a.d_in, m, a.batch, a.steps, k, sites=n, limit=True)
    print(
        json.dumps(
            {
                "figure": f"sites{n}_fraction_of_limit",
                "value": round(rate * n * 2 * a.d_in * m / rate_enc, 3),
                "stream_tokens_per_s": round(rate),
                "encoder_matmul_gflops": round(rate_enc / 1e9, 1),
                "sites": n,
                "d_in": a.d_in,
                "d_sae": m,
                "k": k,
                "batch": a.batch,
            }
        )
    )
    print(json.dumps(host_overhead(n)))
    print(json.dumps(joint_pass_graph()))
    print(json.dumps(harvest_vs_forward()))
    print(json.dumps(checkpoint_stall()))


if __name__ == "__main__":
    main()
