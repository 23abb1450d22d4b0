"""A planted developmental ground truth through the real stages: does the study date a construction that enters
training at step S to the first studied checkpoint after S, and find no emergence for a control present throughout?

Trains the tiny model on the built-in corpus with ``corpus.planted.step=S`` (sfcd/data/planted.py: its own nouns
and verbs, absent from every batch before S; a control construction of the same kind from step 0), runs
``sfcd study`` (model, SAEs at every site, dashboards, the ``planted`` and ``control`` circuits, crosscoders at the
resid sites and their circuits, development), then scores three methods (sfcd/development/groundtruth.py):

(a) SAEs: at each studied step and site, the features whose activation is concentrated on the construction's own
    words (precision >= 0.5 of their activation mass, recall >= 0.05 of its positions); their onset (the first
    studied step from which the site has one at every later step), and whether those at the first step after S
    are born there (no feature of the step before matched to them at decoder cosine >= study.shared_threshold,
    with the development analysis's own matching, ``match_live``).
(b) crosscoders: the latents concentrated on the construction's words (encoded from the K checkpoints'
    activations of the same held-out tokens) and their emergence block in ``latents.safetensors``.
(c) circuits: per studied step, F(M) - F(empty), the circuit stage's ``resolvable``, the train log's accuracy, and
    the nodes for faithfulness 0.8; the circuit is there when it is resolvable, F(M) - F(empty) >= 1 logit and a
    0.8-faithful circuit exists; its onset is the first studied step from which it is there.

Each figure is one JSON line. ``--quick``: a shorter training and smaller SAE/crosscoder budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESOLVABLE = 1.0  # F(M) - F(empty) in logits below which the model does not do the task (no circuit to date)


def emit(**kv) -> None:
    print(json.dumps(kv), flush=True)


def settings(quick: bool, smoke: bool = False) -> tuple[int, list[int], list[str]]:
    if smoke:  # the test profile's micro model: checks every stage and the scoring end to end, dates nothing
        S, steps = 12, [12, 24, 36]
        extra = [
            "experiment=test",
            "train.steps=36",
            "train.lr=0.01",
            "train.checkpoints.log_until=0",
            "train.checkpoints.every=12",
            "train.eval_pairs=8",
            "corpus.planted.weight=0.5",
            "corpus.planted.control_weight=0.5",
        ]
    elif quick:
        S, steps = 260, [128, 256, 384]
        extra = [
            "train.steps=384",
            "train.checkpoints.log_until=0",  # checkpoints every 64 steps only: each one is scored on 14 tasks
            "train.checkpoints.every=64",
            "train.eval_pairs=64",
            "corpus.n_tokens=1000000",
            "sae.n_tokens=131072",
            "crosscoder.n_tokens=65536",
            "features.n_tokens=16384",
            "circuit.n_examples=50",
        ]
    else:
        S, steps = 260, [128, 256, 384, 600]
        extra = ["train.steps=600", "train.checkpoints.extra=[384,600]"]
    return S, steps, extra


def score_saes(cfg, run, steps, S, windows, kinds, sites):
    import sfcd
    from sfcd.development import groundtruth as G
    from sfcd.development.findings import first_steps
    from sfcd.development.saes import match_live, sae_folder

    after = G.first_after(steps, S)
    thr = cfg.study.shared_threshold
    found = {}  # (site, step) -> {kind: summary}
    for step in steps:
        model = sfcd.load_model(cfg.run_dir, step=step)
        for site in sites:
            sae = sfcd.load_sae(sae_folder(run, step, site))
            c = G.concentration(sae.encode, G.stream([model], site, windows, (0, 1)), kinds)
            found[site, step] = {k: c.summary(k) for k in kinds}
    right = right_lineage = 0
    for site in sites:
        present = {k: [found[site, s][k]["n_features"] > 0 for s in steps] for k in kinds}
        onsets = {k: G.onset(steps, present[k]) for k in kinds}
        # the development analysis's matching between consecutive studied steps (later as A)
        ms = [
            match_live(sae_folder(run, b, site), sae_folder(run, a, site))
            for a, b in zip(steps, steps[1:], strict=False)
        ]
        lineage = {}
        for k in kinds:
            starts = first_steps(steps, ms, list(found[site, steps[-1]][k]["features"]), thr)
            lineage[k] = {str(s): starts.count(s) for s in steps if starts.count(s)}
        ok = onsets["planted"] == after and onsets["control"] is not None and onsets["control"] < after
        last_p = found[site, steps[-1]]["planted"]["features"]
        lin_p = first_steps(steps, ms, list(last_p), thr)
        lin_c = first_steps(steps, ms, list(found[site, steps[-1]]["control"]["features"]), thr)
        ok_lin = bool(lin_p) and all(s >= after for s in lin_p) and any(s == after for s in lin_p)
        ok_lin = ok_lin and bool(lin_c) and not any(s == after for s in lin_c)
        right += ok
        right_lineage += ok_lin
        emit(
            figure="sae_dating",
            site=site,
            planted_step=S,
            first_after=after,
            planted_onset=onsets["planted"],
            control_onset=onsets["control"],
            planted_features_per_step={s: found[site, s]["planted"]["n_features"] for s in steps},
            control_features_per_step={s: found[site, s]["control"]["n_features"] for s in steps},
            planted_token_features_per_step={s: found[site, s]["planted"]["token_features"] for s in steps},
            planted_best={
                s: {x: found[site, s]["planted"][f"best_{x}"] for x in ("precision", "recall", "words")} for s in steps
            },
            lineage_start_of_last_features=lineage,
            correct_onset=bool(ok),
            correct_lineage=bool(ok_lin),
        )
    emit(figure="sae_dating_sites_correct", onset=right, lineage=right_lineage, of=len(sites))


def score_crosscoders(cfg, run, steps, S, windows, kinds):
    import numpy as np
    from safetensors.torch import load_file

    import sfcd
    from sfcd.development import groundtruth as G

    after = G.first_after(steps, S)
    root = Path(cfg.run_dir) / "crosscoders"
    for folder in sorted(p for p in root.iterdir() if (p / "latents.safetensors").exists()):
        cc = sfcd.load_crosscoder(folder)
        cc_steps = list(cc.cfg["steps"])
        models = [sfcd.load_model(cfg.run_dir, step=s) for s in cc_steps]
        c = G.concentration(cc.encode, G.stream(models, folder.name, windows, (0, 1)), kinds)
        lat = load_file(str(folder / "latents.safetensors"))
        emerged = lat["emerged"].numpy()
        out = {}
        for k in kinds:
            feats = c.features(k)
            e = [int(emerged[f]) for f in feats]
            onset_steps = [cc_steps[i] if i >= 0 else None for i in e]
            out[k] = {
                "latents": len(feats),
                "onsets": {str(s): onset_steps.count(s) for s in [*cc_steps, None]},
                "at_first_after": float(np.mean([s == after for s in onset_steps])) if feats else None,
                "before_S": float(np.mean([s is not None and s < after for s in onset_steps])) if feats else None,
            }
        ok = bool(out["planted"]["latents"]) and out["planted"]["at_first_after"] >= 0.5
        ok = ok and bool(out["control"]["latents"]) and (out["control"]["at_first_after"] or 0) == 0
        emit(figure="crosscoder_dating", site=folder.name, planted_step=S, first_after=after, **out, correct=ok)


def score_circuits(cfg, run, steps, S, log):
    from sfcd.development import groundtruth as G
    from sfcd.io import read_json

    after = G.first_after(steps, S)
    for where, root in (("sae", run.root / "circuits"), ("crosscoder", run.root / "crosscoders" / "circuits")):
        for task in ("planted", "control"):
            rows = []
            for step in steps:
                p = root / task / f"step{step}" / "circuit.json"
                if not p.exists():
                    rows.append({"step": step, "missing": True})
                    continue
                md = read_json(p)["metadata"]
                gap = (md.get("F_M") or 0.0) - (md.get("F_empty") or 0.0)
                nodes = (md.get("nodes_for_faithfulness_0.8") or {}).get("features") or {}
                rows.append(
                    {
                        "step": step,
                        "accuracy": log.get((step, task)),
                        "F_M_minus_F_empty": round(gap, 3),
                        "resolvable": md.get("resolvable"),  # the circuit stage's own (statistical) rule
                        # the circuit is there: resolvable, a margin of >= 1 logit, and a 0.8-faithful circuit
                        "present": bool(md.get("resolvable", True) and gap >= RESOLVABLE and nodes.get("n_nodes")),
                        "faithfulness": md.get("faithfulness"),
                        "nodes_for_0.8": nodes.get("n_nodes"),
                    }
                )
            onset = G.onset(steps, [r.get("present", False) for r in rows])
            ok = onset == after if task == "planted" else (onset is not None and onset < after)
            emit(
                figure="circuit_dating",
                dictionaries=where,
                task=task,
                planted_step=S,
                first_after=after,
                onset=onset,
                per_step=rows,
                correct=bool(ok),
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a shorter training and smaller budgets")
    ap.add_argument("--run-dir", default=None, help="where the study is written (default /tmp/sfcd_planted[_quick])")
    ap.add_argument("--smoke", action="store_true", help="the test profile's micro model: every stage, in minutes")
    ap.add_argument("--score-only", action="store_true", help="score an existing study of --run-dir")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import csv

    from sfcd.config import compose
    from sfcd.data.tokens import read_tokens
    from sfcd.development import groundtruth as G
    from sfcd.paths import RunDir
    from sfcd.study import run_study

    S, steps, extra = settings(args.quick, args.smoke)
    run_dir = args.run_dir or f"/tmp/sfcd_planted{'_smoke' if args.smoke else '_quick' if args.quick else ''}"
    overrides = [
        "experiment=demo",
        f"run_dir={run_dir}",
        f"corpus.planted.step={S}",
        f"study.steps=[{','.join(map(str, steps))}]",
        "study.tasks=[planted,control]",
        "study.crosscoder=true",
        *extra,
    ]
    cfg = compose(overrides)
    t0 = time.perf_counter()
    if not args.score_only:
        run_study(cfg)
        emit(figure="study_seconds", seconds=round(time.perf_counter() - t0, 1), quick=args.quick, overrides=overrides)
    run = RunDir(run_dir)
    meta = G.planted_meta(run)
    kinds = meta["token_ids"]
    log = {}
    with open(run.train_log) as f:
        for r in csv.DictReader(f):
            for task in ("planted", "control"):
                log[int(r["step"]), task] = round(float(r[f"{task}_accuracy"]), 3)
    emit(
        figure="train_log_accuracy",
        planted_step=S,
        planted={s: a for (s, t), a in sorted(log.items()) if t == "planted"},
        control={s: a for (s, t), a in sorted(log.items()) if t == "control"},
    )
    windows = G.held_out_windows(read_tokens(run.tokens("val")), cfg.model.seq_len, cfg.corpus.val_tokens)
    t1 = time.perf_counter()
    import sfcd
    from sfcd.models.sites import expand_sites

    sites = [s.name for s in expand_sites(["all"], sfcd.load_model(run_dir, step=steps[-1]))]
    score_saes(cfg, run, steps, S, windows, kinds, sites)
    score_crosscoders(cfg, run, steps, S, windows, kinds)
    score_circuits(cfg, run, steps, S, log)
    emit(figure="scoring_seconds", seconds=round(time.perf_counter() - t1, 1))


if __name__ == "__main__":
    main()
