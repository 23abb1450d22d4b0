"""Crosscoder cost and ground truth, measured here.

- ``sfcd crosscoder`` at one demo site (``resid.1`` of runs/demo, d = 128, 8 x d latents, 250k tokens) over
  K = 4 and K = 8 checkpoints: wall time and peak RSS, each in its own process (so its peak is its own);
- the planted ground truth (:mod:`sfcd.crosscoders.synthetic`) for both variants: mean best cosine and the
  share of features whose emergence and death checkpoint is recovered;
- the K x d x m projection for pythia-70m (d = 512; one site, as the papers): FLOPs per token, parameter and
  Adam memory, the buffer, and the time for 50M tokens per site on one GPU at a stated rate, with this
  machine's measured fraction of its own matmul rate for the same shapes;
- the stage's memory plan (:mod:`sfcd.crosscoders.memory`) at the pythia-70m shape (six resid sites, d = 512,
  the pythia preset's 16,384 latents and 32,768, K = 5, 10, 20, buffer float32 or bfloat16, bf16-mixed, the
  K fp32 models): each part in GiB and what the stage does on an 80 GiB and a 141 GiB GPU (together, in groups
  one after another, or refused with its one line).

Needs a demo run (``make demo``) for the first part. Prints one JSON line per figure.
    python benchmarks/bench_crosscoder.py [--run runs/demo] [--skip-demo]
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

#: the GPU rate the projection assumes: bf16 dense matmul reachable on an H100 SXM (peak ~990 TFLOP/s)
GPU_BF16_FLOPS = 400e12
STEPS = {4: [32, 128, 512, 1500], 8: [32, 64, 128, 256, 512, 750, 1000, 1500]}


def child(run: str, steps: list[int], out: str) -> None:
    """One crosscoder stage in this process; prints its wall time and peak RSS."""
    from sfcd.config import compose
    from sfcd.crosscoders.stage import train_crosscoders

    cfg = compose(
        [
            "experiment=demo",
            f"run_dir={out}",
            "crosscoder.sites=[resid.1]",
            f"crosscoder.steps=[{','.join(map(str, steps))}]",
        ]
    )
    t = time.perf_counter()
    train_crosscoders(cfg)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    metrics = json.loads((Path(out) / "crosscoders" / "resid.1" / "metrics.json").read_text())
    print(json.dumps({"K": len(steps), "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 3), "fve": metrics["fve"]}))


def demo_costs(run: Path) -> None:
    for steps in STEPS.values():
        with tempfile.TemporaryDirectory() as tmp:
            for sub in ("corpus", "model"):  # the run's model and corpus, crosscoders written beside them
                os.symlink(run.resolve() / sub, Path(tmp) / sub)
            p = subprocess.run(
                [sys.executable, __file__, "--child", str(run), tmp, *map(str, steps)],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            if p.returncode:
                raise SystemExit(p.stderr[-3000:])
            line = json.loads(p.stdout.strip().splitlines()[-1])
            print(json.dumps({"figure": "crosscoder_demo_site", "site": "resid.1", "steps": steps, **line}))


def ground_truth() -> None:
    import tempfile as tf

    from omegaconf import OmegaConf

    from sfcd.config import compose
    from sfcd.crosscoders.stage import CrosscoderSpec
    from sfcd.crosscoders.synthetic import plant_series, recovery
    from sfcd.sae.train import SAEModule, train_module

    x, truth = plant_series(n_tokens=65_536, K=4, d=48, seed=0)
    cfg = compose(["experiment=test"])
    for arch, hp in (("batchtopk", {"k": 3, "aux_coeff": 1 / 32}), ("l1", {"l1_coeff": 1.0})):
        sae = OmegaConf.merge(
            cfg.sae, {"lr": 0.01, "batch_size": 1024, "seed": 0, "checkpoint_every": 10**6, "buffer_tokens": len(x)}
        )
        spec = CrosscoderSpec("x", "x", arch, x.shape[1], 128, 0.01, 0, {"n_blocks": 4, "dead_tokens": 20_000, **hp})
        module = SAEModule([spec], sae, 500)
        with tf.TemporaryDirectory() as tmp:
            train_module(module, cfg.trainer, Path(tmp), {"x": x})
        r = recovery(module.saes[0], truth)
        r.pop("latent_of_feature")
        print(json.dumps({"figure": "crosscoder_ground_truth", "architecture": arch, "steps": 500, **r}))


def matmul_rate(B: int, n: int, m: int) -> float:
    import torch

    a, b = torch.randn(B, n), torch.randn(n, m)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * B * n * m / (time.perf_counter() - t)


def projection() -> None:
    """Pythia-70m, one site (d = 512), K checkpoints, m latents, BatchTopK k = 32, batch 4096, 50M tokens."""
    import torch

    from sfcd.crosscoders.model import BatchTopKCrosscoder

    d, k, tokens = 512, 32, 50_000_000
    for K in (4, 8):
        for m in (16_384, 32_768):
            # encoder forward 2 B Kd m; its backward (weights: sparse in k; input grads not needed) ~ 2 B k Kd;
            # decoder forward/backward sparse: ~ 6 B k Kd; top-k scoring ~ B m
            flops_tok = 2 * K * d * m + 8 * k * K * d + m
            params = 2 * K * d * m + m + K * d
            row = {
                "figure": "crosscoder_pythia70m_projection",
                "K": K,
                "d": d,
                "latents": m,
                "flop_per_token": flops_tok,
                "weights_gib_fp32": round(params * 4 / 2**30, 3),
                "weights_adam_grads_gib": round(params * 4 * 4 / 2**30, 3),
                "buffer_gib_2e18_tokens_fp32": round(2**18 * K * d * 4 / 2**30, 3),
                "harvest_forwards_per_token": K,
                "gpu_minutes_50M_tokens_at_400TF": round(tokens * flops_tok / GPU_BF16_FLOPS / 60, 2),
            }
            print(json.dumps(row))
    # this machine, one small step of the real class vs its own matmul rate on the encoder's shape
    K, m, Bs = 4, 4096, 1024
    cc = BatchTopKCrosscoder(K * d, m, n_blocks=K, k=k)
    x = torch.randn(Bs, K * d)
    opt = torch.optim.Adam(cc.parameters())
    for _ in range(2):
        cc.training_loss(x, 0.5)["loss"].backward()
    t = time.perf_counter()
    n = 5
    for _ in range(n):
        opt.zero_grad()
        cc.training_loss(x, 0.5)["loss"].backward()
        opt.step()
    step_s = (time.perf_counter() - t) / n
    rate = matmul_rate(Bs, K * d, m)
    print(
        json.dumps(
            {
                "figure": "crosscoder_step_vs_matmul",
                "K": K,
                "d": d,
                "latents": m,
                "batch": Bs,
                "step_ms": round(step_s * 1000, 1),
                "encoder_matmul_ms": round(2 * Bs * K * d * m / rate * 1000, 1),
                "fraction_of_matmul_rate": round(2 * Bs * K * d * m / rate / step_s, 3),
            }
        )
    )


def memory_plans() -> None:
    import torch

    from sfcd.crosscoders.memory import GIB, HEADROOM, PlanInputs, schedule_sites
    from sfcd.errors import InputError

    model_each = 70_426_624 * 4  # pythia-70m-deduped's parameters (incl. embeddings), float32
    sites = {f"resid.{i}": 512 for i in range(6)}
    for K in (5, 10, 20):
        for m in (16_384, 32_768):
            for buf in (torch.float32, torch.bfloat16):
                p = PlanInputs(K, m // 512, 131_072, 4096, buf, torch.float32, 2, torch.bfloat16, model_each)
                parts = p.parts(list(sites.values()))
                row = {
                    "figure": "crosscoder_memory_plan_pythia70m_6_resid_sites",
                    "K": K,
                    "latents": m,
                    "buffer_tokens": p.rows,
                    "buffer_dtype": str(buf).removeprefix("torch."),
                    **{f"{k}_gib": round(v / GIB, 2) for k, v in parts.items()},
                    "total_gib_together": round(sum(parts.values()) / GIB, 2),
                    "one_site_gib": round(sum(p.parts([512]).values()) / GIB, 2),
                }
                for gpu in (80, 141):
                    try:
                        sch = schedule_sites(sites, p, int(HEADROOM * gpu * GIB))
                        row[f"on_{gpu}gib"] = f"{len(sch.groups)} group(s) of {[len(g) for g in sch.groups]}"
                    except InputError as e:
                        row[f"on_{gpu}gib"] = f"refused: {e}"
                print(json.dumps(row))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], [int(s) for s in sys.argv[4:]], sys.argv[3])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the memory plans (no timing)")
    args = ap.parse_args()
    memory_plans()
    if args.memory_only:
        return
    projection()
    ground_truth()
    if not args.skip_demo:
        run = Path(args.run)
        if not (run / "model").is_dir():
            raise SystemExit(f"{run} has no model/; run `make demo` first (or pass --skip-demo)")
        demo_costs(run)


if __name__ == "__main__":
    main()
