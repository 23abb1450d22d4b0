"""The ``study`` stage: every stage over the chosen checkpoints, then the development analysis and the report.

Each unit (the model, one checkpoint's SAEs, a dashboard, a circuit) is skipped when its outputs are complete
and writes them atomically, so a study killed at any moment and started again loses at most the unit in
progress. To fan independent checkpoints out over processes or a cluster, run the per-checkpoint stages as a
Hydra sweep first (``sfcd sae -m step=32,64,128 hydra/launcher=joblib``), then ``sfcd study`` to finish.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from sfcd.config import override as _at
from sfcd.errors import ConfigError, MissingArtifactError
from sfcd.io import write_json
from sfcd.models.loading import checkpoint, model_dtype, provenance, source_steps, warn_identical
from sfcd.models.train_log import study_steps
from sfcd.paths import RunDir

log = logging.getLogger(__name__)


def run_study(cfg: DictConfig) -> Path:
    from sfcd.circuits.stage import CIRCUIT_DTYPES, find_circuit
    from sfcd.development.analysis import analyse, check_match
    from sfcd.development.transcoders import graph_names, transcoder_development
    from sfcd.devices import work_device
    from sfcd.features.stage import build_features
    from sfcd.graphs.stage import build_graphs
    from sfcd.models.train import train_model
    from sfcd.report.html import render
    from sfcd.report.plots import by_site, circuits_plot, lineage_plot, training_curves
    from sfcd.sae.stage import train_saes

    s = cfg.study
    tasks = list(s.tasks)
    if not tasks:
        raise ConfigError("study.tasks is empty; name at least one task, e.g. study.tasks=[nounpp]")
    model_dtype(cfg.model.dtype, "circuit", CIRCUIT_DTYPES)  # the circuits' dtype, before hours of SAEs
    check_match(cfg)  # the development analysis's matching settings, likewise
    if cfg.model.source and not list(s.steps):
        raise ConfigError(
            "study.steps is empty and model.source is a loaded model without sfcd's train log to choose them "
            "from; name the checkpoints to study, e.g. study.steps=[64,128,1500]"
        )
    run = train_model(cfg) if not cfg.model.source else RunDir(cfg.run_dir)
    # a run's own checkpoints, or those of a checkpoint series folder (None: a hub id, whose revisions are
    # only known online, and a missing one fails when it loads)
    have = source_steps(cfg.model.source) if cfg.model.source else run.model_steps()
    missing = [x for x in s.steps if have is not None and x not in have]
    if missing:
        raise MissingArtifactError(
            f"study.steps {missing} are not checkpoints of {cfg.model.source or run.model}; the steps there are {have}"
        )
    steps_meta = study_steps(cfg, run)
    steps = steps_meta["steps"]
    # before any work: checkpoints with identical weights (Pythia's step0 and step1) named, one model at a time
    identical = warn_identical({step: provenance(checkpoint(cfg, step)[0]) for step in steps})
    sites = pair = None
    if cfg.sae.init not in ("random", "previous"):
        raise ConfigError(f"sae.init={cfg.sae.init!r}; expected random or previous")
    for k, step in enumerate(steps):
        # each checkpoint's SAE gets its own initialisation, so that shared features come from the data,
        # not from a shared init (or, with sae.init=previous, starts from the previous checkpoint's SAE);
        # the seed baseline is a second SAE at every step (another init seed and another stream seed, so that
        # the two seeds of one checkpoint differ in what two steps' SAEs differ in besides the model): the noise
        # floor of the development analysis
        warm = (
            {"sae.init_from": str(run.root / "saes" / f"step{steps[k - 1]}")}
            if cfg.sae.init == "previous" and k
            else {}
        )
        tcs = {"sae.transcoders": ["mlp"]} if s.transcoders else {}  # trained from the SAEs' stream
        if s.transcoders and warm:
            tcs["sae.transcoder.init_from"] = str(run.transcoders(steps[k - 1]))
        folders = train_saes(_at(cfg, step=step, **{"sae.seed": cfg.sae.seed + step}, **warm, **tcs))
        sites = [f.name for f in folders if f.parent.parent.name == "saes"]
        if s.seed_baseline:  # a randomly initialised second seed, also with sae.init=previous
            # (its decoders and live features are what the floor reads: no CE scores, which cost most of its time)
            second = {"sae.sweep": {"seed": [cfg.sae.seed + step + 1]}, "sae.init_from": None, "sae.ce_tokens": 0}
            train_saes(_at(cfg, step=step, **second))
        if s.features_at == "all" or step == steps[-1]:
            build_features(_at(cfg, step=step, **{"features.saes": sites, "features.transcoders": s.transcoders}))
        for task in tasks:
            if not (run.root / "circuits" / task / f"step{step}" / "circuit.json").exists():
                find_circuit(_at(cfg, step=step, **{"circuit.task": task, "circuit.baselines": step == steps[-1]}))
        if s.transcoders:
            pair = pair or _graph_pair(cfg, run, tasks)
            for name, prompt in zip(graph_names(pair), (pair["clean"], pair["patch"]), strict=True):
                if not (run.root / "graphs" / name / f"step{step}" / "graph.json").exists():
                    build_graphs(_at(cfg, step=step, **{"graph.prompt": prompt, "graph.name": name}))
    seed_suffix = {step: f"@seed={cfg.sae.seed + step + 1}" for step in steps} if s.seed_baseline else None
    dev = analyse(run, steps, sites, tasks, s.shared_threshold, seed_suffix, cfg)
    dev["study_steps"] = steps_meta
    dev["identical_checkpoints"] = identical
    if s.transcoders:
        dev["transcoders"] = transcoder_development(cfg, run, steps, pair, work_device(cfg.trainer))
    write_json(run.root / "development" / "development.json", dev)
    d = run.root / "development"
    plots = {
        "fve": by_site(dev["sae_rows"], "fve", d / "sae_fve.png", "FVE"),
        "ce": by_site(dev["sae_rows"], "ce_loss_score", d / "sae_ce_score.png", "CE loss score"),
        "shared": by_site(
            dev["sae_rows"],
            "shared_with_final",
            d / "shared_with_final.png",
            "shared with the last SAE",
            "seed_baseline",
        ),
        "lineage": lineage_plot(dev["sites"], d / "lineage.png"),
    }
    if run.train_log.exists():  # sfcd's own model; a loaded one (Pythia, model.source) has no train log here
        plots["training"] = training_curves(run.train_log, steps, d / "training.png")
    if dev["circuits"]:
        plots["circuits"] = circuits_plot(dev["circuits"], d / "circuits.png")
    if s.crosscoder:
        from sfcd.crosscoders.stage import train_crosscoders
        from sfcd.development.crosscoders import crosscoder_development
        from sfcd.report.plots import crosscoder_circuits_plot

        cc_steps = list(cfg.crosscoder.steps) or steps
        cc_cfg = _at(cfg, **{"crosscoder.steps": cc_steps})
        folders = train_crosscoders(cc_cfg)
        cc_dev = crosscoder_development(cc_cfg, run, cc_steps, [f.name for f in folders], tasks, dev["circuits"])
        dev["crosscoder"] = cc_dev
        if dev.get("findings"):
            from sfcd.development.findings import add_crosscoder

            add_crosscoder(dev["findings"], cc_dev)
            write_json(run.root / "development" / "development.json", dev)
        if cc_dev["circuits"]:
            plots["crosscoder_circuits"] = crosscoder_circuits_plot(cc_dev["circuits"], d / "crosscoder_circuits.png")
        plots |= {f"crosscoder_latents:{f.name}": f / "latents.png" for f in folders}
    links = {
        "Feature dashboards": sorted((run.root / "features").glob("step*/*/index.html")),
        "Circuit pictures": sorted((run.root / "circuits").glob("*/step*/circuit.svg")),
    }
    page = render(run.root, f"sfcd study: {cfg.name}", plots, dev, links)
    log.info("report: %s", page)
    return page


def _graph_pair(cfg: DictConfig, run: RunDir, tasks: list[str]) -> dict:
    """The agreement pair the study graphs: ``study.graph_pair`` of ``study.graph_task`` (default: the first
    task)."""
    from sfcd.development.transcoders import agreement_pair

    task = cfg.study.graph_task or tasks[0]
    tokenizer = checkpoint(cfg, None)[1]  # the graphs' tokenizer
    return agreement_pair(run, task, tokenizer, int(cfg.study.graph_pair))
