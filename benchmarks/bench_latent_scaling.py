"""The streamed Latent Scaling pass at the demo preset's token count, on a finished demo run's crosscoders (read,
never written): wall time of the pass (every resid site at once through the K models, as the stage runs it), of the
bootstrap, the process's peak RSS, and per site the support counts (tokens on which each live latent fired) and
the median width of the nu_eps intervals. Prints one JSON line per figure.

    python benchmarks/bench_latent_scaling.py [--run runs/demo] [--tokens 1048576]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sfcd.crosscoders.io import load_crosscoder
from sfcd.crosscoders.reading import decoder_stats, summary
from sfcd.crosscoders.stage import _scaling_pass
from sfcd.data.tokens import read_tokens
from sfcd.models.loading import load_model
from sfcd.models.sites import parse_site


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--sites", default="resid.0,resid.1")
    a = p.parse_args()
    run = Path(a.run)
    sites = [parse_site(s) for s in a.sites.split(",")]
    ccs = {s.name: load_crosscoder(run / "crosscoders" / s.name) for s in sites}
    first = ccs[sites[0].name]
    steps = first.cfg["steps"]
    models = [load_model(str(run), st).eval().requires_grad_(False) for st in steps]
    tokens = read_tokens(run / "corpus" / "train.tokens")
    c = OmegaConf.create({"scaling_blocks": 20})
    x = OmegaConf.create({"harvest_batch": 32})
    excl = set(first.cfg["exclude_special_tokens"])
    t, cpu = time.time(), time.process_time()
    accs = _scaling_pass(ccs, models, sites, tokens, int(first.cfg["context_size"]), a.tokens, excl, c, x)
    dt, dcpu = time.time() - t, time.process_time() - cpu
    t = time.time()
    outs = {k: acc.latent_scaling(resamples=200) for k, acc in accs.items()}
    dt_boot = time.time() - t
    n = accs[sites[0].name].n
    print(json.dumps({"figure": "scaling_pass_s", "tokens": n, "sites": len(sites), "K": len(steps), "value": dt}))
    print(json.dumps({"figure": "scaling_pass_cpu_s", "threads": torch.get_num_threads(), "value": dcpu}))
    print(json.dumps({"figure": "scaling_tokens_per_s", "value": n / dt}))
    print(json.dumps({"figure": "bootstrap_s", "resamples": 200, "blocks": 20, "value": dt_boot}))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"figure": "peak_rss_gib", "value": rss}))
    for k, o in outs.items():
        live = o["support"] > 0
        s = summary(decoder_stats(ccs[k]), o["beta"], live, steps, 0.5, o)
        print(json.dumps({"figure": "support", "site": k, "live": int(live.sum()), **s["latent_scaling_support"]}))
        w = (o["nu_eps_hi"] - o["nu_eps_lo"])[live]
        print(json.dumps({"figure": "nu_eps_interval_median_width", "site": k, "value": float(w.nanmedian())}))


if __name__ == "__main__":
    main()
