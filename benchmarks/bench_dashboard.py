"""The feature dashboard at the paper's width: 32,768 features, every one live, written through the features
stage's own writer (:func:`sfcd.features.stage.write_features`) from synthetic statistics and contexts of the
stage's default sizes (10 top + 5 lower-quantile contexts of 17 tokens, 10 + 10 logit effects, a 50-bin
histogram per feature; a 50,304-token vocabulary), then opened in headless Chromium from file://.

Prints one JSON line per figure: bytes of index.html (the page with its embedded index), of index.json and of
the largest shard file; the seconds and peak RSS of writing; the page's own time to render its index of 32,768
features (performance.now() when the rows are in the DOM, written by the page into <body data-rendered-ms>),
the wall-clock seconds of a whole headless Chromium run that loads the page and dumps its DOM (against the same
run on an empty page: the browser's own start-up), and the time from navigation to one feature rendered from
its shard file (``#open=<id>``).

    python benchmarks/bench_dashboard.py [--features 32768] [--shard-size 256] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from sfcd.config import FeaturesConfig
from sfcd.features.collect import HIST_BINS, FeatureStats
from sfcd.features.contexts import Contexts
from sfcd.features.stage import write_features

VOCAB = 50_304


def emit(name: str, value, unit: str, **extra) -> None:
    print(json.dumps({"figure": name, "value": value, "unit": unit, **extra}), flush=True)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def synthetic(F: int, fc, seed: int = 0):
    """Stats, contexts and logit effects of an SAE whose every feature fires (densities log-uniform 1e-6..1e-1
    over 10M tokens), with Zipf-like token ids, and a tokenizer-like text per token id."""
    g = np.random.default_rng(seed)
    n_tokens = 10_000_000
    counts = np.maximum(1, (10 ** g.uniform(-6, -1, F) * n_tokens).astype(np.int64))
    maxs = g.gamma(2.0, 2.0, F).astype(np.float32) + 0.1
    hist = g.poisson(counts[:, None] / HIST_BINS * np.exp(-(np.linspace(-2, 2, HIST_BINS) ** 2))).astype(np.int64)
    T, n_seq = 128, 4096
    windows = np.minimum(g.zipf(1.3, (n_seq, T)), VOCAB - 1).astype(np.int64)
    S = fc.sample
    sample_pos = g.integers(0, n_seq * T, (F, S))
    tok = F // 10  # a tenth are token features: every sampled firing on one token
    sample_pos[:tok] = np.flatnonzero(windows.ravel() == 1)[:S]
    stats = FeatureStats(
        n_tokens,
        torch.from_numpy(counts),
        torch.from_numpy(counts * maxs / 3),
        torch.from_numpy(maxs),
        torch.from_numpy(hist),
        torch.zeros(F, fc.top_k),
        torch.zeros(F, fc.top_k, dtype=torch.long),
        torch.ones(F, S),
        torch.from_numpy(sample_pos),
    )
    C, W = fc.top_k + fc.quantile_contexts, fc.window_left + 1 + fc.window_right
    ids = np.minimum(g.zipf(1.3, (F, C, W)), VOCAB - 1).astype(np.int32)
    acts = (g.random((F, C, W), dtype=np.float32) * maxs[:, None, None]).astype(np.float32)
    ids[::7, :, : fc.window_left // 3] = -1  # some windows cut at their sequence's start
    contexts = Contexts(ids, acts, fc.window_left)
    k = fc.logit_k
    pos_v = -np.sort(-g.normal(1, 0.3, (F, k)), 1)
    logits = (g.integers(0, VOCAB, (F, k)), pos_v, g.integers(0, VOCAB, (F, k)), np.sort(g.normal(-1, 0.3, (F, k)), 1))
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    text = [(" " if i % 2 else "") + "".join(g.choice(letters, 2 + i % 7)) for i in range(VOCAB)]
    return stats, contexts, logits, windows, text


def chromium_run(chromium: str, url: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as profile:
        t = time.perf_counter()
        p = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        return time.perf_counter() - t, p.stdout


def attr(dom: str, name: str) -> float | None:
    m = re.search(rf'<body[^>]*\b{name}="([\d.]+)"', dom)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=32_768)
    ap.add_argument("--shard-size", type=int, default=None, help="default: features.shard_size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep the dashboard here (default: a temp folder, removed)")
    args = ap.parse_args()
    fc = OmegaConf.structured(FeaturesConfig)  # the stage's defaults
    if args.shard_size:
        fc.shard_size = args.shard_size
    F = args.features
    stats, contexts, logits, windows, text = synthetic(F, fc)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_dashboard."))
    base_rss = rss_mib()
    t = time.perf_counter()
    cluster = {"dead": 0, "ultra_low": int((stats.density < fc.ultra_low).sum()), "d_sae": F, "dead_ids": []}
    cluster["cluster"] = False
    summary = write_features(
        out,
        stats,
        contexts,
        logits,
        windows,
        fc,
        text.__getitem__,
        {"sae": "bench", "site": "resid.3", "n_tokens": stats.n_tokens},
        cluster,
        f"bench: {F} features",
    )
    write_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    shards = sorted((out / "feats").glob("shard_*.js"))
    size = {"features": F, "shard_size": fc.shard_size}
    emit("index_html_bytes", (out / "index.html").stat().st_size, "B", **size)
    emit("index_json_bytes", (out / "index.json").stat().st_size, "B", **size)
    emit("largest_shard_bytes", max(p.stat().st_size for p in shards), "B", shards=len(shards), **size)
    emit("all_shards_bytes", sum(p.stat().st_size for p in shards), "B", **size)
    emit("write_seconds", round(write_s, 2), "s", token_features=summary["token_features"], **size)
    emit("write_peak_rss_mib", round(peak, 1), "MiB", before_writing=round(base_rss, 1), **size)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        emit("chromium", None, "", error="headless Chromium is not installed (Debian package `chromium`)")
        return
    empty = Path(tempfile.mkdtemp(prefix="bench_dashboard_empty.")) / "empty.html"  # the browser's start-up alone
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    page = (out / "index.html").as_uri()
    rendered, wall, blank, opened, opened_wall = [], [], [], [], []
    probe = F - 5  # a feature in the last shard
    for _ in range(args.repeats):
        blank.append(chromium_run(chromium, empty.as_uri())[0])
        w, dom = chromium_run(chromium, page)
        wall.append(w)
        rendered.append(attr(dom, "data-rendered-ms"))
        if f"{F} of {F} features" not in dom:
            raise SystemExit("the page did not render its index")
        w, dom = chromium_run(chromium, page + f"#open={probe}")
        opened_wall.append(w)
        opened.append(attr(dom, "data-opened-ms"))
        if f"<h2>Feature {probe}</h2>" not in dom:
            raise SystemExit(f"the page did not open feature {probe}")
    med = statistics.median
    emit("page_index_rendered_ms", med(rendered), "ms", runs=rendered, **size)
    emit("chromium_load_dump_wall_s", round(med(wall), 2), "s", runs=[round(x, 2) for x in wall], **size)
    emit("chromium_empty_page_wall_s", round(med(blank), 2), "s", runs=[round(x, 2) for x in blank])
    emit("page_feature_opened_ms", med(opened), "ms", feature=probe, runs=opened, **size)
    emit("chromium_open_feature_wall_s", round(med(opened_wall), 2), "s", runs=[round(x, 2) for x in opened_wall])
    shutil.rmtree(empty.parent)
    if not args.out:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
