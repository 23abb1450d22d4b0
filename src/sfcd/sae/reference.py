"""The one-layer reference: our run of its recipe side by side with the recipe and its reported outcomes.

Reference: neelnanda-io/1L-Sparse-Autoencoder (the version behind its released SAEs); facts in
``shared/reference/sae-training-and-metrics.md``. Writes ``reference_comparison.md`` and ``.json`` beside the SAEs.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sfcd.io import read_json, write_json, write_text
from sfcd.sae.evaluate import ultra_low_group

#: why a value differs from the reference's
MODEL = "model and corpus"
LENGTH = "run length"
RECIPE_CHANGE = "recipe"
#: (row, the reference's choice)
RECIPE = [
    ("model", "gelu-1l: 1 layer, d_model 512, d_mlp 2048, trained on C4 + code"),
    ("site", "MLP hidden activations (post-GELU), d_in 2048"),
    ("dictionary", "dict_mult 8: 16,384 features"),
    (
        "initialisation",
        "W_enc [d_in, d_sae] then W_dec by kaiming_uniform_ after torch.manual_seed(49); decoder "
        "rows normalised; b_enc = b_dec = 0",
    ),
    ("inputs", "raw activations (no scaling)"),
    ("loss", "batch mean of summed squared error + 3e-4 x sum over batch and features of |f|"),
    ("optimizer", "Adam lr 1e-4, betas (0.9, 0.99); no warmup, decay or clipping"),
    ("batch", "4,096 activations"),
    ("decoder", "gradient along each row removed, rows renormalised, then Adam steps"),
    ("buffer", "384 x 4,096 activations in bf16 (model under bf16 autocast), half refilled when half used"),
    (
        "resampling",
        "every 30,000 steps: features with density < 10^-5.5 over 50 x 65,536 fresh tokens get fresh "
        "kaiming rows, b_enc 0; Adam state kept",
    ),
    ("run length", "2e9 tokens (488,281 steps)"),
    ("precision", "fp32 SAE"),
]
#: outcome -> (what the reference reports, why this run's value may differ)
REPORTED = {
    "l0": ("not given in the reference notes", ""),
    "ce_loss_score": ("reconstruction score reported high (qualitative)", MODEL),
    "dead_fraction": ("no dead features", LENGTH),
    "ultra_low_fraction": ("over half of the features (density < 1e-4)", LENGTH),
    "cluster_direction": ("the cluster shares almost one encoder direction, across seeds", LENGTH),
}


def our_recipe(m: dict) -> dict[str, tuple[str, str]]:
    """This run's choices, row by row as :data:`RECIPE`, from an SAE's ``metrics.json``: (text, why it differs
    from the reference: "" when it is the same, else :data:`MODEL`, :data:`LENGTH` or :data:`RECIPE_CHANGE`)."""
    hp, t = m.get("hparams", {}), m.get("training", {})
    ref = m.get("architecture") == "relu_reference"
    scale = float(hp.get("schedule_scale", 1.0))
    every = round(int(hp.get("resample_every") or 0) * scale)
    batch = int(t.get("batch_size") or 0)
    steps = m["train_tokens"] // batch if batch else 0
    betas = tuple(float(b) for b in t.get("betas", ()))
    schedule = (t.get("warmup_frac"), t.get("decay_frac"), t.get("grad_clip"))

    def same(cond: bool, otherwise: str = RECIPE_CHANGE) -> str:
        return "" if cond else otherwise

    if ref and every:
        resampling = (
            f"every {every:,} steps: features with density < {float(hp['resample_density']):.3g} over "
            f"{round(int(hp['resample_tokens']) * scale):,} fresh tokens get fresh kaiming rows, b_enc 0; Adam "
            f"state kept (the reference's counts x schedule_scale {scale:g})"
        )
        recipe_same = int(hp["resample_tokens"]) == 50 * 65_536 and abs(float(hp["resample_density"]) - 10**-5.5) < 1e-9
        why = "" if recipe_same and scale == 1 and int(hp["resample_every"]) == 30_000 else LENGTH
        resample = (resampling, why if recipe_same else RECIPE_CHANGE)
    else:
        resample = (
            f"every {hp.get('resample_every')} steps, sfcd's {m.get('architecture')} resampling"
            if hp.get("resample_every")
            else "none",
            RECIPE_CHANGE,
        )
    return {
        "model": (f"{m.get('model_name', 'the 1l preset')} on its run's corpus", MODEL),
        "site": (f"{m['site']}, d_in {m['d_in']}", MODEL),
        "dictionary": (
            f"{m['d_sae'] / m['d_in']:g}x: {m['d_sae']:,} features",
            RECIPE_CHANGE if m["d_sae"] != 8 * m["d_in"] else MODEL if m["d_sae"] != 16_384 else "",
        ),
        "initialisation": (
            f"the same draws from a generator seeded with sae.seed ({t.get('seed')})"
            if ref
            else f"sfcd's {m.get('architecture')} initialisation",
            same(ref),
        ),
        "inputs": ("raw activations" if ref else "scaled to E||x|| = sqrt(d_in)", same(ref)),
        "loss": (
            f"same form, l1_coeff {hp.get('l1_coeff')}" if ref else f"{m.get('architecture')} loss",
            same(ref and float(hp.get("l1_coeff", 0)) == 3e-4),
        ),
        "optimizer": (
            f"Adam lr {m['lr']:g}, betas {betas}; warmup {schedule[0]}, decay {schedule[1]}, clip {schedule[2]}",
            same(float(m["lr"]) == 1e-4 and betas == (0.9, 0.99) and not any(schedule)),
        ),
        "batch": (f"{batch:,} activations", same(batch == 4096)),
        "decoder": ("same" if ref else "sfcd's", same(ref)),
        "buffer": (
            f"chunks of {t.get('buffer_tokens', 0):,} activations in {t.get('buffer_dtype')}, replaced whole "
            "(windows drawn from the whole token file, so resume is exact)",
            RECIPE_CHANGE,
        ),
        "resampling": resample,
        "run length": (f"{m['train_tokens']:,} tokens ({steps:,} steps)", same(m["train_tokens"] >= 2e9, LENGTH)),
        "precision": (str(t.get("precision", "")), same(str(t.get("precision")) == "32-true")),
    }


def cluster_stats(folder: Path, low: float = 1e-4) -> dict:
    """Ultra-low-density features (0 < density < ``low``) and how much their encoder directions agree."""
    density = (10 ** load_file(str(folder / "sparsity.safetensors"))["sparsity"].double() - 1e-10).clamp_min(0)
    g = ultra_low_group(load_file(str(folder / "sae_weights.safetensors"))["W_enc"], density, low)
    out = {
        "d_sae": len(density),
        "dead_fraction": g["dead"].double().mean().item(),
        "ultra_low_fraction": g["ultra"].double().mean().item(),
        "cluster_size": int(g["ultra"].sum()),
    }
    if g["cos_to_mean"] is not None:
        out["cluster_cos_to_mean"] = g["cos_to_mean"]
        out["cluster_mean_direction"] = g["mean_dir"]
    if g["others_cos_to_mean"] is not None:
        out["others_cos_to_their_mean"] = g["others_cos_to_mean"]
    return out


def write_comparison(folders: list[Path], out_dir: Path) -> Path:
    """Compare the SAEs in ``folders`` (one per seed) with the reference; returns the markdown file."""
    stats = [cluster_stats(f) for f in folders]
    metrics = [read_json(f / "metrics.json") for f in folders]
    cross = None
    dirs = [s.get("cluster_mean_direction") for s in stats]
    if len(dirs) >= 2 and all(d is not None for d in dirs[:2]):
        cross = float(dirs[0] @ dirs[1])
    ours = {
        "dead_fraction": ", ".join(f"{s['dead_fraction']:.3f}" for s in stats),
        "ultra_low_fraction": ", ".join(f"{s['ultra_low_fraction']:.3f}" for s in stats),
        "cluster_direction": ", ".join(
            f"cos to cluster mean {s['cluster_cos_to_mean']:.3f} "
            f"(others {s.get('others_cos_to_their_mean', float('nan')):.3f})"
            if "cluster_cos_to_mean" in s
            else "no cluster"
            for s in stats
        )
        + (f"; across seeds {cross:.3f}" if cross is not None else ""),
        "ce_loss_score": ", ".join(f"{m['ce_loss_score']:.3f}" for m in metrics),
        "l0": ", ".join(f"{m['l0']:.1f}" for m in metrics),
    }
    saved = read_json(folders[0] / "cfg.json") if (folders[0] / "cfg.json").exists() else {}
    model_name = saved.get("model_name") or (saved.get("metadata") or {}).get("model_name")
    mine = our_recipe({**metrics[0], **({"model_name": model_name} if model_name else {})})
    lines = [
        "# One-layer reference: sfcd's run vs the reference",
        "",
        "The reference is neelnanda-io/1L-Sparse-Autoencoder (`utils.py`, `train.py`). `differs by` says where a",
        "difference comes from: the model and corpus (gelu-1l on web text and code vs the small `1l` model on the",
        "built-in grammar), the run length (its 2e9 tokens vs this run's, and its resampling schedule scaled with",
        "it; the late outcomes, such as the ultra-low-density cluster, need the long run,",
        "`experiment=one_layer_reference_gpu`), or the recipe itself (a setting changed from the reference's).",
        "",
        "## Recipe",
        "",
        "| | reference | this run | differs by |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {v} | {mine[k][0]} | {mine[k][1] or 'same'} |" for k, v in RECIPE]
    lines += [
        "",
        f"## Outcomes ({len(folders)} seed{'s' if len(folders) > 1 else ''}: "
        + ", ".join(f.name for f in folders)
        + ")",
        "",
        "| | reference (reported) | this run | differs by |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {r} | {ours[k]} | {why} |" for k, (r, why) in REPORTED.items()]
    md = out_dir / "reference_comparison.md"
    write_text(md, "\n".join(lines) + "\n")
    write_json(
        out_dir / "reference_comparison.json",
        {
            "saes": [str(f) for f in folders],
            "cross_seed_cluster_cos": cross,
            "stats": [{k: v for k, v in s.items() if k != "cluster_mean_direction"} for s in stats],
            "metrics": metrics,
        },
    )
    return md
