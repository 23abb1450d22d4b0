"""A fabricated study at the real target's shape, for the report's tests and benchmark: pythia-70m-deduped's
19 sites (embed, attn/mlp/resid of 6 layers) x K checkpoints, circuits of the paper's tasks, crosscoders at
the 6 resid sites. Writes what the development analysis, the crosscoder development, the circuit and feature
stages write (same file names, columns and JSON keys), then makes the report's plots exactly as
``sfcd.study.run_study`` does. Every number is planted from a seeded generator and returned, so a test can
compare what the report shows with what went in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfcd.io import write_csv, write_json, write_text

PYTHIA_STEPS = [0, 16, 64, 256, 512, 1000, 2000, 4000, 8000, 16000, 33000, 66000, 100000, 143000]
TASKS = ("simple", "nounpp", "rc", "within_rc")
SAE_COLUMNS = [
    "site",
    "step",
    "fve",
    "l0",
    "ce_loss_score",
    "dead_fraction",
    "shared_with_final",
    "seed_baseline",
    "births",
    "deaths",
    "splits",
    "merges",
    "shared_with_prev",
]


def pythia_sites(n_layers: int = 6) -> list[str]:
    """The 19 sites in forward order."""
    return ["embed"] + [f"{k}.{layer}" for layer in range(n_layers) for k in ("attn", "mlp", "resid")]


def study_steps(k: int) -> list[int]:
    """K Pythia checkpoints, spread over training (log-spaced beyond the named list)."""
    if k <= len(PYTHIA_STEPS):
        idx = np.unique(np.round(np.linspace(0, len(PYTHIA_STEPS) - 1, k)).astype(int))
        return [PYTHIA_STEPS[i] for i in idx]
    return sorted({0, *np.unique(np.geomspace(16, 143000, k - 1).astype(int)).tolist()})


def fabricate(
    root: Path,
    k: int = 10,
    sites: list[str] | None = None,
    tasks: tuple[str, ...] = TASKS,
    crosscoder: bool = True,
    d_sae: int = 32768,
    circuit_nodes: int = 120,
    seed: int = 0,
    draw: bool = True,
) -> tuple[dict, dict[str, Path], dict[str, list[Path]]]:
    """Write a study's outputs under ``root``; return ``(dev, plots, links)`` as ``run_study`` passes them to
    ``render``. ``dev["sae_rows"]`` are the planted per-site numbers. ``sites`` are given in a shuffled order
    (as a dict's insertion order might be), so the report has to put them in layer order itself. With
    ``draw=False`` the pictures are noise PNGs of the real ones' pixel sizes (fast, no matplotlib): the
    plots 1440 x 400, the circuit pictures 1330 x 2160."""
    if draw:
        from sfcd.report.plots import by_site, circuits_plot, crosscoder_circuits_plot, lineage_plot, training_curves
    else:
        by_site = circuits_plot = crosscoder_circuits_plot = lineage_plot = training_curves = _noise_plot

    rng = np.random.default_rng(seed)
    sites = list(sites or pythia_sites())
    order = rng.permutation(len(sites))
    shuffled = [sites[i] for i in order]
    steps = study_steps(k)
    dev_dir = root / "development"

    # development/sae_development.csv + development.json, as analysis.analyse writes them
    site_json, rows = {}, []
    for s in shuffled:
        live = [int(d_sae * (1 - rng.uniform(0.02, 0.4))) for _ in steps]
        counts = rng.multinomial(live[-1], rng.dirichlet(np.ones(len(steps))))
        changes = []
        for st in steps[1:]:
            changes.append(
                {
                    "step": st,
                    "births": int(rng.integers(0, 4000)),
                    "deaths": int(rng.integers(0, 4000)),
                    "splits": int(rng.integers(0, 300)),
                    "merges": int(rng.integers(0, 300)),
                    "shared_fraction": float(rng.uniform(0.2, 0.95)),
                    "mmcs": float(rng.uniform(0.4, 0.9)),
                }
            )
        shared = [float(rng.uniform(0.05, 0.9)) for _ in steps[:-1]] + [1.0]
        seed_base = float(rng.uniform(0.5, 0.9))
        site_json[s] = {
            "site": s,
            "steps": steps,
            "changes": changes,
            "first_step_counts": {int(st): int(c) for st, c in zip(steps, counts, strict=True)},
            "persisted_fraction": float(rng.uniform(0, 1)),
            "live_features": live,
            "shared_with_final": shared,
            "seed_baseline": seed_base,
        }
        for j, st in enumerate(steps):
            ch = changes[j - 1] if j > 0 else {}
            rows.append(
                {
                    "site": s,
                    "step": st,
                    "fve": float(rng.uniform(0.3, 0.99)),
                    "l0": float(rng.uniform(10, 200)),
                    "ce_loss_score": float(rng.uniform(-0.2, 1.0)),
                    "dead_fraction": float(rng.uniform(0, 0.4)),
                    "shared_with_final": shared[j],
                    "seed_baseline": seed_base,
                    "births": ch.get("births"),
                    "deaths": ch.get("deaths"),
                    "splits": ch.get("splits"),
                    "merges": ch.get("merges"),
                    "shared_with_prev": ch.get("shared_fraction"),
                }
            )
    write_csv(dev_dir / "sae_development.csv", rows, SAE_COLUMNS)

    circuits = {}
    for t in tasks:
        crows = []
        for j, st in enumerate(steps):
            r = {
                "step": st,
                "n_nodes": int(rng.integers(20, 400)),
                "faithfulness": float(rng.uniform(0, 1)),
                "F_M": float(rng.uniform(0, 5)),
            }
            if j > 0:
                r |= {
                    "jaccard_prev": float(rng.uniform(0, 1)),
                    "edge_jaccard_prev": float(rng.uniform(0, 1)),
                    "weighted_jaccard_prev": float(rng.uniform(0, 1)),
                }
            r |= {
                "final_features_by_site": {s: 5 for s in sites},
                "final_features_matched_by_site": {s: int(rng.integers(0, 6)) for s in sites},
                "jaccard_final": float(rng.uniform(0, 1)),
                "edge_jaccard_final": float(rng.uniform(0, 1)),
                "weighted_jaccard_final": float(rng.uniform(0, 1)),
                "final_circuit_faithfulness": float(rng.uniform(0, 1)),
                "final_circuit_nodes_matched": int(rng.integers(0, 100)),
            }
            crows.append(r)
        circuits[t] = crows
    crow = [{"task": t, **r} for t, rs in circuits.items() for r in rs]
    if crow:
        write_csv(dev_dir / "circuit_development.csv", crow, list(dict.fromkeys(c for r in crow for c in r)))
    dev = {"steps": steps, "sites": site_json, "sae_rows": rows, "circuits": circuits}
    write_json(dev_dir / "development.json", dev)
    meta = {"steps": steps, "source": "study.steps"}
    write_json(dev_dir / "study_steps.json", meta)
    dev["study_steps"] = meta

    # model/train_log.csv over every checkpoint up to the last studied one
    log_steps = sorted({*steps, *[s for s in PYTHIA_STEPS if s <= steps[-1]]})
    log = []
    for i, st in enumerate(log_steps):
        x = i / max(1, len(log_steps) - 1)
        r = {"step": st, "tokens": st * 2_097_152, "train_loss": 10 - 7 * x, "heldout_loss": 10.1 - 7 * x}
        r["induction_score"] = x
        for t in tasks:
            r[f"{t}_accuracy"] = min(1.0, 0.5 + x * rng.uniform(0.4, 0.6))
            r[f"{t}_logit_diff"] = 3 * x
        log.append(r)
    train_log = root / "model" / "train_log.csv"
    write_csv(train_log, log, list(log[0]))

    # the last step's circuit pictures (the circuit stage's own drawing) and dashboards
    links: dict[str, list[Path]] = {"Feature dashboards": [], "Circuit pictures": []}
    for t in tasks:
        for st in steps:
            folder = root / "circuits" / t / f"step{st}"
            if st == steps[-1] and draw:
                from sfcd.circuits.picture import draw_circuit

                draw_circuit(_circuit(rng, t, st, sites, circuit_nodes), folder / "circuit", 0.0)
                write_text(folder / "circuit.html", "<!DOCTYPE html><title>circuit</title>")
            elif st == steps[-1]:
                _noise_png(folder / "circuit.png", 1330, 2160, seed)
                write_text(folder / "circuit.svg", "<svg xmlns='http://www.w3.org/2000/svg'/>")
                write_text(folder / "circuit.html", "<!DOCTYPE html><title>circuit</title>")
                write_text(folder / "circuit.html", "<!DOCTYPE html><title>circuit</title>")
            else:
                write_text(folder / "circuit.svg", "<svg xmlns='http://www.w3.org/2000/svg'/>")
            links["Circuit pictures"].append(folder / "circuit.svg")
    for s in sites:
        page = root / "features" / f"step{steps[-1]}" / s / "index.html"
        write_text(page, "<!DOCTYPE html><title>dashboard</title>")
        links["Feature dashboards"].append(page)
    links = {h: sorted(p) for h, p in links.items()}

    # the plots, exactly as run_study makes them
    plots = {
        "training": training_curves(train_log, steps, dev_dir / "training.png"),
        "fve": by_site(rows, "fve", dev_dir / "sae_fve.png", "FVE"),
        "ce": by_site(rows, "ce_loss_score", dev_dir / "sae_ce_score.png", "CE loss score"),
        "shared": by_site(
            rows, "shared_with_final", dev_dir / "shared_with_final.png", "shared with the last SAE", "seed_baseline"
        ),
        "lineage": lineage_plot(site_json, dev_dir / "lineage.png"),
    }
    if circuits:
        plots["circuits"] = circuits_plot(circuits, dev_dir / "circuits.png")
    if crosscoder:
        cc = _crosscoder(root, rng, steps, [s for s in sites if s.startswith("resid.")], tasks, draw)
        dev["crosscoder"] = cc
        if cc["circuits"]:
            plots["crosscoder_circuits"] = crosscoder_circuits_plot(cc["circuits"], dev_dir / "crosscoder_circuits.png")
        plots |= {f"crosscoder_latents:{s}": root / "crosscoders" / s / "latents.png" for s in cc["sites"]}
    return dev, plots, links


def _circuit(rng, task: str, step: int, sites: list[str], n: int) -> dict:
    """A circuit.json-like dict: ``n`` feature nodes over the sites plus an error node per site, ~2n edges."""
    nodes = []
    for _ in range(n):
        s = sites[int(rng.integers(0, len(sites)))]
        f = int(rng.integers(0, 32768))
        nodes.append({"id": f"{s}/{f}", "site": s, "feature": f, "effect": float(rng.normal()), "label": "tok"})
    nodes = list({nd["id"]: nd for nd in nodes}.values())
    nodes += [{"id": f"{s}/eps", "site": s, "feature": None, "effect": float(rng.normal())} for s in sites]
    ids = [nd["id"] for nd in nodes]
    edges = [
        {"from": ids[int(a)], "to": ids[int(b)], "weight": float(rng.normal())}
        for a, b in rng.integers(0, len(ids), size=(2 * n, 2))
        if a != b
    ]
    return {
        "sites": sites,
        "nodes": nodes,
        "edges": edges,
        "metadata": {"task": task, "step": step, "faithfulness": float(rng.uniform(0, 1))},
    }


def _noise_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A PNG of ``width`` x ``height`` pixels: white with random coloured lines (compresses like a plot)."""
    from PIL import Image, ImageDraw

    from sfcd.io import atomic_path

    g = np.random.default_rng(seed)
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    for _ in range(60):
        x0, x1 = g.integers(0, width, 2)
        y0, y1 = g.integers(0, height, 2)
        d.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=tuple(int(c) for c in g.integers(0, 256, 3)), width=2)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path


def _noise_plot(*args) -> Path:
    """Stands in for any of the report's plot functions: their last path argument is the output (1440 x 400)."""
    path = [a for a in args if isinstance(a, Path)][-1]
    return _noise_png(path, 1440, 400, len(str(path)))


def _crosscoder(root: Path, rng, steps: list[int], sites: list[str], tasks: tuple[str, ...], draw: bool = True) -> dict:
    """crosscoders/<site>/latents.json + latents.png and crosscoders/development.json, as the crosscoder stage
    and its development write them."""
    K, m = len(steps), 4096
    out = {"steps": steps, "sites": {}, "circuits": {}}
    for s in sites:
        per = [
            {
                "step": st,
                "present": float(rng.uniform(0, 1)),
                "exclusive": float(rng.uniform(0, 0.2)),
                "emerged_here": float(rng.uniform(0, 0.2)),
                "died_here": float(rng.uniform(0, 0.1)),
                "absent_but_scaled": float(rng.uniform(0, 0.05)),
                "fve": float(rng.uniform(0.5, 0.95)),
                "fve_alone": float(rng.uniform(0.3, 0.9)),
                "ce_loss_score": float(rng.uniform(0.5, 1.0)),
            }
            for st in steps
        ]
        latents = {
            "site": s,
            "steps": steps,
            "presence": 0.3,
            "emerged_at": {str(st): int(rng.integers(0, 3000)) for st in steps},
            "n_live": int(rng.integers(20000, 32768)),
            "shared_by_all": float(rng.uniform(0, 0.5)),
            "persist": float(rng.uniform(0, 1)),
            "die": float(rng.uniform(0, 0.3)),
            "flagged_by_latent_scaling": float(rng.uniform(0, 0.1)),
            "per_checkpoint": per,
        }
        folder = root / "crosscoders" / s
        write_json(folder / "latents.json", latents)
        if draw:
            import torch

            from sfcd.report.plots import crosscoder_latents_plot

            rel = torch.from_numpy(rng.dirichlet(np.ones(K), size=m).astype(np.float32))
            crosscoder_latents_plot(latents, {"rel": rel}, torch.ones(m, dtype=torch.bool), folder / "latents.png")
        else:
            _noise_png(folder / "latents.png", 990, 306, len(s))
        out["sites"][s] = latents
    for t in tasks:
        rows = [
            {
                "step": st,
                "latents": 40,
                "share_present": float(rng.uniform(0, 1)),
                "share_emerged_by_now": float(rng.uniform(0, 1)),
                "mean_rel_ie": float(rng.uniform(0, 1 / K * 2)),
                "final_circuit_faithfulness": float(rng.uniform(0, 1)),
                "share_matched_saes": float(rng.uniform(0, 1)),
            }
            for st in steps
        ]
        out["circuits"][t] = {
            "rows": rows,
            "latents": [f"{sites[0]}/{i}" for i in range(40)],
            "emerged_at": {str(st): 4 for st in steps},
            "rel_ie": rng.uniform(0, 1, size=(40, K)).round(4).tolist(),
        }
    flat = [{"task": t, **r} for t, v in out["circuits"].items() for r in v["rows"]]
    if flat:
        write_csv(root / "crosscoders" / "circuit_development.csv", flat, list(flat[0]))
    write_json(root / "crosscoders" / "development.json", out)
    return out
