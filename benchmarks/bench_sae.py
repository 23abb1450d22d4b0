"""SAE training throughput on cached activations, against this machine's fp32 matmul rate, measured in one run.

Prints one JSON line per figure. Shapes: d_in 512, d_sae 8192, batch 4096 (override with --d-in/--d-sae/--batch).
Each architecture trains through the real path (SAEModule on a Lightning Trainer); step times come from a
callback, the first steps (warm-up) left out. Also: harvesting every site of the demo-sized model vs a bare
forward pass over the same tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch


def matmul_rate(b: int, d: int, m: int, reps: int = 5) -> float:
    """FLOP/s of the SAE's matmul shapes: [b, d] @ [d, m] and [b, m] @ [m, d]."""
    x, w, f, v = torch.randn(b, d), torch.randn(d, m), torch.randn(b, m), torch.randn(m, d)
    for _ in range(2):
        x @ w, f @ v
    t = time.perf_counter()
    for _ in range(reps):
        x @ w
        f @ v
    return 2 * reps * 2 * b * d * m / (time.perf_counter() - t)


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, *a):
        self._t = time.perf_counter()

    def on_train_batch_end(self, *a):
        self.times.append(time.perf_counter() - self._t)


def sae_rate(arch: str, acts: np.ndarray, d_in: int, d_sae: int, batch: int, steps: int, k: int) -> float:
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
        ]
    )
    module = SAEModule(make_specs(cfg.sae, {"x": d_in}), cfg.sae, steps)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        train_module(module, cfg.trainer, Path(tmp), {"x": acts}, [timer])
    return batch / float(np.median(timer.times[2:]))


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--k", type=int, default=64)
    a = p.parse_args()
    torch.manual_seed(0)
    acts = np.random.default_rng(0).standard_normal((a.batch * 4, a.d_in), dtype=np.float32)
    # a dense SAE step is five matmuls of 2*B*D*M FLOPs (encoder, decoder, and the grads of W_enc, f, W_dec);
    # the matmul rate is measured just before and after each architecture's run, and the two averaged
    flops_per_token = 5 * 2 * a.d_in * a.d_sae
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
    print(json.dumps(harvest_vs_forward()))


if __name__ == "__main__":
    main()
