"""The ``features`` stage: for each trained SAE of a checkpoint, stream held-out tokens and write
``features/step<N>/<sae>/``: ``stats.safetensors`` (density, mean, max, histogram), ``features.json`` (all
per-feature data, and a summary) and ``index.html`` (the dashboard)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from sfcd.activations.harvest import token_windows
from sfcd.data.tokens import read_tokens
from sfcd.devices import work_device
from sfcd.errors import ConfigError, MissingArtifactError
from sfcd.features.collect import HIST_BINS, HIST_HI, HIST_LO, FeatureStats, collect
from sfcd.features.contexts import logit_effects, windows_for
from sfcd.features.dashboard import write_dashboard
from sfcd.io import read_json, save_safetensors, write_json
from sfcd.models.loading import checkpoint
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir
from sfcd.sae.evaluate import ultra_low_group
from sfcd.sae.io import load_sae
from sfcd.sae.stage import check_sae_fits

log = logging.getLogger(__name__)


def list_saes(run: RunDir, step: int) -> list[Path]:
    """The complete SAEs (with ``metrics.json``) of a checkpoint."""
    folder = run.root / "saes" / f"step{step}"
    found = sorted(p.parent for p in folder.glob("*/metrics.json")) if folder.is_dir() else []
    if not found:
        raise MissingArtifactError(f"no trained SAEs in {folder}; run `sfcd sae run_dir={run.root} step={step}` first")
    return found


def cluster_summary(sae, density: torch.Tensor, low: float) -> dict:
    """The ultra-low-density group (live features below ``low``) and whether it is the one-layer reference's
    cluster: many features (>= 10%) sharing one encoder direction (mean cosine to their mean >= 0.5)."""
    g = ultra_low_group(sae.W_enc.detach().cpu(), density, low)
    out = {
        "dead": int(g["dead"].sum()),
        "ultra_low": int(g["ultra"].sum()),
        "d_sae": len(density),
        "dead_ids": g["dead"].nonzero().flatten().tolist(),
        "cluster": False,
    }
    if g["cos_to_mean"] is not None:
        out["ultra_low_cos_to_mean"] = g["cos_to_mean"]
        out["cluster"] = bool(out["ultra_low"] >= 0.1 * len(density) and g["cos_to_mean"] >= 0.5)
    return out


def feature_records(
    stats: FeatureStats,
    contexts: dict,
    logits,
    tok_of,
    windows: np.ndarray,
    fc: DictConfig,
) -> tuple[list[dict], Counter]:
    """One JSON-able record per feature, and the token ids used (for the token table)."""
    pos_ids, pos_vals, neg_ids, neg_vals = logits
    T = windows.shape[1]
    used: Counter = Counter()
    density, mean = stats.density, stats.mean_act
    records = []
    for f in range(len(stats.counts)):
        flags = []
        if stats.counts[f] == 0:
            flags.append("dead")
        elif density[f] < fc.ultra_low:
            flags.append("ultra-low")
        sample_pos = [int(p) for p in stats.sample_pos[f] if p >= 0]
        if len(sample_pos) >= 5:
            tok, n = Counter(int(windows[p // T, p % T]) for p in sample_pos).most_common(1)[0]
            if n / len(sample_pos) >= fc.token_feature:
                flags.append("token: " + tok_of(tok))
        top = [contexts[(f, i)] for i in range(fc.top_k) if (f, i) in contexts]
        samples = [contexts[(f, 1000 + i)] for i in range(fc.quantile_contexts) if (f, 1000 + i) in contexts]
        for c in top + samples:
            used.update(c["ids"])
        rec = {
            "id": f,
            "density": float(density[f]),
            "max": float(stats.maxs[f]),
            "mean": float(mean[f]),
            "hist": stats.hist[f].tolist(),
            "flags": flags,
            "top": top,
            "samples": samples,
            "logits_pos": [[int(i), round(float(v), 4)] for i, v in zip(pos_ids[f], pos_vals[f], strict=True)],
            "logits_neg": [[int(i), round(float(v), 4)] for i, v in zip(neg_ids[f], neg_vals[f], strict=True)],
        }
        used.update(i for i, _ in rec["logits_pos"] + rec["logits_neg"])
        records.append(rec)
    return records, used


def wanted_positions(stats: FeatureStats, fc: DictConfig) -> dict[int, list[tuple[int, int]]]:
    """Top positions (tags 0..k-1) and positions at evenly spaced ranks of the random sample (tags 1000+i)."""
    wanted = {}
    for f in range(len(stats.counts)):
        items = [(int(p), i) for i, p in enumerate(stats.top_pos[f]) if p >= 0]
        vals, pos = stats.sample_vals[f], stats.sample_pos[f]
        ok = pos >= 0
        if ok.sum() and fc.quantile_contexts:
            order = vals[ok].argsort()
            ranks = np.linspace(0, len(order) - 1, min(fc.quantile_contexts, len(order))).round().astype(int)
            items += [(int(pos[ok][order[r]]), 1000 + i) for i, r in enumerate(ranks)]
        wanted[f] = items
    return wanted


def investigate(
    model,
    tokenizer,
    site_name: str,
    sae_dir: Path,
    windows: np.ndarray,
    fc: DictConfig,
    out: Path,
    exclude: set[int],
    title: str,
) -> dict:
    """Everything about one SAE's features, written to ``out``; returns the summary."""
    sae = load_sae(sae_dir).to(next(model.parameters()).device)
    site = parse_site(site_name, model)
    check_sae_fits(sae, model, site)
    with tqdm(total=len(windows), desc=f"features {sae_dir.name}", unit="seq", leave=False, disable=None) as bar:
        stats = collect(model, site, sae, windows, fc.top_k, fc.sample, fc.batch, exclude, progress=bar)
    contexts = windows_for(
        model, site, sae, windows, wanted_positions(stats, fc), fc.window_left, fc.window_right, fc.batch
    )
    logits = logit_effects(model, site, sae, fc.logit_k)
    token_text: dict[int, str] = {}

    def tok_of(i: int) -> str:
        if i not in token_text:
            token_text[i] = tokenizer.decode([i])
        return token_text[i]

    records, used = feature_records(stats, contexts, logits, tok_of, windows, fc)
    for i in used:
        tok_of(i)
    summary = {
        "sae": sae_dir.name,
        "site": site_name,
        "n_tokens": stats.n_tokens,
        **cluster_summary(sae, stats.density, fc.ultra_low),
        "token_features": sum(any(fl.startswith("token:") for fl in r["flags"]) for r in records),
    }
    text = (
        f"{summary['d_sae']} features over {summary['n_tokens']:,} held-out tokens; {summary['dead']} dead; "
        f"{summary['ultra_low']} ultra-low-density (< {fc.ultra_low:g})"
        + (" forming a cluster with one shared encoder direction" if summary["cluster"] else "")
        + f"; {summary['token_features']} token features."
    )
    data = {
        "summary": summary,
        "summary_text": text,
        "hist_range": [HIST_LO, HIST_HI],
        "hist_bins": HIST_BINS,
        "tokens": {str(i): t for i, t in token_text.items()},
        "features": records,
    }
    save_safetensors(
        out / "stats.safetensors",
        {"density": stats.density.float(), "mean": stats.mean_act, "max": stats.maxs, "hist": stats.hist},
    )
    write_json(out / "features.json", data, indent=None)
    write_dashboard(out / "index.html", data, title)
    return summary


def build_features(cfg: DictConfig) -> list[Path]:
    run = RunDir(cfg.run_dir)
    model, tokenizer, step = checkpoint(cfg, cfg.step)
    model.to(work_device(cfg.trainer))
    fc = cfg.features
    saes = list_saes(run, step)
    if list(fc.saes) != ["all"]:
        names = {p.name: p for p in saes}
        missing = [n for n in fc.saes if n not in names]
        if missing:
            raise ConfigError(f"no SAEs {missing} in {saes[0].parent}; there are {sorted(names)}")
        saes = [names[n] for n in fc.saes]
    seq_len = cfg.sae.seq_len or cfg.model.seq_len
    windows = token_windows(read_tokens(run.tokens("val")), seq_len, max(1, fc.n_tokens // seq_len))
    exclude = set(tokenizer.all_special_ids) if cfg.sae.exclude_special else set()
    written = []
    for sae_dir in saes:
        site_name = read_json(sae_dir / "metrics.json").get("site", sae_dir.name.split("@")[0])
        out = run.root / "features" / f"step{step}" / sae_dir.name
        if (out / "index.html").exists() and (out / "index.html").stat().st_mtime >= (
            sae_dir / "metrics.json"
        ).stat().st_mtime:
            log.info("features of %s are complete; skipping", sae_dir.name)  # index.html is written last
            written.append(out)
            continue
        summary = investigate(
            model,
            tokenizer,
            site_name,
            sae_dir,
            windows,
            fc,
            out,
            exclude,
            f"sfcd features: {sae_dir.name} at step {step}",
        )
        log.info(
            "features %s: %d dead, %d ultra-low%s, %d token features",
            sae_dir.name,
            summary["dead"],
            summary["ultra_low"],
            " (cluster)" if summary["cluster"] else "",
            summary["token_features"],
        )
        written.append(out)
    return written
