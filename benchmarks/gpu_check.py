"""The GPU path end to end, in one script (under 5 minutes on one GPU): each SAE architecture trained for a few
hundred steps in bf16 on a Pythia-70m-shaped model's activations (random weights, ``save_pretrained`` folder used
as ``model.source``), then a two-checkpoint mini study (model, SAEs, dashboards, circuits, development, report)
on the device. Prints one JSON line per figure (tokens/s, peak memory) and exits non-zero on any failure.

    python benchmarks/gpu_check.py                 # cuda, the full profile
    python benchmarks/gpu_check.py --device cpu --profile small   # what the tests run here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

PROFILES = {
    # model shape, SAE width, steps and batch per architecture, site
    "full": {"model": "pythia-70m-deduped", "d_sae": 32768, "steps": 300, "batch": 4096, "site": "resid.2"},
    # the micro model's activations are small in the SAE's units: 40 steps from jumprelu's 0.5 threshold leave
    # every latent off, so the small profile starts it at 0.1
    "small": {
        "model": "micro",
        "d_sae": 256,
        "steps": 40,
        "batch": 512,
        "site": "resid.1",
        "extra": {"jumprelu": ["sae.threshold_init=0.1"]},
    },
}
ARCHS = {
    "relu": ["sae.l1_coeff=5"],
    "topk": ["sae.k=32"],
    "batchtopk": ["sae.k=32"],
    "jumprelu": ["sae.l0_coeff=1"],
}


class StepClock(L.Callback):
    """Wall time of the training steps after the first (the first includes the first chunk's harvest)."""

    def __init__(self):
        self.t0 = self.t1 = None
        self.steps = 0

    def on_train_batch_end(self, trainer, *args):
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self.steps, self.t1 = trainer.global_step, time.perf_counter()


def trainer_overrides(device: str) -> list[str]:
    if device == "cuda":
        return ["trainer=gpu"]  # one GPU, bf16-mixed
    return ["trainer=cpu", "trainer.precision=bf16-mixed"]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: full on cuda, small on cpu")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp folder, removed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sfcd.config import compose
    from sfcd.data.corpus import corpus_tokenizer
    from sfcd.devices import peak_memory, work_device
    from sfcd.models.presets import random_checkpoint
    from sfcd.models.train import train_model
    from sfcd.paths import RunDir
    from sfcd.sae.stage import train_saes
    from sfcd.study import run_study

    prof = PROFILES[args.profile or ("full" if args.device == "cuda" else "small")]
    tr = trainer_overrides(args.device)
    device = work_device(compose(tr).trainer)  # a clear error when cuda is asked for and absent
    root = Path(args.out or tempfile.mkdtemp(prefix="sfcd-gpu-check-"))
    t_start = time.perf_counter()
    try:
        # 1. the mini run: corpus and the micro model trained on the device (the model stage)
        run_dir = root / "run"
        base = ["experiment=test", f"run_dir={run_dir}", *tr]
        t = time.perf_counter()
        train_model(compose(base))
        emit(check="model", device=str(device), seconds=round(time.perf_counter() - t, 1))

        # 2. every architecture in bf16 on a Pythia-70m-shaped model's activations
        tok = corpus_tokenizer(RunDir(run_dir))
        shape = compose([f"model={prof['model']}"]).model
        src = random_checkpoint(
            root / "pythia-shaped", shape, tok, vocab_size=50304 if prof["model"] != "micro" else None
        )
        for arch, extra in ARCHS.items():
            arch_dir = root / f"sae-{arch}"
            arch_dir.mkdir()
            (arch_dir / "corpus").symlink_to(run_dir / "corpus")
            clock = StepClock()
            n_tokens = prof["steps"] * prof["batch"]
            cfg = compose(
                [
                    "experiment=test",
                    f"run_dir={arch_dir}",
                    *tr,
                    f"model.source={src}",
                    f"model.seq_len={min(128, shape.max_position)}",
                    "step=0",
                    f"sae.architecture={arch}",
                    f"sae.sites=[{prof['site']}]",
                    f"sae.d_sae={prof['d_sae']}",
                    f"sae.batch_size={prof['batch']}",
                    f"sae.n_tokens={n_tokens}",
                    f"sae.buffer_tokens={min(n_tokens, 262144)}",
                    "sae.eval_tokens=4096",
                    "sae.checkpoint_every=100",
                    *extra,
                    *prof.get("extra", {}).get(arch, []),
                ]
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            (folder,) = train_saes(cfg, [clock])
            m = json.loads((folder / "metrics.json").read_text())
            timed = clock.steps - 1
            emit(
                check="sae",
                arch=arch,
                device=str(device),
                precision=cfg.trainer.precision,
                d_in=m["d_in"],
                d_sae=m["d_sae"],
                steps=clock.steps,
                tokens_per_s=round(timed * prof["batch"] / max(clock.t1 - clock.t0, 1e-9)),
                stage_seconds=round(time.perf_counter() - t, 1),
                peak_memory_gib=round(peak_memory(device) / 2**30, 2),
                fve=round(m["fve"], 3),
                l0=round(m["l0"], 1),
            )
            assert clock.steps == prof["steps"], f"{arch}: {clock.steps} steps of {prof['steps']}"
            assert m["fve"] == m["fve"] and m["l0"] > 0, f"{arch}: metrics {m['fve']}, {m['l0']}"

        # 3. a two-checkpoint mini study on the device: SAEs, dashboards, circuits, development, report
        t = time.perf_counter()
        page = run_study(
            compose(
                [
                    *base,
                    "study.steps=[8,24]",
                    "study.tasks=[nounpp]",
                    "study.seed_baseline=false",
                    "study.crosscoder=true",
                    "crosscoder.sites=[resid.1]",
                    "trainer.precision=bf16-mixed",
                ]
            )
        )
        circuit = json.loads((run_dir / "circuits" / "nounpp" / "step24" / "circuit.json").read_text())
        cc = json.loads((run_dir / "crosscoders" / "resid.1" / "metrics.json").read_text())
        emit(
            check="study",
            device=str(device),
            steps=[8, 24],
            seconds=round(time.perf_counter() - t, 1),
            circuit_nodes=len(circuit["nodes"]),
            faithfulness=circuit.get("metadata", {}).get("faithfulness"),
            crosscoder_fve=cc.get("fve"),
            report_bytes=Path(page).stat().st_size,
            peak_memory_gib=round(peak_memory(device) / 2**30, 2),
        )
        emit(check="done", device=str(device), seconds=round(time.perf_counter() - t_start, 1))
        return 0
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
