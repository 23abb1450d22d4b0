"""A planted developmental ground truth through the real stages: does the study date a construction that enters
training at step S to the first studied checkpoint after S, and find no emergence for a control present throughout?

Trains the tiny model on the built-in corpus with ``corpus.planted.step=S`` (sfcd/data/planted.py: its own nouns
and verbs, absent from every batch before S; a control construction of the same kind from step 0), runs
``sfcd study`` with the studied steps chosen by the study itself from the train log over the two tasks (before
either is learned, where each is learned, the last checkpoint), then scores three methods
(sfcd/development/groundtruth.py; a feature or latent is the construction's when it is concentrated on several of
its words, follows their classes and the words share a direction in the model there):

(a) SAEs, the study's own and wider ones (256 latents, k = 8, trained by the SAE stage as a one-point sweep at
    every site and studied step, with a second seed as the study's seed baseline): per site, the onset of the
    construction's features (the first studied step from which the site has one at every later step), and how
    the development analysis's matching reads them, by activation correlation (``study.match=activations``, the
    default) and by decoder cosine: whether they are new at the first studied step after S while the control's
    are carried; which the births-beyond-the-seed-floor rule calls born, and when; their lineage (``first_steps``:
    the earliest studied step their chain of one-to-one matches reaches).
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
    are, and beside each a second seed as the study's seed baseline is seeded (the SAE stage skips those already
    trained); returns their name suffix. Warm-starting each from the previous studied step's instead
    (``sae.init_from``) was measured too: matching then carries the construction's features back to latents that
    held its words before S (7 of 8 at resid.0)."""
    from sfcd.config import compose
    from sfcd.sae.stage import train_saes

    for step in steps:
        c = compose([*overrides, f"step={step}", f"sae.seed={cfg.sae.seed + step}", "sae.ce_tokens=0"])
        c.sae.sweep = {key: [v] for key, v in WIDE.items()}  # a one-point grid: the folders get its suffix
        train_saes(c)
        c.sae.sweep = {**c.sae.sweep, "seed": [cfg.sae.seed + step + 1]}  # the seed baseline
        train_saes(c)
    return "@" + ",".join(f"{key}={v}" for key, v in sorted(WIDE.items()))


def seed_names(cfg, steps: list[int], name: str) -> dict[int, str]:
    """Each studied step's second-seed SAE of ``name`` (``<site>`` or ``<site>@<sweep>``), as the study and
    :func:`train_wide_saes` name it."""
    return {s: f"{name}{',' if '@' in name else '@'}seed={cfg.sae.seed + s + 1}" for s in steps}


def score_saes(cfg, run, steps, S, windows, kinds, sites, suffix: str = ""):
    """SAE features (``<site><suffix>`` at every studied step): the construction's, their onset, and how the
    development analysis's matching reads them: by activation correlation (the study's default, ``study.match``)
    and, for comparison, by decoder cosine."""

    import sfcd
    from sfcd.development import groundtruth as G
    from sfcd.development.analysis import site_development, site_signatures
    from sfcd.development.findings import first_steps
    from sfcd.development.matching import presence
    from sfcd.development.saes import sae_folder
    from sfcd.devices import work_device

    after = G.first_after(steps, S)
    i = steps.index(after) if after in steps else 0
    thr = cfg.study.shared_threshold
    device = work_device(cfg.trainer)
    classes = G.planted_classes(kinds)
    found = {}  # (site, step) -> {kind: summary}
    for step in steps:
        model = sfcd.load_model(cfg.run_dir, step=step)
        for site in sites:
            sae = sfcd.load_sae(sae_folder(run, step, site + suffix))
            c = G.concentration(sae.encode, G.stream([model], site, windows, (0, 1)), kinds, classes)
            found[site, step] = {k: c.summary(k) for k in kinds}
    totals: dict[str, dict[str, int]] = {}
    for site in sites:
        name = site + suffix
        present = {k: [found[site, s][k]["n_features"] > 0 for s in steps] for k in kinds}
        onsets = {k: G.onset(steps, present[k]) for k in kinds}
        at = {k: found[site, after][k]["features"] for k in kinds}
        last = {k: found[site, steps[-1]][k]["features"] for k in kinds}
        # a site reads the construction when its last SAE has features of it; it dates it right when they appear
        # at the first studied checkpoint after S and stay (none before: before S its words are untrained tokens)
        reading = bool(last["planted"])
        readings = {"onset": reading and onsets["planted"] == after}
        control_emerges = onsets["control"] is not None and onsets["control"] >= after
        seeds = seed_names(cfg, steps, name)
        per_method = {}
        for how in ("activations", "decoders"):
            sig = site_signatures(cfg, run, steps, name, seeds, device) if how == "activations" else None
            dev = site_development(run, steps, name, thr, seeds, device, sig, cfg.study.match_min_fires)
            ms = dev["matchings"]
            # 1. new at the first studied step after S: a feature there is new when no feature of the studied
            # step before reaches the threshold with it (every pair compared, not only the one-to-one match); the
            # matching dates the construction when every planted feature there is new and most of the control's
            # are not (they were learned before S: a carried feature is what tells matching from noise)
            new = {}
            if i > 0:
                here, before = dev["features"][i], dev["features"][i - 1]
                best = presence(here.rows, before.rows, thr, device).best_a
                pos = {int(j): p for p, j in enumerate(here.idx)}
                new = {k: [bool(best[pos[j]] < thr) if j in pos else None for j in at[k]] for k in kinds}
            ok_new = (
                bool(at["planted"])
                and all(x is True for x in new.get("planted", []))
                and 2 * sum(x is False for x in new.get("control", [])) > len(at["control"])
            )
            # 2. the development analysis's births beyond the seed floor (both seeds of a step have the feature,
            # neither SAE of the step before does): which construction features it calls born, at which step
            born = {k: {} for k in kinds}
            for ch in dev["changes"]:
                b = set(ch.get("born_features") or [])
                for k in kinds:
                    n_born = len(b & set(found[site, ch["step"]][k]["features"]))
                    if n_born:
                        born[k][ch["step"]] = n_born
            ok_rule = bool(born["planted"]) and set(born["planted"]) == {after} and not born["control"]
            # 3. the lineage of the last SAE's construction features: the earliest studied step their chain of
            # one-to-one matches reaches
            starts = {k: first_steps(steps, ms, last[k], thr) for k in kinds}
            lin = {k: {str(s): v.count(s) for s in steps if v.count(s)} for k, v in starts.items()}
            ok_lin = bool(starts["planted"]) and all(s >= after for s in starts["planted"])
            ok_lin = ok_lin and any(s == after for s in starts["planted"])
            ok_lin = ok_lin and not any(s >= after for s in starts["control"])
            per_method[how] = {
                "new_at_first_after": {k: f"{sum(x is True for x in v)} of {len(v)}" for k, v in new.items()},
                "born_beyond_floor": {k: {str(s): n for s, n in v.items()} for k, v in born.items()},
                "lineage_start_of_last_features": lin,
                "correct_new": ok_new,
                "correct_births": ok_rule,
                "correct_lineage": ok_lin,
                "floor_shared": [round(f["shared"], 2) if f else None for f in dev["floor"]],
            }
            t = totals.setdefault(how, {"new": 0, "births": 0, "lineage": 0})
            t["new"] += ok_new and reading
            t["births"] += ok_rule and reading
            t["lineage"] += ok_lin and reading
        totals.setdefault("onset", {"onset": 0, "reading": 0, "control_emerging_after_S": 0})
        totals["onset"]["onset"] += readings["onset"]
        totals["onset"]["reading"] += reading
        totals["onset"]["control_emerging_after_S"] += control_emerges
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
            reads_the_construction=reading,
            correct_onset=bool(readings["onset"]),
            control_emerges_after_S=bool(control_emerges),
            matching=per_method,
        )
    emit(figure="sae_dating_sites_correct", saes=suffix or "the study's", sites=len(sites), **totals)


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
