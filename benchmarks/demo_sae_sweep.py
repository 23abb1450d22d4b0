"""The demo's SAE settings, measured: CE loss score, FVE, L0 and dead fraction per site at every studied step,
seed-shared at the last step (two seeds, as the study's seed baseline), and the `sae` stage's wall time.

Prints one JSON line per (config, step, site), then one summary line per config. Needs a finished demo run (its
`model/` and `corpus/`); nothing is written there: they are copied once to ``--work`` and every config trains in
its own run directory under it (``<work>/<config>/``), through the real CLI (`sfcd sae`), one process per step.

    python benchmarks/demo_sae_sweep.py --run runs/demo --work /tmp/demo_sae_sweep            # every config
    python benchmarks/demo_sae_sweep.py --configs current,k4 --steps 1500                     # some, one step
    python benchmarks/demo_sae_sweep.py --screen --screen-k 3,4,6 --screen-d-sae 48,96        # one stream, a grid

``--screen`` trains a grid (``sae.sweep`` d_sae x k x two seeds, the same width at every site) from one
activation stream at ``--screen-step`` and prints one line per (site, d_sae, k): the cheap way to see the
trade-off before running whole configs.

On a machine shared with other jobs, run it with ``OMP_NUM_THREADS=1``: with torch's default threads per process,
an oversubscribed 2-core machine ran the stage about ten times slower here (the CPU-time column stays comparable).

Seeds follow the study: the SAE at step N has ``sae.seed = N`` and the last step's seed baseline ``N + 1``.
Seed-shared is the share of the first SAE's live features matched one-to-one at decoder cosine >= 0.7 in the
second (``sfcd.development.saes.match_live``, the study's own rule).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = ["embed", "attn.0", "mlp.0", "resid.0", "attn.1", "mlp.1", "resid.1"]
STEPS = [32, 128, 250, 500, 1500]

# Each config: overrides on top of experiment=demo (the demo.yaml in the tree), as on the command line. Hydra
# merges a per_site override into demo.yaml's, so every config names every site's d_sae and k.
# `current` is whatever demo.yaml says; the others are relative to the settings before issue 20, written out so
# that the sweep stays comparable when demo.yaml changes.


def per_site(d: dict[str, dict]) -> str:
    return "{" + ",".join(f"{s}:{{{','.join(f'{k}:{v}' for k, v in o.items())}}}" for s, o in d.items()) + "}"


BEFORE = {  # the demo's SAEs before issue 20: about as many latents as each site uses, k = 2 (1 at embed)
    "embed": {"d_sae": 32, "k": 1},
    "attn.0": {"d_sae": 48, "k": 2},
    "attn.1": {"d_sae": 24, "k": 2},
    "mlp.0": {"d_sae": 32, "k": 2},
    "resid.0": {"d_sae": 64, "k": 2},
    "mlp.1": {"d_sae": 48, "k": 2},
    "resid.1": {"d_sae": 48, "k": 2},
}
CONFIGS: dict[str, list[str]] = {
    "current": [],
    "before": ["sae.k=2", "sae.n_tokens=250000", "sae.dead_tokens=20000", f"sae.per_site={per_site(BEFORE)}"],
    # about 1.5x the widths, k = 6 (4 at embed)
    "k6": [
        "sae.k=6",
        "sae.n_tokens=250000",
        "sae.dead_tokens=20000",
        "sae.per_site="
        + per_site(
            {
                "embed": {"d_sae": 64, "k": 4},
                "attn.0": {"d_sae": 64, "k": 6},
                "attn.1": {"d_sae": 48, "k": 6},
                "mlp.0": {"d_sae": 48, "k": 6},
                "resid.0": {"d_sae": 96, "k": 6},
                "mlp.1": {"d_sae": 64, "k": 6},
                "resid.1": {"d_sae": 64, "k": 6},
            }
        ),
    ],
}


def sfcd(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``sfcd`` with ``args``; returns its wall time and its CPU time (user + system) in seconds; raises with
    the log's tail on failure. On a shared machine the CPU time is the steadier figure of the two."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, "-m", "sfcd.cli", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"sfcd {' '.join(args)} failed ({r.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t, cpu


def prepare(src: Path, work: Path, name: str) -> Path:
    """``<work>/<name>/`` with links to one copy of the source run's model and corpus (never written to)."""
    base = work / "_source"
    if not (base / "model").exists():
        base.mkdir(parents=True, exist_ok=True)
        for part in ("corpus", "model"):
            shutil.copytree(src / part, base / part)
    run = work / name
    run.mkdir(parents=True, exist_ok=True)
    for part in ("corpus", "model"):
        if not (run / part).exists():
            os.symlink(base / part, run / part)
    return run


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def seed_shared(a: Path, b: Path, threshold: float = 0.7) -> float:
    from sfcd.development.saes import live, match_live

    la = live(a)
    if not len(la):
        return float("nan")
    return float((match_live(a, b).sim[la] >= threshold).mean())


def row(**kw) -> dict:
    out = {}
    for k, v in kw.items():
        out[k] = round(v, 4) if isinstance(v, float) else v
    return out


def run_config(name: str, overrides: list[str], src: Path, work: Path, steps: list[int]) -> None:
    run = prepare(src, work, name)
    log = work / f"{name}.log"
    times = []
    rows = []
    for step in steps:
        common = [f"run_dir={run}", f"step={step}", *overrides]
        secs, cpu = sfcd(["sae", *common, f"sae.seed={step}"], log)
        times.append((secs, cpu))
        seed_secs = seed_cpu = None
        if step == max(steps):
            seed_secs, seed_cpu = sfcd(["sae", *common, f"+sae.sweep.seed=[{step + 1}]"], log)
        for site in SITES:
            f = run / "saes" / f"step{step}" / site
            m = metrics(f)
            shared = seed_shared(f, f.parent / f"{site}@seed={step + 1}") if step == max(steps) else None
            r = row(
                config=name,
                step=step,
                site=site,
                d_sae=m["d_sae"],
                k=m["hparams"].get("k"),
                ce_loss_score=m["ce_loss_score"],
                fve=m["fve"],
                l0=m["l0"],
                dead=m["dead_fraction"],
                seed_shared=shared,
                stage_s=secs,
                stage_cpu_s=cpu,
                seed_stage_s=seed_secs,
                seed_stage_cpu_s=seed_cpu,
            )
            rows.append(r)
            print(json.dumps(r), flush=True)
    last = [r for r in rows if r["step"] == max(steps)]
    summary = row(
        config=name,
        summary=True,
        overrides=overrides,
        steps=steps,
        min_ce=min(r["ce_loss_score"] for r in rows),
        ce_below_0_9=sum(r["ce_loss_score"] < 0.9 for r in rows),
        pairs=len(rows),
        last_max_dead=max(r["dead"] for r in last),
        last_min_seed_shared=min(r["seed_shared"] for r in last),
        stage_s_per_step=sum(t for t, _ in times) / len(times),
        stage_cpu_s_per_step=sum(c for _, c in times) / len(times),
    )
    summary["meets_goal"] = bool(
        summary["ce_below_0_9"] == 0 and summary["last_max_dead"] < 0.1 and summary["last_min_seed_shared"] >= 0.5
    )
    print(json.dumps(summary), flush=True)


def screen(
    src: Path, work: Path, step: int, widths: list[int], ks: list[int], extra: list[str], sites: list[str]
) -> None:
    """One ``sfcd sae`` at ``step`` training the grid (d_sae x k x two seeds) at ``sites`` from one stream."""
    run = prepare(src, work, "screen")
    log = work / "screen.log"
    seeds = [step, step + 1]
    args = [
        "sae",
        f"run_dir={run}",
        f"step={step}",
        "sae.cache=true",  # a second screen at this step reads the activations back, no forward pass
        f"+sae.sweep.d_sae=[{','.join(map(str, widths))}]",
        f"+sae.sweep.k=[{','.join(map(str, ks))}]",
        f"+sae.sweep.seed=[{seeds[0]},{seeds[1]}]",
        f"sae.sites=[{','.join(sites)}]",
        *extra,
    ]
    secs, cpu = sfcd(args, log)
    out = run / "saes" / f"step{step}"
    for site in sites:
        for w in widths:
            for k in ks:
                a, b = (out / f"{site}@d_sae={w},k={k},seed={s}" for s in seeds)
                ma, mb = metrics(a), metrics(b)
                r = row(
                    screen=True,
                    step=step,
                    site=site,
                    d_sae=w,
                    k=k,
                    extra=extra,
                    ce_loss_score=ma["ce_loss_score"],
                    ce_loss_score_seed2=mb["ce_loss_score"],
                    fve=ma["fve"],
                    l0=ma["l0"],
                    dead=ma["dead_fraction"],
                    dead_seed2=mb["dead_fraction"],
                    seed_shared=seed_shared(a, b),
                    stage_s=secs,
                    stage_cpu_s=cpu,
                )
                print(json.dumps(r), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="a finished demo run (read only)")
    p.add_argument("--work", type=Path, default=Path("/tmp/demo_sae_sweep"))
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--screen", action="store_true")
    p.add_argument("--screen-step", type=int, default=1500)
    p.add_argument("--screen-d-sae", default="64,128")
    p.add_argument("--screen-k", default="2,4")
    p.add_argument("--sites", default=",".join(SITES), help="--screen: the sites screened")
    p.add_argument("--extra", default="", help="space-separated overrides added to every sfcd call")
    a = p.parse_args()
    if not (a.run / "model").is_dir():
        raise SystemExit(f"--run {a.run} has no model/; run `make demo` first or point --run at a demo run")
    a.work.mkdir(parents=True, exist_ok=True)
    extra = a.extra.split()
    if a.screen:
        ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
        screen(a.run, a.work, a.screen_step, ints(a.screen_d_sae), ints(a.screen_k), extra, a.sites.split(","))
        return
    steps = [int(x) for x in a.steps.split(",")]
    for name in a.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown config {name!r}; known: {list(CONFIGS)}")
        run_config(name, CONFIGS[name] + extra, a.run, a.work, steps)


if __name__ == "__main__":
    main()
