"""Development across checkpoints: SAE quality, shared features against the seed baseline, lineage, births,
deaths, splits and merges against their noise floor (the definitions are in :mod:`sfcd.development.lineage`),
and circuits through training (size, node, weighted and edge Jaccard through matched features).

Circuit ids may carry a position (``resid.0/3@2``, per-position circuits): translation keeps it. Edge Jaccard
counts only a circuit's edges at or above its own ``metadata.edge_threshold``. A faithfulness the circuit stage
marks unresolvable (``None``) stays ``None``; nothing here writes NaN."""

from __future__ import annotations

import logging

import numpy as np

from sfcd.development.findings import collect, summarise
from sfcd.development.lineage import FLOOR_STATS, band, beyond_floor, floor, lineage
from sfcd.development.matching import Matching, presence
from sfcd.development.saes import MIN_FIRES, LiveFeatures, decoder, live_features, match_sets, sae_folder
from sfcd.development.signatures import Signatures, read_signatures
from sfcd.devices import work_device
from sfcd.errors import ConfigError, InputError, MissingArtifactError
from sfcd.io import read_json, write_csv, write_json
from sfcd.paths import RunDir

log = logging.getLogger(__name__)


def site_development(
    run: RunDir,
    steps: list[int],
    site: str,
    threshold: float,
    seed_names: dict[int, str] | str | None,
    device=None,
    signatures: dict[tuple[int, str], Signatures] | None = None,
    min_fires: int = MIN_FIRES,
) -> dict:
    """Matchings between adjacent steps at one site, the lineage of the last SAE's features, the noise floor at
    every step with a seed baseline (``seed_names``: step -> the second seed's SAE name; a plain name: the last
    step's), and the changes beyond it (:mod:`sfcd.development.lineage`). ``signatures``: (step, SAE name) ->
    its features' activation signatures on one token sample (:func:`site_signatures`): features are then
    matched by activation correlation, else by decoder cosine."""
    if isinstance(seed_names, str):
        seed_names = {steps[-1]: seed_names}
    seed_names = {int(k): v for k, v in (seed_names or {}).items() if int(k) in steps}
    folders = [sae_folder(run, s, site) for s in steps]
    W = [decoder(f) for f in folders]
    if len({tuple(w.shape) for w in W}) > 1:
        shapes = {s: tuple(w.shape) for s, w in zip(steps, W, strict=True)}
        raise InputError(f"SAEs at site {site} differ in shape across steps {shapes}; use one width for the study")

    def features(step: int, name: str, folder) -> LiveFeatures:
        if signatures is None:
            return live_features(folder)
        if (step, name) not in signatures:
            raise MissingArtifactError(f"no activation signatures of SAE {name} at step {step}")
        return live_features(folder, signatures[step, name], min_fires)

    feats = [features(s, site, f) for s, f in zip(steps, folders, strict=True)]
    alive = [f.idx for f in feats]
    ms: list[Matching] = [match_sets(feats[k + 1], feats[k], device) for k in range(len(W) - 1)]
    changes, first, persisted = lineage(steps, ms, [len(a) for a in alive], threshold)
    first, persisted = first[alive[-1]], persisted[alive[-1]]  # the last SAE's live features

    def shared(m: Matching, a: np.ndarray) -> float:  # of A's live features, the share matched at >= threshold
        return float((m.sim[a] >= threshold).mean()) if len(a) else float("nan")

    vs_final = [shared(match_sets(feats[-1], f, device), alive[-1]) for f in feats]
    # the noise floor: each step's main SAE against its second seed, as if they were two steps
    rows_a = [f.rows for f in feats]
    rows_b: list = []
    within: list = []  # each step's presence of the main SAE's features in its second seed, computed once
    floors: list[dict | None] = []
    seed_match = None  # the last step's main SAE matched to its second seed
    for k, s in enumerate(steps):
        if s not in seed_names:
            rows_b.append(None)
            within.append(None)
            floors.append(None)
            continue
        other = features(s, seed_names[s], sae_folder(run, s, seed_names[s]))
        rows_b.append(other.rows)
        within.append(presence(rows_a[k], rows_b[k], threshold, device))
        m = match_sets(feats[k], other, device)
        if k == len(steps) - 1:
            seed_match = m
        fl = floor(rows_a[k], rows_b[k], m.sim[alive[k]], threshold, device, within[k])
        floors.append({"step": s, "seed_sae": seed_names[s], **fl})
    out_changes = []
    for k, c in enumerate(changes):  # the change from steps[k] to steps[k + 1]
        row = {
            "step": c.step,
            "births": None,
            "deaths": None,
            "splits": None,
            "merges": None,
            "births_raw": c.births,
            "deaths_raw": c.deaths,
            "splits_raw": c.splits,
            "merges_raw": c.merges,
            "shared_fraction": c.shared_fraction,
            "mmcs": c.mmcs,
        }
        if rows_b[k] is not None and rows_b[k + 1] is not None:
            bf, counts = changes_beyond_floor(
                rows_a[k], rows_b[k], rows_a[k + 1], rows_b[k + 1], threshold, device, (within[k], within[k + 1])
            )
            row |= counts
            # which features (full SAE indices): born/merged at steps[k + 1], died/split from steps[k]
            row["born_features"] = alive[k + 1][bf["births"]].tolist()
            row["died_features"] = alive[k][bf["deaths"]].tolist()
            row["split_features"] = alive[k][bf["splits"]].tolist()
            row["merged_features"] = alive[k + 1][bf["merges"]].tolist()
        out_changes.append(row)
    seed = floors[-1]["shared"] if floors and floors[-1] is not None else None
    return {
        "site": site,
        "steps": steps,
        "changes": out_changes,
        "floor": floors,
        "floor_band": band(floors),
        "first_step_counts": {int(s): int((first == s).sum()) for s in steps},
        "persisted_fraction": float(persisted.mean()) if len(persisted) else float("nan"),
        "live_features": [int(len(a)) for a in alive],
        "shared_with_final": vs_final,
        "seed_baseline": seed,
        "matchings": ms,
        "seed_matching": seed_match,
        "features": feats,
        "matched_by": "decoder cosine" if signatures is None else "activation correlation",
    }


def check_match(cfg) -> str:
    """``study.match`` and its settings checked (a study calls this before any work); returns the matching."""
    st = cfg.study
    how = st.get("match", "activations")
    if how not in ("activations", "decoders"):
        raise ConfigError(f"study.match={how!r}; expected activations (what features fire on) or decoders")
    if how == "activations" and (int(st.match_tokens) <= 0 or int(st.match_min_fires) < 1):
        raise ConfigError(
            f"study.match_tokens={st.match_tokens} and study.match_min_fires={st.match_min_fires}: both must be "
            "positive (the held-out tokens features are matched on, and the firings a matched feature needs there)"
        )
    return how


def site_signatures(
    cfg, run: RunDir, steps: list[int], site: str, seed_names: dict[int, str], device=None
) -> dict[tuple[int, str], Signatures]:
    """The activation signatures of the SAEs named ``site`` (``<site>`` or ``<site>@<sweep>``: the main one at
    every step) and ``seed_names`` (the second seed where there is one) on the first ``study.match_tokens``
    held-out tokens, each read through its own checkpoint's model (in ``model.dtype``, as every stage loads it;
    activations in float32)."""
    from sfcd.activations.harvest import token_windows
    from sfcd.data.tokens import read_tokens
    from sfcd.models.loading import checkpoint
    from sfcd.sae.io import load_sae

    seq_len = cfg.sae.seq_len or cfg.model.seq_len
    windows = token_windows(read_tokens(run.tokens("val")), seq_len, max(1, int(cfg.study.match_tokens) // seq_len))
    if not len(windows):
        raise ConfigError(
            f"study.match=activations reads features on held-out tokens, and {run.tokens('val')} holds fewer than "
            f"one window of {seq_len}; raise corpus.val_tokens, or match by decoders (study.match=decoders)"
        )
    out: dict[tuple[int, str], Signatures] = {}
    for step in steps:
        model, tokenizer, _ = checkpoint(cfg, step, "study")
        model.to(device)
        exclude = set(tokenizer.all_special_ids) if cfg.sae.exclude_special else set()
        names = [site, *([seed_names[step]] if step in seed_names else [])]
        saes = {n: load_sae(sae_folder(run, step, n)).to(device).eval() for n in names}
        encoders = {n: sae.encode for n, sae in saes.items()}
        got = read_signatures(model, site.partition("@")[0], encoders, windows, exclude)
        out |= {(step, n): v for n, v in got.items()}
        del model, saes
    return out


def changes_beyond_floor(a0, b0, a1, b1, threshold: float, device=None, within=None) -> tuple[dict, dict]:
    """:func:`sfcd.development.lineage.beyond_floor` from step k (main SAE ``a0``, second seed ``b0``: their live
    features' rows) to k + 1 (``a1``, ``b1``), with its crossed-seed null; returns (the rule's feature indices,
    the counts of a development row: ``<stat>_rule``, the null's mean, largest and 95% bound, and ``<stat>``:
    what exceeds the bound)."""
    bf = beyond_floor(a0, b0, a1, b1, threshold, device, within, null=True)
    null = bf.pop("null")
    row: dict = {"null": null}  # what the rule counts from seed variance alone: the seeds paired across the steps
    row |= {f"{key}_null": float(np.mean(v)) for key, v in null.items()}
    row |= {f"{key}_null_max": int(max(v)) for key, v in null.items()}
    # the counts beyond what seed variance alone gives: the rule's count less the null's 95% upper bound (a
    # Poisson of the crossed pairings' mean count, and at least their largest count), never below 0
    for key, v in bf.items():
        row[f"{key}_rule"] = int(len(v))
        row[f"{key}_null_hi"] = null_upper(row[f"{key}_null"], row[f"{key}_null_max"])
        row[key] = max(0, row[f"{key}_rule"] - row[f"{key}_null_hi"])
    return bf, row


def null_upper(mean: float, largest: int, q: float = 0.95) -> int:
    """The count seed variance alone reaches: the ``q`` quantile of a Poisson of the null's mean count, and at
    least the largest count the null gave."""
    from scipy.stats import poisson

    return max(int(largest), int(poisson.ppf(q, mean)) if mean > 0 else 0)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


def weighted_jaccard(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    num = sum(min(abs(a.get(k, 0.0)), abs(b.get(k, 0.0))) for k in keys)
    den = sum(max(abs(a.get(k, 0.0)), abs(b.get(k, 0.0))) for k in keys)
    return num / den if den else float("nan")


def circuit_graph(run: RunDir, task: str, step: int) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """A circuit's nodes {id: effect} and its edges {(from, to): weight} at or above its own edge threshold
    (``metadata.edge_threshold``: ``|weight| >= threshold``; circuit.json keeps the weaker ones for the
    interactive view's slider, but they are not edges of the circuit)."""
    p = run.root / "circuits" / task / f"step{step}" / "circuit.json"
    if not p.exists():
        raise MissingArtifactError(f"no circuit for task {task} at step {step} ({p})")
    c = read_json(p)
    t = (c.get("metadata") or {}).get("edge_threshold") or 0.0
    edges = {(e["from"], e["to"]): e["weight"] for e in c["edges"] if e["weight"] is not None and abs(e["weight"]) >= t}
    return {n["id"]: n["effect"] for n in c["nodes"]}, edges


def translate_edges(edges: dict[tuple[str, str], float], maps: dict[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """Edges whose two ends both translate (see :func:`translate`); ``y`` stays ``y``."""
    out = {}
    for (a, b), w in edges.items():
        ta = translate({a: 0.0}, maps) if a != "y" else {"y": 0.0}
        tb = translate({b: 0.0}, maps) if b != "y" else {"y": 0.0}
        if ta and tb:
            out[(next(iter(ta)), next(iter(tb)))] = w
    return out


def translate(nodes: dict[str, float], maps: dict[str, np.ndarray]) -> dict[str, float]:
    """Node ids of one step rewritten in the feature indices of another, through one-to-one matches >= threshold
    (``maps[site][j]`` = the matched index, or -1). Error nodes keep their ids; unmatched features are dropped.
    A per-position id (``resid.0/3@2``, ``resid.0/eps@2``) keeps its position: ``resid.0/<match>@2``."""
    out = {}
    for nid, e in nodes.items():
        site, _, rest = nid.partition("/")
        feat, at, pos = rest.partition("@")
        if feat == "eps":
            out[nid] = e
        elif site in maps and 0 <= int(feat) < len(maps[site]) and maps[site][int(feat)] >= 0:
            out[f"{site}/{maps[site][int(feat)]}{at}{pos}"] = e
    return out


def _num(x):
    """A number for strict JSON: None stays None (a faithfulness the circuit stage marks unresolvable), NaN and
    inf become None, never NaN."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def circuit_development(
    run: RunDir, steps: list[int], tasks: list[str], sites: dict[str, dict], threshold: float, cfg=None
) -> dict:
    """Per task: circuit size, node Jaccard and weighted Jaccard (adjacent steps and against the last)."""
    out = {}
    for task in tasks:
        graphs = [circuit_graph(run, task, s) for s in steps]
        nodes = [g[0] for g in graphs]
        edges = [g[1] for g in graphs]
        rows = []
        for k, s in enumerate(steps):
            row = {"step": s, "n_nodes": len(nodes[k])}
            meta = read_json(run.root / "circuits" / task / f"step{s}" / "circuit.json")["metadata"]
            row["faithfulness"] = _num(meta.get("faithfulness"))  # None: unresolvable (F(M) - F(empty) ~ 0)
            row["F_M"] = _num(meta.get("F_M"))
            if "resolvable" in meta:
                row["resolvable"] = meta["resolvable"]
            if k > 0:  # map step k's features back to step k-1 through its matching (A = step k, B = step k-1)
                maps = {
                    site: np.where(d["matchings"][k - 1].sim >= threshold, d["matchings"][k - 1].match, -1)
                    for site, d in sites.items()
                }
                here = translate(nodes[k], maps)
                row["jaccard_prev"] = _num(jaccard(set(here), set(nodes[k - 1])))
                row["edge_jaccard_prev"] = _num(jaccard(set(translate_edges(edges[k], maps)), set(edges[k - 1])))
                row["weighted_jaccard_prev"] = _num(weighted_jaccard(here, nodes[k - 1]))
            # against the last step: compose the matchings from the last step back to this one
            maps = {}
            for site, d in sites.items():
                idx = np.arange(len(d["matchings"][-1].match)) if d["matchings"] else np.array([])
                for m in reversed(d["matchings"][k:]):
                    ok = idx >= 0
                    nxt = np.full_like(idx, -1)
                    nxt[ok] = np.where(m.sim[idx[ok]] >= threshold, m.match[idx[ok]], -1)
                    idx = nxt
                maps[site] = idx  # last-step feature -> this step's feature
            last_here = translate(nodes[-1], maps)
            final_feats = [n.split("@")[0].split("/") for n in nodes[-1] if not n.split("@")[0].endswith("/eps")]
            by_site: dict[str, list[int]] = {}
            for site, feat in final_feats:  # per site: the last circuit's features, and those matched here
                got = by_site.setdefault(site, [0, 0])
                got[0] += 1
                got[1] += int(site in maps and len(maps[site]) > int(feat) and maps[site][int(feat)] >= 0)
            row["final_features_by_site"] = {site: v[0] for site, v in by_site.items()}
            row["final_features_matched_by_site"] = {site: v[1] for site, v in by_site.items()}
            row["jaccard_final"] = _num(jaccard(set(last_here), set(nodes[k])))
            row["edge_jaccard_final"] = _num(jaccard(set(translate_edges(edges[-1], maps)), set(edges[k])))
            row["weighted_jaccard_final"] = _num(weighted_jaccard(last_here, nodes[k]))
            if cfg is not None:  # the last circuit, carried to this checkpoint through matched features
                from sfcd.circuits.stage import faithfulness_of

                r = faithfulness_of(cfg, s, task, set(last_here))
                row["final_circuit_faithfulness"] = _num(r.get("faithfulness"))
                row["final_circuit_nodes_matched"] = len(last_here)
            rows.append(row)
        out[task] = rows
    return out


def analyse(
    run: RunDir,
    steps: list[int],
    site_names: list[str],
    tasks: list[str],
    threshold: float,
    seed_suffix: str | dict[int, str] | None,
    cfg=None,
) -> dict:
    """Everything of the development/ folder; CSV and JSON beside each other. ``seed_suffix``: per step, the
    suffix of the seed baseline's SAE name (``{1500: "@seed=1501"}``: ``<site>@seed=1501``); a plain suffix
    means the last step's only (no floor elsewhere, and then no changes beyond it)."""
    dev = run.root / "development"
    device = work_device(cfg.trainer) if cfg is not None else None
    suffixes = {steps[-1]: seed_suffix} if isinstance(seed_suffix, str) else dict(seed_suffix or {})
    by_activations = cfg is not None and check_match(cfg) == "activations"
    sites = {}
    for s in site_names:  # one site at a time: its signatures (every step, both seeds) are what memory holds
        seeds = {k: f"{s}{v}" for k, v in suffixes.items()}
        sig = site_signatures(cfg, run, steps, s, seeds, device) if by_activations else None
        min_fires = int(cfg.study.match_min_fires) if by_activations else MIN_FIRES
        sites[s] = site_development(run, steps, s, threshold, seeds, device, sig, min_fires)
        del sites[s]["features"], sig  # the signatures go with the site
    rows = []
    for s, d in sites.items():
        for k, step in enumerate(steps):
            m = read_json(sae_folder(run, step, s) / "metrics.json")
            ch = d["changes"][k - 1] if k > 0 else {}
            fl = d["floor"][k] or {}
            rows.append(
                {
                    "site": s,
                    "step": step,
                    "fve": m["fve"],
                    "l0": m["l0"],
                    "ce_loss_score": m.get("ce_loss_score"),
                    "dead_fraction": m["dead_fraction"],
                    "shared_with_final": d["shared_with_final"][k],
                    "seed_baseline": d["seed_baseline"],
                    "births": ch.get("births"),  # beyond the noise floor (None without both steps' seeds)
                    "deaths": ch.get("deaths"),
                    "splits": ch.get("splits"),
                    "merges": ch.get("merges"),
                    "shared_with_prev": ch.get("shared_fraction"),
                    **{f"{x}_raw": ch.get(f"{x}_raw") for x in ("births", "deaths", "splits", "merges")},
                    **{f"{x}_rule": ch.get(f"{x}_rule") for x in ("births", "deaths", "splits", "merges")},
                    **{
                        f"{x}_null{m}": ch.get(f"{x}_null{m}")
                        for x in ("births", "deaths", "splits", "merges")
                        for m in ("", "_max", "_hi")
                    },
                    **{f"floor_{x}{b}": fl.get(f"{x}{b}") for x in FLOOR_STATS for b in ("", "_lo", "_hi")},
                }
            )
    write_csv(dev / "sae_development.csv", rows, list(rows[0]))
    circuits = circuit_development(run, steps, tasks, sites, threshold, cfg) if tasks else {}
    crow = [{"task": t, **r} for t, rs in circuits.items() for r in rs]
    if crow:
        cols = list(dict.fromkeys(k for r in crow for k in r))
        write_csv(dev / "circuit_development.csv", crow, cols)
    objects = ("matchings", "seed_matching")  # kept in memory for the findings, not written
    lineage_json = {s: {k: v for k, v in d.items() if k not in objects} for s, d in sites.items()}
    result = {"steps": steps, "sites": lineage_json, "sae_rows": rows, "circuits": circuits}
    if circuits:
        ms = {s: d["matchings"] for s, d in sites.items()}
        thresholds = list(cfg.study.step_thresholds) if cfg is not None else None
        margin = cfg.study.step_margin if cfg is not None else None
        seeds = {s: d["seed_matching"] for s, d in sites.items() if d["seed_matching"] is not None}
        result["findings"] = collect(run, steps, circuits, ms, threshold, seeds, thresholds, margin)
        for line in summarise(result["findings"]):
            log.info("finding: %s", line)
    write_json(dev / "development.json", result)
    return result
