"""Circuits on a crosscoder's shared latents, followed through training (the study's crosscoder section).

Per task, a circuit is found at every checkpoint with the crosscoders as the dictionaries of their sites
(``crosscoders/circuits/<task>/step<N>/``). The last circuit's latents then have one identity at every checkpoint:
- when each emerges (from its decoder norms, :mod:`sfcd.crosscoders.reading`), and the share of them present at
  each checkpoint;
- their node effects at each checkpoint and the relative indirect effect ``RelIE_i^m = |IE_i^m| / sum_m' |IE_i^m'|``
  (Bayazit et al.);
- the faithfulness of the last circuit's node ids at each checkpoint (the same ids, no matching), each checkpoint
  alone (the crosscoder's other checkpoints at their mean activation: :mod:`sfcd.crosscoders.view`), reported only
  where F(M) - F(empty) is resolvable (``faithfulness_resolvable``; None otherwise, never NaN);
- beside them, the share of the last SAE circuit's features at the same sites that independent SAEs match at that
  checkpoint (the matching method), when the study's circuit development is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from sfcd.io import read_json, write_csv, write_json
from sfcd.paths import RunDir

log = logging.getLogger(__name__)


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _resolved(r: dict) -> tuple[float | None, bool]:
    """The faithfulness where F(M) - F(empty) is resolvable (the circuit code's ``resolvable``; a missing key, from
    circuit code that did not write it, counts as resolvable), else None; never NaN (strict JSON)."""
    resolvable = bool(r.get("resolvable", True))
    f = r.get("faithfulness")
    if not resolvable or f is None or not np.isfinite(f):
        return None, False
    return float(f), True


def _finite(a, b) -> float | None:
    if a is None or b is None or not np.isfinite(a - b):
        return None
    return float(a - b)


def circuit_cfg(cfg: DictConfig, run: RunDir, task: str, step: int, sites: list[str]) -> DictConfig:
    """The circuit stage's config for a circuit on the crosscoders' latents: nodes only (the development reads
    node effects; ``sfcd circuit circuit.dictionaries=<run>/crosscoders`` gives the edges), no baselines (the SAE
    circuits' business)."""
    from sfcd.config import override as _at

    return _at(
        cfg,
        step=step,
        **{
            "circuit.task": task,
            "circuit.sites": sites,
            "circuit.dictionaries": str(run.root / "crosscoders"),
            "circuit.out_dir": str(run.root / "crosscoders" / "circuits" / task / f"step{step}"),
            "circuit.baselines": False,
            "circuit.edges": False,
        },
    )


def crosscoder_development(
    cfg: DictConfig, run: RunDir, steps: list[int], sites: list[str], tasks: list[str], sae_circuits: dict | None
) -> dict:
    from sfcd.circuits.stage import faithfulness_of, find_circuit

    root = run.root / "crosscoders"
    site_rows = {s: read_json(root / s / "latents.json") for s in sites}
    latents = {s: _load(root / s / "latents.safetensors") for s in sites}
    presence = {s: t["present"].bool() for s, t in latents.items()}
    emerged = {s: t["emerged"].long() for s, t in latents.items()}
    out: dict = {"steps": steps, "sites": site_rows, "circuits": {}}
    if not cfg.crosscoder.circuits:
        return out
    for task in tasks:
        for step in steps:
            if not (root / "circuits" / task / f"step{step}" / "circuit.json").exists():
                find_circuit(circuit_cfg(cfg, run, task, step, sites))
        last = read_json(root / "circuits" / task / f"step{steps[-1]}" / "circuit.json")
        feats = [(n["site"], int(n["feature"])) for n in last["nodes"] if n["feature"] is not None]
        feats = list(dict.fromkeys(feats))  # per-position circuits: one latent, several positions
        ids = {n["id"] for n in last["nodes"]}
        effects = []
        for step in steps:
            e = _load(root / "circuits" / task / f"step{step}" / "node_effects.safetensors")
            per = {s: e[f"{s}.features"] for s in sites}
            effects.append([float(per[s].reshape(-1, per[s].shape[-1]).sum(0)[f]) for s, f in feats])
        ie = np.abs(np.array(effects))  # [steps, latents]
        rel_ie = ie / np.maximum(ie.sum(0, keepdims=True), 1e-12)
        rows = []
        for k, step in enumerate(steps):
            if step == steps[-1]:
                r = last["metadata"]
            else:
                r = faithfulness_of(circuit_cfg(cfg, run, task, step, sites), step, task, ids)
            faith, resolvable = _resolved(r)
            row = {
                "step": step,
                "latents": len(feats),
                "share_present": float(np.mean([bool(presence[s][f, k]) for s, f in feats])) if feats else None,
                "share_emerged_by_now": float(np.mean([0 <= int(emerged[s][f]) <= k for s, f in feats]))
                if feats
                else None,
                "mean_rel_ie": float(rel_ie[k].mean()) if feats else None,
                "final_circuit_faithfulness": faith,
                "faithfulness_resolvable": resolvable,
                "F_M_minus_F_empty": _finite(r.get("F_M"), r.get("F_empty")),
            }
            if sae_circuits and task in sae_circuits:
                sae_row = next((r for r in sae_circuits[task] if r["step"] == step), None)
                if sae_row and "final_features_by_site" in sae_row:
                    n = sum(sae_row["final_features_by_site"].get(s, 0) for s in sites)
                    got = sum(sae_row["final_features_matched_by_site"].get(s, 0) for s in sites)
                    row["share_matched_saes"] = got / n if n else None
            rows.append(row)
        emerge_hist = {str(st): sum(int(emerged[s][f]) == k for s, f in feats) for k, st in enumerate(steps)}
        out["circuits"][task] = {
            "rows": rows,
            "latents": [f"{s}/{f}" for s, f in feats],
            "emerged_at": emerge_hist,
            "rel_ie": rel_ie.T.round(4).tolist(),
        }
        log.info(
            "crosscoder circuit %s: %d latents; share present per step %s",
            task,
            len(feats),
            [r["share_present"] for r in rows],
        )
    flat = [{"task": t, **r} for t, v in out["circuits"].items() for r in v["rows"]]
    if flat:
        write_csv(root / "circuit_development.csv", flat, list(dict.fromkeys(k for r in flat for k in r)))
    write_json(root / "development.json", out)
    return out
