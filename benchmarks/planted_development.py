"""A planted developmental ground truth through the real stages: does the study date a construction that enters
training at step S to the first studied checkpoint after S, and find no emergence for a control present throughout?

Trains the tiny model on the built-in corpus with ``corpus.planted.step=S`` (sfcd/data/planted.py: its own nouns
and verbs, absent from every batch before S; a control construction of the same kind from step 0), runs
``sfcd study`` with the studied steps chosen by the study itself from the train log over the two tasks (before
either is learned, where each is learned, the last checkpoint), then scores three methods
(sfcd/development/groundtruth.py; a feature or latent is the construction's when it is concentrated on several of
its words, follows their classes and the words share a direction in the model there):

(a) SAEs, the study's own and wider ones (256 latents, k = 8, trained by the SAE stage as a one-point sweep at
    every site and studied step): per site, the onset of the construction's features (the first studied step from
    which the site has one at every later step), and their lineage through the development analysis's matching
    (``match_live``, ``first_steps``: the earliest studied step their chain of matches reaches).
(b) crosscoders, read one checkpoint at a time (``alone_view``: checkpoint m's own activations through m's encoder
    block, the other checkpoints at their mean): the onset of the construction's latents; beside it the
    crosscoder's own decoder-norm emergence of the last checkpoint's construction latents, which dates them to the
    first checkpoint (their decoder there holds the words' untrained embeddings: token identity).
(c) circuits, on SAEs and on crosscoders: per studied step, F(M) - F(empty), the circuit stage's ``resolvable``,
    the train log's accuracy, and the nodes for faithfulness 0.8; the circuit is there when it is resolvable,
    F(M) - F(empty) >= 1 logit and a 0.8-faithful circuit exists; its onset is the first studied step from which
    it is there.

The control is right when none of its readings begins at or after the first studied step after S. Each figure is
one JSON line. ``--quick``: smaller SAE, crosscoder and circuit budgets; ``--smoke``: the test profile's micro
model, every stage and the scoring end to end (it dates nothing).
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


#: the model and corpus of the default and quick profiles. The construction's share (0.3 of the mixture, the
#: control's too) is what lets the model learn it within ~128 steps of S at this learning rate: at 0.1 it took
#: 124-240 steps (S = 260, 600 steps), so no studied checkpoint fell between S and the behaviour. The control is
#: learned by step 192, well before S.
PLANTED = [
    "train.steps=640",
    "train.checkpoints.extra=[192,320,384,448,576,640]",
    "corpus.planted.weight=0.3",
    "corpus.planted.control_weight=0.3",
]


#: beside the study's own SAEs (the demo's: 32-96 latents, k = 3-6, chosen for CE loss score and seed agreement),
#: wider ones at every site and studied step, trained by the SAE stage as a one-point sweep (folders
#: ``<site>@d_sae=256,k=8``, seeded as the study seeds its SAEs): the construction is a small share of the tokens,
#: and a dictionary of a few dozen latents may spend none on it.
WIDE = {"d_sae": 256, "k": 8}


def settings(quick: bool, smoke: bool = False) -> tuple[int, list[int] | None, list[str]]:
    """(S, the studied steps or None for the study's own choice from the train log, overrides)."""
    if smoke:  # the test profile's micro model: checks every stage and the scoring end to end, dates nothing
        return (
            12,
            [12, 24, 36],
            [
                "experiment=test",
                "train.steps=36",
                "train.lr=0.01",
                "train.checkpoints.log_until=0",
                "train.checkpoints.every=12",
                "train.eval_pairs=8",
                "corpus.planted.weight=0.5",
                "corpus.planted.control_weight=0.5",
            ],
        )
    # the studied steps are the study's own choice (sfcd.models.train_log.choose_steps) over the two tasks:
    # before either is learned, where each is learned, and the last checkpoint
    extra = [*PLANTED, "study.step_tasks=[planted,control]", "study.max_steps=4"]
    if quick:
        extra += [
            "sae.n_tokens=131072",
            "crosscoder.n_tokens=65536",
            "crosscoder.scaling_tokens=65536",
            "features.n_tokens=16384",
            "circuit.n_examples=50",
        ]
    return 256, None, extra


def train_wide_saes(cfg, overrides: list[str], steps: list[int]) -> str:
    """The WIDE SAEs at every site of every studied step, each from its own random initialisation as the study's
    are (the SAE stage skips those already trained); returns their name suffix. Warm-starting each from the
    previous studied step's instead (``sae.init_from``) was measured too: matching then carries the construction's
    features back to latents that held its words before S (7 of 8 at resid.0), so it dates nothing either."""
    from sfcd.config import compose
    from sfcd.sae.stage import train_saes

    for step in steps:
        c = compose([*overrides, f"step={step}", f"sae.seed={cfg.sae.seed + step}", "sae.ce_tokens=0"])
        c.sae.sweep = {key: [v] for key, v in WIDE.items()}  # a one-point grid: the folders get its suffix
        train_saes(c)
    return "@" + ",".join(f"{key}={v}" for key, v in sorted(WIDE.items()))


def score_saes(cfg, run, steps, S, windows, kinds, sites, suffix: str = ""):
    """SAE features (``<site><suffix>`` at every studied step): the construction's, their onset, and their lineage
    by the development analysis's matching."""
    import sfcd
    from sfcd.development import groundtruth as G
    from sfcd.development.analysis import site_development
    from sfcd.development.findings import first_steps
    from sfcd.development.saes import match_live, sae_folder

    after = G.first_after(steps, S)
    thr = cfg.study.shared_threshold
    classes = G.planted_classes(kinds)
    found = {}  # (site, step) -> {kind: summary}
    for step in steps:
        model = sfcd.load_model(cfg.run_dir, step=step)
        for site in sites:
            sae = sfcd.load_sae(sae_folder(run, step, site + suffix))
            c = G.concentration(sae.encode, G.stream([model], site, windows, (0, 1)), kinds, classes)
            found[site, step] = {k: c.summary(k) for k in kinds}
    right = right_lineage = readings = control_emerging = right_born = 0
    for site in sites:
        present = {k: [found[site, s][k]["n_features"] > 0 for s in steps] for k in kinds}
        onsets = {k: G.onset(steps, present[k]) for k in kinds}
        # the development analysis's matching between consecutive studied steps (later as A)
        ms = [
            match_live(sae_folder(run, b, site + suffix), sae_folder(run, a, site + suffix))
            for a, b in zip(steps, steps[1:], strict=False)
        ]
        starts = {k: first_steps(steps, ms, list(found[site, steps[-1]][k]["features"]), thr) for k in kinds}
        lineage = {k: {str(s): v.count(s) for s in steps if v.count(s)} for k, v in starts.items()}
        # a site reads the construction when its last SAE has features of it; it dates it right when they appear
        # at the first studied checkpoint after S and stay (none before: before S its words are untrained tokens)
        reading = found[site, steps[-1]]["planted"]["n_features"] > 0
        ok = reading and onsets["planted"] == after
        # no emergence for the control: its features, where the last SAE has them, are there before S
        control_emerges = onsets["control"] is not None and onsets["control"] >= after
        lin_p, lin_c = starts["planted"], starts["control"]
        ok_lin = bool(lin_p) and all(s >= after for s in lin_p) and any(s == after for s in lin_p)
        ok_lin = ok_lin and not any(s == after for s in lin_c)  # no control feature begins with the planted one
        # births at the first studied step after S by the same matching: the construction's features there have
        # no match at the step before, and matching tells them from carried ones only if it carries most of the
        # control's features there (its own seed noise bounds this)
        i = steps.index(after) if after in steps else 0
        at = {k: found[site, after][k]["features"] for k in kinds}
        back = first_steps(steps[i - 1 : i + 1], ms[i - 1 : i], at["planted"], thr) if i > 0 else []
        born = sum(s == after for s in back)
        back_c = first_steps(steps[i - 1 : i + 1], ms[i - 1 : i], at["control"], thr) if i > 0 else []
        carried = sum(s < after for s in back_c)
        ok_born = bool(at["planted"]) and born == len(at["planted"]) and 2 * carried > len(at["control"])
        # the development analysis's per-feature birth rule (both seeds of the step have the feature, neither SAE
        # of the step before does), where the study trained seed baselines: which of the features at the first
        # step after S it calls born
        rule = {}
        if not suffix and cfg.study.seed_baseline and i > 0:
            seeds = {s: f"{site}@seed={cfg.sae.seed + s + 1}" for s in steps}
            dev = site_development(run, steps, site, thr, seeds)
            born_rule = set(next(c for c in dev["changes"] if c["step"] == after).get("born_features") or [])
            rule = {k: f"{len(born_rule & set(at[k]))} of {len(at[k])}" for k in kinds}
        readings += reading
        control_emerging += control_emerges
        right_born += ok_born
        right += ok
        right_lineage += ok_lin
        emit(
            figure="sae_dating",
            saes=suffix or "the study's",
            site=site,
            planted_step=S,
            first_after=after,
            planted_onset=onsets["planted"],
            control_onset=onsets["control"],
            planted_features_per_step={s: found[site, s]["planted"]["n_features"] for s in steps},
            control_features_per_step={s: found[site, s]["control"]["n_features"] for s in steps},
            planted_token_features_per_step={s: found[site, s]["planted"]["token_features"] for s in steps},
            planted_unstructured_per_step={s: found[site, s]["planted"]["unstructured_features"] for s in steps},
            planted_best={
                s: {x: found[site, s]["planted"][f"best_{x}"] for x in ("precision", "recall", "words")} for s in steps
            },
            lineage_start_of_last_features=lineage,
            planted_born_at_first_after=f"{born} of {len(at['planted'])}",
            control_carried_into_first_after=f"{carried} of {len(at['control'])}",
            born_by_the_seed_rule_at_first_after=rule,
            reads_the_construction=bool(reading),
            correct_onset=bool(ok),
            correct_lineage=bool(ok_lin),
            correct_births=ok_born,
            control_emerges_after_S=bool(control_emerges),
        )
    emit(
        figure="sae_dating_sites_correct",
        saes=suffix or "the study's",
        sites=len(sites),
        reading=readings,
        onset=right,
        lineage=right_lineage,
        born_at_first_after=right_born,
        control_emerging_after_S=control_emerging,
    )


def score_crosscoders(cfg, run, steps, S, windows, kinds):
    """Each crosscoder read one checkpoint at a time: checkpoint m's view alone (sfcd.crosscoders.view.alone_view,
    the SAE the circuit stage uses at m) encodes m's own activations, and the SAEs' concentration rule picks the
    construction's latents there. Beside it, the crosscoder's decoder-norm emergence of the last checkpoint's
    construction latents (the relative-norm rule of latents.safetensors), which also counts a latent present where
    its decoder holds only the words' untrained embeddings (token identity, not the construction)."""
    import numpy as np
    from safetensors.torch import load_file

    import sfcd
    from sfcd.crosscoders.view import alone_view
    from sfcd.development import groundtruth as G

    after = G.first_after(steps, S)
    classes = G.planted_classes(kinds)
    root = Path(cfg.run_dir) / "crosscoders"
    for folder in sorted(p for p in root.iterdir() if (p / "latents.safetensors").exists()):
        cc = sfcd.load_crosscoder(folder)
        cc_steps = list(cc.cfg["steps"])
        found = {}
        for m, step in enumerate(cc_steps):
            model = sfcd.load_model(cfg.run_dir, step=step)
            view = alone_view(cc, m)
            c = G.concentration(view.encode, G.stream([model], folder.name, windows, (0, 1)), kinds, classes)
            found[step] = {k: c.summary(k) for k in kinds}
        emerged = load_file(str(folder / "latents.safetensors"))["emerged"].numpy()
        out, onsets = {}, {}
        for k in kinds:
            onsets[k] = G.onset(cc_steps, [found[s][k]["n_features"] > 0 for s in cc_steps])
            last = found[cc_steps[-1]][k]["features"]
            # each of the last checkpoint's construction latents: the first step from which its own view has it
            own = [G.onset(cc_steps, [j in found[s][k]["features"] for s in cc_steps]) for j in last]
            norm = [cc_steps[int(emerged[j])] if emerged[j] >= 0 else None for j in last]
            out[k] = {
                "onset": onsets[k],
                "latents_per_step": {s: found[s][k]["n_features"] for s in cc_steps},
                "unstructured_per_step": {s: found[s][k]["unstructured_features"] for s in cc_steps},
                "latent_onsets": {str(s): own.count(s) for s in [*cc_steps, None] if own.count(s)},
                "decoder_norm_onsets": {str(s): norm.count(s) for s in [*cc_steps, None] if norm.count(s)},
                "decoder_norm_before_S": float(np.mean([s is not None and s < after for s in norm])) if last else None,
            }
        ok = onsets["planted"] == after and onsets["control"] is not None and onsets["control"] < after
        emit(figure="crosscoder_dating", site=folder.name, planted_step=S, first_after=after, **out, correct=bool(ok))


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
    from sfcd.io import read_json
    from sfcd.paths import RunDir
    from sfcd.study import run_study

    S, steps, extra = settings(args.quick, args.smoke)
    run_dir = args.run_dir or f"/tmp/sfcd_planted{'_smoke' if args.smoke else '_quick' if args.quick else ''}"
    overrides = [
        "experiment=demo",
        f"run_dir={run_dir}",
        f"corpus.planted.step={S}",
        *([f"study.steps=[{','.join(map(str, steps))}]"] if steps else []),
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
    chosen = read_json(run.root / "development" / "study_steps.json")
    steps = list(chosen["steps"])
    emit(figure="studied_steps", steps=steps, reasons=chosen.get("reasons"), first_after=G.first_after(steps, S))
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
    if not args.smoke:
        t2 = time.perf_counter()
        wide = train_wide_saes(cfg, overrides, steps)
        emit(figure="wide_saes_seconds", seconds=round(time.perf_counter() - t2, 1), saes=wide)
        score_saes(cfg, run, steps, S, windows, kinds, sites, wide)
    score_crosscoders(cfg, run, steps, S, windows, kinds)
    score_circuits(cfg, run, steps, S, log)
    emit(figure="scoring_seconds", seconds=round(time.perf_counter() - t1, 1))


if __name__ == "__main__":
    main()
