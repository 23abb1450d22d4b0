"""The ``features`` stage: for each trained SAE of a checkpoint, stream held-out tokens and write
``features/step<N>/<sae>/``: ``stats.safetensors`` (density, mean, max, histogram), ``feats/shard_*.js`` (the
per-feature details, ``features.shard_size`` features a file), ``index.json`` (the summary and a small index of
every feature) and ``index.html`` (the dashboard, written last); see :mod:`sfcd.features.dashboard`."""

from __future__ import annotations

import gc
import logging
from collections import Counter
from collections.abc import Iterator
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
from sfcd.features.contexts import Contexts, logit_effects, windows_for
from sfcd.features.dashboard import DashboardWriter
from sfcd.io import read_json, save_safetensors
from sfcd.models.loading import checkpoint
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir
from sfcd.sae.evaluate import ultra_low_group
from sfcd.sae.io import load_dictionary
from sfcd.sae.stage import check_sae_fits

log = logging.getLogger(__name__)


def list_saes(run: RunDir, step: int) -> list[Path]:
    """The complete SAEs (with ``metrics.json``) of a checkpoint."""
    folder = run.root / "saes" / f"step{step}"
    found = sorted(p.parent for p in folder.glob("*/metrics.json")) if folder.is_dir() else []
    if not found:
        raise MissingArtifactError(f"no trained SAEs in {folder}; run `sfcd sae run_dir={run.root} step={step}` first")
    return found


def list_transcoders(run: RunDir, step: int) -> list[Path]:
    """The complete transcoders (with ``metrics.json``) of a checkpoint."""
    folder = run.transcoders(step)
    found = sorted(p.parent for p in folder.glob("*/metrics.json")) if folder.is_dir() else []
    if not found:
        raise MissingArtifactError(
            f"no trained transcoders in {folder}; run `sfcd sae run_dir={run.root} step={step} "
            "sae.transcoders=[mlp]` first, or set features.transcoders=false"
        )
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


def token_flag(sample_pos: np.ndarray, windows: np.ndarray, share: float) -> int | None:
    """The token on which >= ``share`` of a feature's sampled firings (positions, -1 = empty; at least 5) fall."""
    pos = sample_pos[sample_pos >= 0]
    if len(pos) < 5:
        return None
    T = windows.shape[1]
    tok, n = Counter(windows[pos // T, pos % T].tolist()).most_common(1)[0]
    return int(tok) if n / len(pos) >= share else None


def feature_records(
    stats: FeatureStats,
    contexts: Contexts,
    logits,
    tok_of,
    windows: np.ndarray,
    fc: DictConfig,
    features: range | None = None,
) -> Iterator[dict]:
    """One JSON-able record per feature (of ``features``, default all), made one at a time from the arrays."""
    pos_ids, pos_vals, neg_ids, neg_vals = (np.asarray(x) for x in logits)
    density, mean = stats.density.numpy(), stats.mean_act.numpy()
    counts, maxs, hist = stats.counts.numpy(), stats.maxs.numpy(), stats.hist.numpy()
    sample_pos = stats.sample_pos.numpy()
    k, ultra_low, share = fc.top_k, fc.ultra_low, fc.token_feature
    features = features if features is not None else range(len(counts))
    for f in features:
        if f == features.start or (f - features.start) % 256 == 0:  # contexts converted 256 features at a time
            block = range(f, min(f + 256, features.stop))
            slots = contexts.block(block)
        ctx = slots[f - block.start]
        flags = []
        if counts[f] == 0:
            flags.append("dead")
        elif density[f] < ultra_low:
            flags.append("ultra-low")
        tok = token_flag(sample_pos[f], windows, share)
        if tok is not None:
            flags.append("token: " + tok_of(tok))
        yield {
            "id": f,
            "density": float(density[f]),
            "max": _sig(maxs[f]),
            "mean": _sig(mean[f]),
            "hist": hist[f].tolist(),
            "flags": flags,
            "top": [c for c in ctx[:k] if c is not None],
            "samples": [c for c in ctx[k:] if c is not None],
            "logits_pos": [[int(i), round(float(v), 4)] for i, v in zip(pos_ids[f], pos_vals[f], strict=True)],
            "logits_neg": [[int(i), round(float(v), 4)] for i, v in zip(neg_ids[f], neg_vals[f], strict=True)],
        }


def _sig(x, digits: int = 5) -> float:
    return float(f"{float(x):.{digits}g}")


def wanted_positions(stats: FeatureStats, fc: DictConfig) -> np.ndarray:
    """[F, top_k + quantile_contexts] flat token positions (-1: none): the top positions, then positions at evenly
    spaced ranks (by activation) of the random sample of firings."""
    top = stats.top_pos.numpy()
    vals, pos = stats.sample_vals.numpy(), stats.sample_pos.numpy()
    F, q = len(top), fc.quantile_contexts
    out = np.full((F, top.shape[1] + q), -1, dtype=np.int64)
    out[:, : top.shape[1]] = top
    ok = pos >= 0
    n = ok.sum(1)  # valid samples per feature
    order = np.argsort(np.where(ok, vals, np.inf), axis=1, kind="stable")  # valid ones first, ascending
    m = np.minimum(q, n)
    for i in range(q):
        rank = np.where(m > 1, np.round(i * (n - 1) / np.maximum(m - 1, 1)), 0).astype(np.int64)
        has = i < m
        picked = np.take_along_axis(pos, np.take_along_axis(order, rank.clip(0, pos.shape[1] - 1)[:, None], 1), 1)
        out[:, top.shape[1] + i] = np.where(has, picked[:, 0], -1)
    return out


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
    """Everything about one SAE's (or transcoder's: ``site_name`` is then what it reads, ``mlp_in.<l>``)
    features, written to ``out``; returns the summary."""
    sae = load_dictionary(sae_dir).to(next(model.parameters()).device)
    site = parse_site(site_name, model)
    check_sae_fits(sae, model, site)
    with tqdm(total=len(windows), desc=f"features {sae_dir.name}", unit="seq", leave=False, disable=None) as bar:
        stats = collect(model, site, sae, windows, fc.top_k, fc.sample, fc.batch, exclude, progress=bar)
    contexts = windows_for(
        model, site, sae, windows, wanted_positions(stats, fc), fc.window_left, fc.window_right, fc.batch
    )
    logits = logit_effects(model, site, sae, fc.logit_k)
    cluster = cluster_summary(sae, stats.density, fc.ultra_low)
    token_text: dict[int, str] = {}

    def tok_of(i: int) -> str:
        if i not in token_text:
            token_text[i] = tokenizer.decode([i])
        return token_text[i]

    base = {"sae": sae_dir.name, "site": site_name, "n_tokens": stats.n_tokens}
    return write_features(out, stats, contexts, logits, windows, fc, tok_of, base, cluster, title)


def write_features(
    out: Path,
    stats: FeatureStats,
    contexts: Contexts,
    logits,
    windows: np.ndarray,
    fc: DictConfig,
    tok_of,
    base: dict,
    cluster: dict,
    title: str,
) -> dict:
    """``stats.safetensors``, the dashboard's shard files one at a time (one shard's records in memory), then
    ``index.json`` and ``index.html``; returns the summary (``base`` + ``cluster`` + the token-feature count)."""
    save_safetensors(
        out / "stats.safetensors",
        {"density": stats.density.float(), "mean": stats.mean_act, "max": stats.maxs, "hist": stats.hist},
    )
    F, size = len(stats.counts), fc.shard_size
    writer = DashboardWriter(out, F, size)
    n_token = 0
    was = gc.isenabled()
    gc.disable()  # millions of small acyclic lists a shard: the cyclic collector's passes cost a third of the time
    try:
        for lo in range(0, F, size):
            recs = list(feature_records(stats, contexts, logits, tok_of, windows, fc, range(lo, min(lo + size, F))))
            n_token += sum(any(fl.startswith("token:") for fl in r["flags"]) for r in recs)
            writer.add(recs, tok_of)
            del recs
    finally:
        if was:
            gc.enable()
    summary = {**base, **cluster, "token_features": n_token}
    text = (
        f"{summary['d_sae']} features over {summary['n_tokens']:,} held-out tokens; {summary['dead']} dead; "
        f"{summary['ultra_low']} ultra-low-density (< {fc.ultra_low:g})"
        + (" forming a cluster with one shared encoder direction" if summary["cluster"] else "")
        + f"; {summary['token_features']} token features."
    )
    meta = {"summary": summary, "summary_text": text, "hist_range": [HIST_LO, HIST_HI], "hist_bins": HIST_BINS}
    writer.finish(meta, title)
    return summary


def build_features(cfg: DictConfig) -> list[Path]:
    run = RunDir(cfg.run_dir)
    model, tokenizer, step = checkpoint(cfg, cfg.step, "features")
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
    # (dictionary, the site it reads, its output folder): the SAEs, then with features.transcoders the transcoders
    # (they read mlp_in.<l>), under features/step<N>/transcoders/
    todo = []
    for sae_dir in saes:
        site_name = read_json(sae_dir / "metrics.json").get("site", sae_dir.name.split("@")[0])
        todo.append((sae_dir, site_name, run.root / "features" / f"step{step}" / sae_dir.name))
    if fc.get("transcoders"):
        for tc_dir in list_transcoders(run, step):
            site_name = read_json(tc_dir / "metrics.json")["input_site"]
            todo.append((tc_dir, site_name, run.root / "features" / f"step{step}" / "transcoders" / tc_dir.name))
    for sae_dir, site_name, out in todo:
        done = out / "index.html"  # written last; index.json: the sharded layout (older runs wrote features.json)
        if (
            done.exists()
            and (out / "index.json").exists()
            and done.stat().st_mtime >= (sae_dir / "metrics.json").stat().st_mtime
        ):
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
