"""The one-layer reference: our run of its recipe side by side with the recipe and its reported outcomes.

Reference: neelnanda-io/1L-Sparse-Autoencoder (the version behind its released SAEs); facts in
``shared/reference/sae-training-and-metrics.md``. Writes ``reference_comparison.md`` and ``.json`` beside the SAEs.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sfcd.io import read_json, write_json, write_text
from sfcd.sae.evaluate import ultra_low_group

RECIPE = [
    ("model", "gelu-1l: 1 layer, d_model 512, d_mlp 2048"),
    ("site", "MLP hidden activations (post-GELU)"),
    ("dictionary", "dict_mult 8"),
    ("loss", "batch mean of summed squared error + 3e-4 x sum over batch and features of |f|"),
    ("optimizer", "Adam lr 1e-4, betas (0.9, 0.99), batch 4096, fp32"),
    ("decoder", "unit norm, gradient component along each row removed"),
    ("dead features", "resampled when firing < 10^-5.5 of the time, every 30k steps"),
]
REPORTED = {
    "dead_fraction": "no dead features",
    "ultra_low_fraction": "over half of the features (density < 1e-4)",
    "cluster_direction": "the cluster shares almost one encoder direction, across seeds",
    "ce_loss_score": "reconstruction score reported high (qualitative)",
    "l0": "not given in the reference notes",
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
    m0 = metrics[0]
    our_recipe = {
        "model": f"sfcd 1l preset on the built-in corpus (d_in {m0['d_in']})",
        "site": m0["site"],
        "dictionary": f"d_sae {m0['d_sae']} ({m0['d_sae'] // m0['d_in']}x)",
        "loss": f"same form, l1_coeff {m0['hparams'].get('l1_coeff')}",
        "optimizer": f"Adam lr {m0['lr']}, {m0['train_tokens']:,} training tokens",
        "decoder": "same",
        "dead features": f"resampled when silent for {m0['hparams'].get('dead_tokens'):,} tokens, every "
        f"{m0['hparams'].get('resample_every')} steps",
    }
    lines = [
        "# One-layer reference: sfcd's run vs the reference",
        "",
        "## Recipe",
        "",
        "| | reference | this run |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v} | {our_recipe[k]} |" for k, v in RECIPE]
    lines += [
        "",
        f"## Outcomes ({len(folders)} seed{'s' if len(folders) > 1 else ''}: "
        + ", ".join(f.name for f in folders)
        + ")",
        "",
        "| | reference (reported) | this run |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {REPORTED[k]} | {ours[k]} |" for k in REPORTED]
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
