"""The development analysis's null, measured on a finished demo run: where nothing develops, births and deaths
beyond the seed floor should be 0, by either matching (``study.match``: activation correlation or decoder cosine).

Two nulls, on a copy of the run's model, corpus and SAEs (the run itself is not written to):
- **adjacent checkpoints**: steps 250 and 256, six training steps apart (the issue's example), each with the
  study's two SAE seeds (``<site>`` seeded ``seed + step``, ``<site>@seed=<seed + step + 1>``);
- **one checkpoint against itself**: the last studied step's two seeds read as step k, and two more seeds of the
  same checkpoint (``@seed=<seed + step + 2>`` and ``+ 3``) read as step k + 1.

Prints one JSON line per (null, matching) with the raw counts (the two main SAEs), the per-feature rule's
counts, its crossed-seed null and the reported counts beyond it, summed over the sites.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STATS = ("births", "deaths", "splits", "merges")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/demo", help="a finished demo study")
    ap.add_argument("--work", default="/tmp/sfcd_development_null", help="where the copy and the new SAEs go")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sfcd.config import compose
    from sfcd.development.analysis import changes_beyond_floor, site_development, site_signatures
    from sfcd.development.saes import live_features, sae_folder
    from sfcd.devices import work_device
    from sfcd.io import read_json
    from sfcd.paths import RunDir
    from sfcd.sae.stage import train_saes

    src = Path(args.run_dir)
    steps = read_json(src / "development" / "study_steps.json")["steps"]
    last = steps[-1]
    work = Path(args.work)
    if not (work / "model").exists():
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "corpus", work / "corpus")
        shutil.copytree(src / "model", work / "model", ignore=shutil.ignore_patterns("*.ckpt", "tensorboard"))
        shutil.copytree(src / "saes", work / "saes")
    base = ["experiment=demo", f"run_dir={work}"]
    cfg = compose(base)
    run = RunDir(work)
    device = work_device(cfg.trainer)
    seed = cfg.sae.seed

    def train(step: int, s: int, suffix: bool) -> None:
        c = compose([*base, f"step={step}", f"sae.seed={s}", "sae.ce_tokens=0"])
        if suffix:
            c.sae.sweep = {"seed": [s]}
        train_saes(c)  # skips SAEs already trained

    t0 = time.perf_counter()
    for step in (250, 256):
        train(step, seed + step, False)
        train(step, seed + step + 1, True)
    train(last, seed + last + 2, True)
    train(last, seed + last + 3, True)
    print(json.dumps({"figure": "null_saes_seconds", "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    sites = sorted(p.name for p in (work / "saes" / "step256").iterdir() if "@" not in p.name)
    nulls = {
        "adjacent 250 vs 256": ([250, 256], {s: lambda site, s=s: f"{site}@seed={seed + s + 1}" for s in (250, 256)}),
    }
    for how in ("activations", "decoders"):
        c = compose([*base, f"study.match={how}"])
        for name, (pair, seeds) in nulls.items():
            total = {f"{x}{k}": 0 for x in STATS for k in ("_raw", "_rule", "", "_null_hi")}
            per_site = {}
            for site in sites:
                sn = {s: seeds[s](site) for s in pair}
                sig = site_signatures(c, run, pair, site, sn, device) if how == "activations" else None
                thr, fires = c.study.shared_threshold, c.study.match_min_fires
                d = site_development(run, pair, site, thr, sn, device, sig, fires)
                ch = d["changes"][0]
                per_site[site] = {x: ch[x] for x in STATS}
                for x in STATS:
                    total[f"{x}_raw"] += ch[f"{x}_raw"]
                    total[f"{x}_rule"] += ch[f"{x}_rule"]
                    total[x] += ch[x]
                    total[f"{x}_null_hi"] += ch[f"{x}_null_hi"]
            print(json.dumps({"figure": "null", "null": name, "match": how, **total, "per_site": per_site}), flush=True)
        # one checkpoint against itself: its four seeds as two steps (main + seed 1 as k, seeds 2 and 3 as k + 1)
        total = {f"{x}{k}": 0 for x in STATS for k in ("_rule", "")}
        per_site = {}
        for site in sites:
            names = [site, *(f"{site}@seed={seed + last + j}" for j in (1, 2, 3))]
            sig = {}
            if how == "activations":
                sig = site_signatures(c, run, [last], names[0], {last: names[1]}, device)
                sig |= site_signatures(c, run, [last], names[2], {last: names[3]}, device)
            feats = [
                live_features(sae_folder(run, last, n), sig.get((last, n)), c.study.match_min_fires) for n in names
            ]
            _, ch = changes_beyond_floor(*(f.rows for f in feats), c.study.shared_threshold, device)
            per_site[site] = {x: ch[x] for x in STATS}
            for x in STATS:
                total[f"{x}_rule"] += ch[f"{x}_rule"]
                total[x] += ch[x]
        line = {"figure": "null", "null": f"step {last} against itself", "match": how, **total, "per_site": per_site}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
