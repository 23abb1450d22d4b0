"""SAE evaluation (SAELens / SAEBench "core" metrics): reconstruction, sparsity, density, and the model's loss
with the SAE spliced in at its site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sfcd.io import atomic_path
from sfcd.models.sites import Site, hooks
from sfcd.sae.base import SAE


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE,
    acts: np.ndarray | torch.Tensor,
    batch: int | None = None,
    target: np.ndarray | torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """L0, L1, FVE, MSE, cosine, l2_ratio over ``acts`` [N, d] (on the SAE's device); also returns per-feature
    firing counts. ``batch`` rows at a time (default: 2^25 / d_sae rows, so that one batch's dense [batch, d_sae]
    latents stay at 128 MB in float32 whatever the width: 1,024 rows at 32,768 features). A transcoder's
    reconstruction is scored against ``target`` (the MLP's output at the same tokens), not ``acts``."""
    batch = batch or max(256, 2**25 // sae.d_sae)
    sums = {"l0": 0.0, "l1": 0.0, "sq_err": 0.0, "cos": 0.0, "l2_ratio": 0.0}
    device = sae.W_enc.device
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    n = len(acts)

    def tensor(a):
        return (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, dtype=np.float32))).to(
            device, torch.float32
        )

    x_all = tensor(acts)
    y_all = x_all if target is None else tensor(target)
    if len(y_all) != n:
        raise ValueError(f"{n} inputs but {len(y_all)} targets")
    mean = y_all.mean(0)
    total_var = (y_all - mean).pow(2).sum().item()
    for b in range(0, n, batch):
        x, y = x_all[b : b + batch], y_all[b : b + batch]
        f = sae.encode(x)
        y_hat = sae.reconstruct(x, f)  # of y: x itself for an SAE, the MLP's output for a transcoder
        active = f > 0
        fired += active.sum(0)
        sums["l0"] += active.sum().item()
        sums["l1"] += f.abs().sum().item()
        sums["sq_err"] += (y_hat - y).pow(2).sum().item()
        sums["cos"] += F.cosine_similarity(y_hat, y, dim=-1).sum().item()
        sums["l2_ratio"] += (y_hat.norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-8)).sum().item()
    m = {
        "l0": sums["l0"] / n,
        "l1": sums["l1"] / n,
        "fve": 1.0 - sums["sq_err"] / max(total_var, 1e-12),
        "mse": sums["sq_err"] / (n * y_all.shape[1]),
        "cosine": sums["cos"] / n,
        "l2_ratio": sums["l2_ratio"] / n,
    }
    return m, fired


def density_metrics(fired: torch.Tensor, n_tokens: int) -> tuple[dict[str, float | None], torch.Tensor]:
    """Dead fraction and the fractions below 1e-5 / 1e-6. ``n_tokens`` evaluation tokens resolve densities down to
    ``1 / n_tokens`` (``density_resolution``); a fraction below a density that cannot be told from zero would only
    repeat the dead fraction, so it is ``None`` unless ``1 / n_tokens`` is below it."""
    density = fired.double() / n_tokens
    resolution = 1.0 / max(1, n_tokens)
    out: dict[str, float | None] = {
        "dead_fraction": (density == 0).double().mean().item(),
        "eval_tokens": n_tokens,
        "density_resolution": resolution,
    }
    for name, level in (("below_1e-5", 1e-5), ("below_1e-6", 1e-6)):
        out[name] = (density < level).double().mean().item() if resolution < level else None
    return out, density


def _only_kept(fn, keep: torch.Tensor | None):
    """``fn`` applied at the kept positions only; the others keep their activations."""
    return fn if keep is None else (lambda a: torch.where(keep, fn(a), a))


@torch.no_grad()
def spliced_losses(
    model,
    site: Site,
    sae: SAE,
    windows: np.ndarray,
    exclude_ids=frozenset(),
    batch: int = 16,
    in_site: Site | None = None,
) -> dict[str, float]:
    """CE loss clean, with the SAE's reconstruction spliced in, and with the site zero-ablated; KL to clean.
    A transcoder (``in_site``: the ``mlp_in.<l>`` it reads) is spliced in place of the MLP: ``mlp.<l>`` becomes
    the transcoder's output for that forward pass's own MLP input.

    Positions whose token is in ``exclude_ids`` (BOS/EOS, left out of training) keep their original activations
    in both the spliced and the ablated run, as SAEBench does; the losses are over every position."""
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "zero": 0.0}
    n_tok = 0
    device = next(model.parameters()).device
    excl = torch.tensor(sorted(exclude_ids), dtype=torch.long, device=device)
    read: dict[str, torch.Tensor] = {}  # a transcoder's input, read in the same forward pass as its splice

    def splice(a: torch.Tensor) -> torch.Tensor:
        if in_site is None:
            return sae(a.float()).to(a.dtype)
        if "x" not in read:
            raise RuntimeError(f"the transcoder's input {in_site.name} was not read before {site.name} in this pass")
        return sae(read.pop("x").float()).to(a.dtype)

    def keep_input(a: torch.Tensor) -> None:
        read["x"] = a

    for b in range(0, len(windows), batch):
        x = torch.from_numpy(np.ascontiguousarray(windows[b : b + batch])).to(device)
        keep = (~torch.isin(x, excl))[..., None] if len(excl) else None
        targets = x[:, 1:].flatten()
        clean = model(x).logits[:, :-1].flatten(0, 1).float()
        logp_clean = F.log_softmax(clean, -1)
        ce["clean"] += F.cross_entropy(clean, targets, reduction="sum").item()

        for name, fn in (
            ("sae", _only_kept(splice, keep)),
            ("zero", _only_kept(torch.zeros_like, keep)),
        ):
            fns = {site: fn}
            if in_site is not None and name == "sae":
                fns = {in_site: keep_input, **fns}
            with hooks(model, fns):
                logits = model(x).logits[:, :-1].flatten(0, 1).float()
            ce[name] += F.cross_entropy(logits, targets, reduction="sum").item()
            kl[name] += F.kl_div(F.log_softmax(logits, -1), logp_clean, log_target=True, reduction="sum").item()
        n_tok += len(targets)
    out = {f"ce_{k}": v / n_tok for k, v in ce.items()} | {f"kl_{k}": v / n_tok for k, v in kl.items()}
    denom = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_score"] = (out["ce_zero"] - out["ce_sae"]) / denom if abs(denom) > 1e-9 else float("nan")
    out["kl_score"] = (out["kl_zero"] - out["kl_sae"]) / out["kl_zero"] if out["kl_zero"] > 1e-12 else float("nan")
    return out


def density_histogram(density: torch.Tensor, png: Path, title: str) -> Path:
    """Histogram of log10 feature density (dead features drawn at -10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logd = torch.log10(density + 1e-10).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(logd, bins=60, color="C0")
    ax.set_xlabel("log10 feature density (dead at -10)")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return png


@torch.no_grad()
def ultra_low_group(W_enc: torch.Tensor, density: torch.Tensor, low: float = 1e-4) -> dict:
    """Dead features, the live features below density ``low``, and how much the latter's encoder directions
    agree (mean cosine to their mean direction; the same for the other live features, for comparison).
    ``W_enc`` is [d_in, d_sae] (SAELens orientation)."""
    dirs = W_enc.t().float()
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    dead = density <= 0
    ultra = ~dead & (density < low)
    rest = ~dead & ~ultra
    out = {"dead": dead, "ultra": ultra, "cos_to_mean": None, "mean_dir": None, "others_cos_to_mean": None}
    for mask, key in ((ultra, "cos_to_mean"), (rest, "others_cos_to_mean")):
        if mask.sum() >= 2:
            mean = dirs[mask].mean(0)
            mean = mean / mean.norm().clamp_min(1e-8)
            out[key] = float((dirs[mask] @ mean).mean())
            if key == "cos_to_mean":
                out["mean_dir"] = mean
    return out
