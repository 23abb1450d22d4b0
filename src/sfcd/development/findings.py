"""The study's findings, per task: when the behaviour appears (train log), when its circuit appears, and which of
the last circuit's features are new and which carried over, each judged against what noise alone would give.

- **Behaviour**: the first checkpoint whose task accuracy reaches each of the study's thresholds and stays within
  the study's margin of it (the train log's crossings, :func:`sfcd.models.train_log.crossings`, as the studied
  steps are chosen).
- **Circuit**: the first studied checkpoint whose own circuit is *resolvable* (the model's F(M) - F(empty) stands
  out of the per-example noise, see the circuit stage) and reaches faithfulness ``FAITHFUL`` at some swept size;
  and the first studied checkpoint from which the *last* circuit, carried back through matched features, stays
  at least ``FAITHFUL`` faithful (resolvable) to the end.
- **Features** of the last circuit (feature nodes, one per feature whatever its positions): each feature's first
  studied checkpoint, through an unbroken chain of one-to-one matches (``study.match``) >= the sharing threshold
  back from the last SAE. A feature is *carried over* when it existed before the circuit appeared (its first
  checkpoint is earlier), *new* otherwise. A new feature counts as new only when a second SAE of the last
  checkpoint (another seed) finds it too: a feature one seed has and the other lacks may be the SAE's own
  variance, and is listed as *not reproducible* instead of new.
"""

from __future__ import annotations

from sfcd.development.matching import Matching

#: a circuit "is there" when it reaches this faithfulness (the circuit stage's ``nodes_for_faithfulness_0.8``)
FAITHFUL = 0.8


def first_steps(steps: list[int], matchings: list[Matching], features: list[int], threshold: float) -> list[int]:
    """For each feature index of the last SAE, the earliest studied step reached by an unbroken chain of one-to-one
    matches >= ``threshold`` (``matchings[k]`` matches ``steps[k+1]``'s SAE, as A, to ``steps[k]``'s)."""
    out = []
    for i in features:
        k, cur = len(steps) - 1, int(i)
        while k > 0:
            m = matchings[k - 1]
            j = int(m.match[cur]) if cur < len(m.match) else -1
            if j < 0 or m.sim[cur] < threshold:
                break
            cur, k = j, k - 1
        out.append(steps[k])
    return out


def _resolvable(row: dict) -> bool:
    return row.get("resolvable", True) is not False and row.get("faithfulness") is not None


def _first_from(rows: list[dict], ok) -> int | None:
    """The first step from which ``ok(row)`` holds at every later row (None: not even at the last)."""
    first = None
    for r in rows:
        first = (r["step"] if first is None else first) if ok(r) else None
    return first


def task_findings(
    task: str,
    steps: list[int],
    rows: list[dict],
    circuit_meta: dict[int, dict],
    last_nodes: list[str],
    matchings: dict[str, list[Matching]],
    seed: dict[str, Matching],
    threshold: float,
    behaviour: dict[str, int | None] | None,
) -> dict:
    """One task's findings (see the module docstring). ``rows``: the task's circuit development rows;
    ``circuit_meta``: each studied step's circuit.json metadata; ``last_nodes``: the last circuit's node ids;
    ``seed``: per site, the last SAE matched to its second seed; ``behaviour``: threshold -> crossing step."""

    def own(step: int) -> bool:
        meta = circuit_meta.get(step, {})
        need = (meta.get("nodes_for_faithfulness_0.8") or {}).get("features")
        return meta.get("resolvable", True) is not False and meta.get("faithfulness") is not None and need is not None

    appears = next((s for s in steps if own(s)), None)

    def carried_ok(r: dict) -> bool:
        v = r.get("final_circuit_faithfulness")
        return _resolvable(r) and v is not None and v >= FAITHFUL

    last_from = _first_from(rows, carried_ok)
    feats: dict[str, list[int]] = {}
    n_err = 0
    for nid in last_nodes:
        site, _, rest = nid.partition("/")
        feat = rest.split("@")[0]
        if feat == "eps":
            n_err += 1
        elif site in matchings:
            feats.setdefault(site, [])
            if int(feat) not in feats[site]:
                feats[site].append(int(feat))
    listed = []
    ref = appears if appears is not None else steps[-1]
    for site, idx in feats.items():
        firsts = first_steps(steps, matchings[site], idx, threshold)
        for i, first in zip(idx, firsts, strict=True):
            m = seed.get(site)
            rep = None if m is None else bool(i < len(m.sim) and m.match[i] >= 0 and m.sim[i] >= threshold)
            if first < ref:
                status = "carried over"
            elif rep is False:
                status = "not reproducible"
            else:
                status = "new"
            listed.append(
                {"id": f"{site}/{i}", "site": site, "first_step": int(first), "reproducible": rep, "status": status}
            )
    counts = {k: sum(f["status"] == k for f in listed) for k in ("carried over", "new", "not reproducible")}
    out = {
        "task": task,
        "behaviour": behaviour,
        "circuit_appears": appears,
        "last_circuit_faithful_from": last_from,
        "faithful_at": FAITHFUL,
        "features": listed,
        "counts": counts,
        "error_nodes": n_err,
        "by_first_step": {str(s): sum(f["first_step"] == s for f in listed) for s in steps},
        "rows": [
            {
                "step": r["step"],
                "n_nodes": r.get("n_nodes"),
                "resolvable": _resolvable(r),
                "faithfulness": r.get("faithfulness"),
                "final_circuit_faithfulness": r.get("final_circuit_faithfulness"),
            }
            for r in rows
        ],
    }
    return out


def summarise(findings: dict) -> list[str]:
    """One plain sentence per task (the report's lines, also logged)."""
    lines = []
    for t, f in findings.items():
        b = f.get("behaviour") or {}
        learned = max(b, key=float) if b else None
        bits = [f"{t}:"]
        if learned is not None:
            s = b[learned]
            bits.append(
                f"accuracy reaches {learned} at step {s}" if s is not None else f"accuracy never reaches {learned}"
            )
        a = f["circuit_appears"]
        bits.append(f"a faithful circuit first at step {a}" if a is not None else "no resolvable faithful circuit")
        c = f["counts"]
        bits.append(
            f"its last circuit: {c['carried over']} features carried over, {c['new']} new, "
            f"{c['not reproducible']} not reproducible by a second seed, {f['error_nodes']} error nodes"
        )
        lines.append(" ".join(bits[:1]) + " " + "; ".join(bits[1:]) + ".")
    return lines


def collect(
    run,
    steps: list[int],
    circuits: dict[str, list[dict]],
    matchings: dict[str, list[Matching]],
    threshold: float,
    seed: dict[str, Matching] | None = None,
    thresholds: list[float] | None = None,
    margin: float | None = None,
) -> dict:
    """Every task's findings from a study's run folder: its circuits' development rows (``circuits``, as
    :func:`sfcd.development.analysis.circuit_development` returns them), the adjacent-step matchings per site,
    the train log (when there is one) and ``seed``: per site, the last step's SAE matched to its second seed (a
    site without one: its features stay unjudged)."""
    from sfcd.io import read_csv, read_json
    from sfcd.models.train_log import crossings

    rows_log = read_csv(run.train_log) if run.train_log.exists() else []
    seed = dict(seed or {})
    out = {}
    for task, rows in circuits.items():
        meta = {}
        for s in steps:
            p = run.root / "circuits" / task / f"step{s}" / "circuit.json"
            if p.exists():
                meta[s] = read_json(p)["metadata"]
        last = read_json(run.root / "circuits" / task / f"step{steps[-1]}" / "circuit.json")
        behaviour = None
        if rows_log and f"{task}_accuracy" in rows_log[0]:
            behaviour = crossings(rows_log, [task], list(thresholds or [0.6, 0.9]), margin)[task]
        out[task] = task_findings(
            task, steps, rows, meta, [n["id"] for n in last["nodes"]], matchings, seed, threshold, behaviour
        )
    return out


def add_crosscoder(findings: dict, crosscoder: dict) -> dict:
    """Each task's crosscoder circuit beside its findings: its number of latents and when they emerge (the
    crosscoder development's ``circuits[task]``)."""
    for task, f in findings.items():
        cc = (crosscoder.get("circuits") or {}).get(task)
        if cc:
            f["crosscoder_emerged_at"] = {str(k): v for k, v in (cc.get("emerged_at") or {}).items()}
            f["crosscoder_latents"] = len(cc.get("latents") or [])
    return findings
