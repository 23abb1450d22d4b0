"""Pythia scale, measured here: a GPT-NeoX of pythia-70m's shape (6 layers, d_model 512, 8 heads, d_mlp 2048, vocab
50,304; random weights, saved with ``save_pretrained`` and used as ``model.source``) and TopK SAEs at all 19 sites
(embed, and attn/mlp/resid of each layer) trained from one activation stream by the real ``sae`` stage.

- peak RSS and tokens/s at n_tokens N and 4N (d_sae 4,096): memory must not grow with the tokens (one chunk of
  ``sae.buffer_tokens`` per site is held, whatever n_tokens);
- one short run at d_sae 32,768 (the pythia preset's width): its peak RSS;
- ``sfcd features`` on those 32k-feature SAEs: peak RSS;
- the projected time of the pythia preset (19 sites x 32,768 features x 50M tokens) per checkpoint on one GPU,
  from the FLOPs of a TopK step, this machine's measured fraction of its own matmul rate, and a stated GPU rate.

Each measured run is its own process (so its peak RSS is its own). Prints one JSON line per figure.
    python benchmarks/bench_scale.py [--n 65536] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = 19
D_IN = 512
#: the GPU rate the projection assumes: bf16 dense matmul reachable on an H100 SXM (peak ~990 TFLOP/s)
GPU_BF16_FLOPS = 400e12


def setup(root: Path) -> tuple[Path, Path]:
    """A corpus (the built-in grammar, 1M tokens) and a pythia-70m-shaped random model with its tokenizer."""
    from sfcd.config import compose
    from sfcd.data.corpus import build_corpus, corpus_tokenizer
    from sfcd.models.presets import random_checkpoint

    run = root / "run"
    cfg = compose(["experiment=test", f"run_dir={run}", "corpus.n_tokens=1000000", "corpus.val_tokens=50000"])
    r = build_corpus(cfg)
    model = root / "pythia-70m-shaped"
    if not (model / "config.json").exists():
        random_checkpoint(model, compose(["model=pythia-70m-deduped"]).model, corpus_tokenizer(r), vocab_size=50304)
    return run, model


def one(args) -> None:
    """One measured run in this process: the sae stage (and, with --features, the features stage)."""
    import lightning as L

    from sfcd.config import compose
    from sfcd.sae.stage import train_saes

    class Clock(L.Callback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.steps = 0

        def on_train_batch_end(self, trainer, *a):
            if self.t0 is None:
                self.t0 = time.perf_counter()
            self.steps, self.t1 = trainer.global_step, time.perf_counter()

    run = Path(args.run) / f"d{args.d_sae}-n{args.n_tokens}"
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "corpus").exists():
        (run / "corpus").symlink_to(Path(args.run) / "corpus")
    over = [
        "experiment=test",
        f"run_dir={run}",
        f"model.source={args.model}",
        "model.seq_len=128",
        "step=0",
        "sae.architecture=topk",
        "sae.k=32",
        "sae.sites=[all]",
        f"sae.d_sae={args.d_sae}",
        f"sae.batch_size={args.batch}",
        f"sae.n_tokens={args.n_tokens}",
        f"sae.buffer_tokens={args.buffer}",
        "sae.eval_tokens=2048",
        "sae.checkpoint_every=0",
        "sae.harvest_batch=16",
        "features.n_tokens=4096",
        "features.batch=8",
    ]
    clock = Clock()
    t = time.perf_counter()
    folders = train_saes(compose(over), [clock])
    stage_s = time.perf_counter() - t
    rss_sae = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    timed = max(clock.steps - 1, 1)
    row = {
        "d_sae": args.d_sae,
        "sites": len(folders),
        "n_tokens": args.n_tokens,
        "buffer_tokens": args.buffer,
        "batch": args.batch,
        "steps": clock.steps,
        "tokens_per_s": round(timed * args.batch / max(clock.t1 - clock.t0, 1e-9), 1) if clock.t0 else None,
        "stage_seconds": round(stage_s, 1),
        "peak_rss_gib": round(rss_sae, 2),
    }
    if args.features:
        from sfcd.features.stage import build_features

        t = time.perf_counter()
        build_features(compose(over))
        row["features_seconds"] = round(time.perf_counter() - t, 1)
        row["peak_rss_gib_after_features"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(row), flush=True)


def measured(run: Path, model: Path, d_sae: int, n_tokens: int, buffer: int, batch: int, features=False) -> dict:
    cmd = [sys.executable, __file__, "--one", "--run", str(run), "--model", str(model), "--d-sae", str(d_sae)]
    cmd += ["--n-tokens", str(n_tokens), "--buffer", str(buffer), "--batch", str(batch)]
    cmd += ["--features"] if features else []
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not rows:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"measured run failed: {' '.join(cmd)}")
    return rows[-1]


def matmul_rate(b: int, d: int, m: int, dtype, reps: int = 5) -> float:
    import torch

    x, w = torch.randn(b, d, dtype=dtype), torch.randn(d, m, dtype=dtype)
    for _ in range(2):
        x @ w
    t = time.perf_counter()
    for _ in range(reps):
        x @ w
    return reps * 2 * b * d * m / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--n-tokens", type=int, default=65536)
    ap.add_argument("--buffer", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--features", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=65536, help="N: the smaller token count (4N is the larger)")
    ap.add_argument("--out", default=None, help="keep the runs here")
    ap.add_argument("--projection-from", type=float, default=None, help="only the projection, from this 19-site rate")
    args = ap.parse_args()
    if args.one:
        return one(args)
    if args.projection_from:
        return projection(args.projection_from)
    root = Path(args.out or tempfile.mkdtemp(prefix="sfcd-bench-scale-"))
    run, model = setup(root)
    small = measured(run, model, 4096, args.n, 32768, 4096)
    print(json.dumps({"figure": "scale_n", **small}), flush=True)
    large = measured(run, model, 4096, 4 * args.n, 32768, 4096)
    print(json.dumps({"figure": "scale_4n", **large}), flush=True)
    print(
        json.dumps(
            {
                "figure": "rss_4n_over_n",
                "ratio": round(large["peak_rss_gib"] / small["peak_rss_gib"], 3),
                "within_10_percent": abs(large["peak_rss_gib"] / small["peak_rss_gib"] - 1) <= 0.10,
            }
        ),
        flush=True,
    )
    wide = measured(run, model, 32768, 4 * 1024, 4096, 1024, features=True)
    print(json.dumps({"figure": "d_sae_32768_short_run", **wide}), flush=True)
    projection(large["tokens_per_s"])


def projection(tokens_per_s: float) -> None:
    """The pythia preset's time per checkpoint on one GPU, from this machine's 19-site TopK rate at d_sae 4096."""
    # projection: a TopK step's dominant cost is the dense encoder matmul, 2 * d_in * d_sae FLOPs per token per
    # site; this machine's achieved fraction of its own fp32 rate for that matmul carries over to the GPU's rate
    import torch

    torch.manual_seed(0)
    fp32 = matmul_rate(4096, D_IN, 4096, torch.float32)
    enc_flops = 2 * D_IN * 4096 * SITES
    fraction = tokens_per_s * enc_flops / fp32
    tokens = 50_000_000
    pythia_flops = tokens * 2 * D_IN * 32768 * SITES
    gpu_s = pythia_flops / (GPU_BF16_FLOPS * fraction)
    print(
        json.dumps(
            {
                "figure": "pythia_preset_projection",
                "cpu_fp32_matmul_gflops": round(fp32 / 1e9, 1),
                "achieved_fraction_of_matmul_rate_19_sites": round(fraction, 3),
                "assumed_gpu_bf16_tflops": GPU_BF16_FLOPS / 1e12,
                "pythia_tokens": tokens,
                "encoder_pflop": round(pythia_flops / 1e15, 1),
                "projected_gpu_minutes_per_checkpoint": round(gpu_s / 60, 1),
                "projected_cpu_hours_here": round(pythia_flops / (fp32 * fraction) / 3600, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
