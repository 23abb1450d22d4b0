"""The one-layer reference's first steps, as a new user would check them: ``relu_reference`` on ``mlp_act.0`` of
a trained ``1l`` model (its last step), 1,048,576 activations, 4,096 features, batch 4,096, lr 1e-4, l1 3e-4.
Prints the loss in the reference's batch form (batch mean of the summed squared error + l1 x sum |f|) and L0
at the chosen steps, each measured on the step's batch before its update, as the reference logs them.

    sfcd model experiment=one_layer_reference run_dir=runs/one_layer   # the 1l model, if absent
    python benchmarks/reference_curve.py --run runs/one_layer [--steps 256] [--out curve.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from sfcd.activations.stream import HarvestSource
from sfcd.config import compose
from sfcd.data.tokens import read_tokens
from sfcd.models.loading import checkpoint
from sfcd.models.sites import parse_site, site_dim
from sfcd.paths import RunDir
from sfcd.sae.stage import _special_ids
from sfcd.sae.train import SAEModule, make_specs, train_module

SITE = "mlp_act.0"


class Record(L.Callback):
    """Loss and L0 of each step's batch with the weights the step starts from."""

    def __init__(self, at: set[int]):
        self.at, self.rows = at, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step
        if step in self.at:
            sae = module.saes[0]
            with torch.no_grad():
                out = sae.training_loss(batch[SITE] * sae.scale, step / max(1, module.total_steps))
            self.rows[step] = {"loss": out["loss"].item(), "l0": out["l0"].item(), "mse": out["mse"].item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory holding the trained 1l model")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--at", default="0,50,100,200,255")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = compose(["experiment=one_layer_reference", f"run_dir={a.run}", "sae.d_sae=4096"])
    s = cfg.sae
    s.sweep = {}
    s.n_tokens = a.steps * s.batch_size
    run = RunDir(a.run)
    step = run.model_steps()[-1]
    model, tokenizer, step = checkpoint(cfg, step)
    site = parse_site(SITE, model)
    dims = {SITE: site_dim(model, site)}
    n = a.steps * s.batch_size
    t0 = time.perf_counter()
    tokens, excl = read_tokens(run.tokens("train")), _special_ids(tokenizer, True)
    src = HarvestSource(model, tokens, [site], dims, cfg.model.seq_len, n, s.seed, excl)
    acts = src.chunk(0)[SITE].numpy()
    harvest_s = time.perf_counter() - t0
    module = SAEModule(make_specs(s, dims), s, a.steps)
    rec = Record({int(x) for x in a.at.split(",")})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_module(module, cfg.trainer, Path(tmp), {SITE: acts}, [rec])
    out = {
        "model_step": step,
        "d_in": dims[SITE],
        "d_sae": module.saes[0].d_sae,
        "architecture": s.architecture,
        "harvest_s": round(harvest_s, 1),
        "train_s": round(time.perf_counter() - t0, 1),
        "steps": {k: rec.rows[k] for k in sorted(rec.rows)},
    }
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
