"""The SAE base class: parameters read in SAELens orientation (the encoder stored latents first, ``W_enc_T``, and
read through ``W_enc``, its transposed view), input scaling folded at export, hooks for training.

Training works on scaled inputs ``x * scale`` (``scale`` makes E||x|| = sqrt(d_in)); ``encode``/``decode``/
``forward`` take and return raw activations, and :meth:`SAE.export` folds ``scale`` into the weights so the
saved SAE computes the same function with ``normalize_activations: "none"``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn


class SAE(nn.Module):
    """``f = act((x*s - b_dec*apply_b_dec) @ W_enc + b_enc)``, ``x_hat = (f @ W_dec + b_dec) / s``."""

    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = ""
    #: whether it maps one site's input to another site's output (:class:`sfcd.sae.transcoder.Transcoder`)
    is_transcoder: ClassVar[bool] = False
    apply_b_dec_to_input: ClassVar[bool] = False
    unit_norm_decoder: ClassVar[bool] = False
    normalize_input: ClassVar[bool] = True  # train on x scaled to E||x|| = sqrt(d_in)
    b_dec_at_median: ClassVar[bool] = True  # with apply_b_dec_to_input: b_dec starts at the data's geometric median
    #: which features a resampling step treats as dead: "silent" (no firing in the last ``dead_tokens`` training
    #: tokens) or "fresh_density" (density below ``resample_density`` over ``resample_sample_tokens()`` fresh tokens)
    resample_criterion: ClassVar[str] = "silent"
    resample_resets_adam: ClassVar[bool] = True  # zero the resampled features' Adam moments
    #: ``sae.compile`` runs this class's loss through ``torch.compile``: only where it was measured faster
    #: (bench_sae.py, compile_speedup) and makes no host-side choice that changes step to step (each would recompile)
    compiles: ClassVar[bool] = False

    @property
    def small_graph(self) -> bool:
        """Whether a training step's graph keeps no [batch, d_sae] tensor (TopK's sparse path: [batch, d] and
        [batch, k]-sized ones, and, while latents are dead, AuxK's [batch, n_dead] columns, n_dead <= 8 k_aux), so
        that the graphs of all SAEs of a step may be alive at once and take one backward pass (``SAEModule``).
        A subclass whose ``training_loss`` keeps [batch, d_sae] tensors says False."""
        return False

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, **hparams: Any):
        super().__init__()
        self.d_in, self.d_sae, self.hparams = d_in, d_sae, hparams
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=g)
        w = w / w.norm(dim=1, keepdim=True) * (1.0 if self.unit_norm_decoder else 0.1)
        self.W_dec = nn.Parameter(w)
        # the encoder is stored latents first ([d_sae, d_in], contiguous) and read through ``W_enc``, its
        # transpose: a step's sparse gradient comes grouped by latent in this layout, and the fused Adam updates a
        # contiguous parameter in place (a strided one it copies to and from contiguous memory on every step)
        self.W_enc_T = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        #: how many times :meth:`dead_latents` read the silence counts back from the device (a host sync on a GPU)
        self.dead_reads = 0
        self._quiet: tuple | None = None  # (the counts, their version, tokens left, dead_tokens): none can be dead
        self._dead: tuple | None = None  # (the counts, their version, dead_tokens, the dead set): the last read's
        self._dead_tokens: int | None = None  # the last look's dead_tokens: read_dead_sets reads for it ahead

    def __getstate__(self) -> dict:
        """A copy or pickle forgets what the last reads of the silence counts found (:meth:`dead_latents`): they
        are keyed by the counts' version, which a copied tensor starts again from 0, so a copy could match a stale
        read; the copy reads again at its first look."""
        state = super().__getstate__()
        state["_quiet"] = state["_dead"] = None
        return state

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder, [d_in, d_sae] (SAELens's orientation): a view of the stored ``W_enc_T``, so in-place writes
        to it (``copy_``, indexing) write the parameter."""
        return self.W_enc_T.t()

    def grad_of(self, name: str) -> torch.Tensor | None:
        """The gradient of parameter ``name`` in the orientation it is read in (``W_enc``: [d_in, d_sae])."""
        if name != "W_enc":
            return getattr(self, name).grad
        return None if self.W_enc_T.grad is None else self.W_enc_T.grad.t()

    # ----------------------------------------------------------------------------------------- inference
    def pre_acts(self, x_scaled: torch.Tensor) -> torch.Tensor:
        if self.apply_b_dec_to_input:
            x_scaled = x_scaled - self.b_dec
        flat = x_scaled.reshape(-1, x_scaled.shape[-1])
        # linear on the stored W_enc_T: the bias added in the matmul's own pass, and W_enc_T's gradient produced in
        # its own layout ([d_sae, d_in], contiguous), not transposed and copied into it
        return nn.functional.linear(flat, self.W_enc_T, self.b_enc).view(*x_scaled.shape[:-1], self.d_sae)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense feature activations from pre-activations (inference path)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_acts(x * self.scale))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec + self.b_dec) / self.scale

    def decoder_rows(self) -> torch.Tensor:
        """[d_sae, d_out]: each latent's output direction in raw units (what one unit of it adds to the output)."""
        return self.W_dec.detach() / self.scale

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The output for input ``x`` whose latents are ``f``: ``decode(f)`` (a transcoder adds its skip path)."""
        return self.decode(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x, self.encode(x))

    # ------------------------------------------------------------------------------------------ training
    def fit_input_scale(self, sample: torch.Tensor) -> None:
        """The input scale from raw activations ``sample`` [n, d_in]: E||x * scale|| = sqrt(d_in)."""
        norm = sample.norm(dim=1).mean().item()
        if not math.isfinite(norm) or norm <= 0:
            raise ValueError(f"mean activation norm {norm}; cannot scale the activations (all zero, NaN or inf?)")
        self.scale.fill_(math.sqrt(self.d_in) / norm)

    def training_loss(self, x_scaled: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        """Loss terms on a batch of scaled inputs; ``loss`` is optimised. ``progress`` runs 0 -> 1 over training.

        Must also return ``fired``: a bool [d_sae] of the features that fired on this batch.
        """
        raise NotImplementedError

    def record_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        tsf, quiet = self.tokens_since_fired, self._quiet
        untouched = quiet is not None and quiet[0] is tsf and quiet[1] == tsf._version  # since the last read
        tsf += n_tokens
        tsf.masked_fill_(fired, 0)  # not fired-mask indexing: no host sync
        # every count grew by n_tokens at most: the tokens any latent can still go silent without dying shrink so
        self._quiet = (tsf, tsf._version, quiet[2] - n_tokens, quiet[3]) if untouched else None

    def dead_latents(self, dead_tokens: int) -> torch.Tensor:
        """Indices of the latents silent for more than ``dead_tokens`` training tokens (sorted).

        Read from the device (a host sync on a GPU) only when a latent may have died since the last read: a read
        that finds none also notes how many more tokens every latent can stay silent without dying
        (``dead_tokens`` minus the longest silence); while :meth:`record_firing` has counted no more than that,
        and nothing else wrote the counts (their tensor and its version are checked), none can be dead, and the
        answer is known without a read. A read made ahead for the same counts (:func:`read_dead_sets`, once a
        step for all of a module's SAEs) is used as is. Exact: the same set as reading the counts at every
        step."""
        self._dead_tokens = dead_tokens
        known = self._known_dead(dead_tokens)
        if known is None:
            read_dead_sets([self])
            known = self._known_dead(dead_tokens)
        return known

    def _known_dead(self, dead_tokens: int) -> torch.Tensor | None:
        """The dead set where it is known without a read (none can be dead, or a read of these very counts),
        else None."""
        tsf, quiet, dead = self.tokens_since_fired, self._quiet, self._dead
        none = quiet is not None and quiet[0] is tsf and quiet[1] == tsf._version and quiet[3] == dead_tokens
        if none and quiet[2] >= 0:
            return tsf.new_empty(0)
        if dead is not None and dead[0] is tsf and dead[1] == tsf._version and dead[2] == dead_tokens:
            return dead[3]
        return None

    def resample_period(self) -> int:
        """Steps between resampling passes (0: never)."""
        return int(self.hparams.get("resample_every") or 0)

    def resample_sample_tokens(self) -> int:
        """Fresh tokens over which a "fresh_density" criterion measures each feature's density."""
        raise NotImplementedError

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (unit-norm decoders)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            # grad -= (grad . w) w for w = W / |W|, as (grad . W) / |W|^2 times W, the update in place (one
            # [d_sae, d] temporary, inside vecdot, where three were); in the parameters' dtype: the step runs under
            # autocast (bf16-mixed), which would compute vecdot in bf16 and leave ~1% of the parallel part
            W, grad = self.W_dec, self.W_dec.grad
            with torch.autocast(W.device.type, enabled=False):
                coef = torch.linalg.vecdot(grad, W) / torch.linalg.vector_norm(W, dim=1).square()
            grad.addcmul_(coef[:, None], W, value=-1.0)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # ---------------------------------------------------------------------------------------------- export
    def export_extra(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Architecture-specific cfg keys and tensors for the SAELens layout (beyond the standard four)."""
        return {}, {}

    @torch.no_grad()
    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """SAELens cfg keys and tensors with the input scale folded in (``normalize_activations: none``)."""
        s = self.scale
        tensors = {
            "W_enc": (self.W_enc * s).contiguous(),
            "b_enc": self.b_enc.clone(),
            "W_dec": (self.W_dec / s).contiguous(),
            "b_dec": (self.b_dec / s).clone(),
        }
        extra_cfg, extra_tensors = self.export_extra()
        cfg = {
            "architecture": self.saelens_architecture or self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            **extra_cfg,
        }
        return cfg, {**tensors, **{k: v.clone() for k, v in extra_tensors.items()}}


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, averaged over the batch (one fused pass each way, no [B, d]
    temporaries of its own)."""
    return nn.functional.mse_loss(x_hat, x, reduction="sum") / max(1, x.numel() // x.shape[-1])


def extremes(*ts: torch.Tensor) -> torch.Tensor:
    """[2]: the smallest and the largest entry over all of ``ts``, on their device (not read back: no host sync),
    finite exactly when every entry is (``aminmax`` and ``minimum``/``maximum`` propagate NaN, and an inf is one
    of the two). One pass over each tensor, where ``isfinite(t).all()`` takes four kernels and writes a full-size
    mask first: 0.36 against 5.4 ms for [4,096, 512] on the CPU."""
    lo, hi = torch.aminmax(ts[0])
    for t in ts[1:]:
        lo_t, hi_t = torch.aminmax(t)
        lo, hi = torch.minimum(lo, lo_t), torch.maximum(hi, hi_t)
    return torch.stack([lo, hi])


@torch.no_grad()
def read_dead_sets(saes) -> None:
    """The dead sets of every SAE in ``saes`` that looked for its dead latents before (:meth:`SAE.dead_latents`, at
    the ``dead_tokens`` of that look) and cannot answer without a read, all found with one host read: each SAE's
    count of dead latents and longest silence, read together (``tolist``: one sync on a GPU, where a read per SAE
    would drain the GPU's queue once per SAE), then each set taken by ``nonzero_static`` at that count (no sync).
    The training step calls this before its SAEs' forwards; an SAE that never looks (no AuxK) is not read."""
    todo = [s for s in saes if s._dead_tokens is not None and s._known_dead(s._dead_tokens) is None]
    if not todo:
        return
    masks = [s.tokens_since_fired > s._dead_tokens for s in todo]
    stats = torch.stack([torch.stack([m.sum(), s.tokens_since_fired.max()]) for s, m in zip(todo, masks, strict=True)])
    for sae, mask, (n, longest) in zip(todo, masks, stats.tolist(), strict=True):  # the one read
        tsf, d = sae.tokens_since_fired, sae._dead_tokens
        sae.dead_reads += 1
        dead = torch.nonzero_static(mask, size=n).squeeze(1) if n else tsf.new_empty(0)
        # none dead: the longest silence says for how long none can die
        sae._quiet = None if n else (tsf, tsf._version, d - longest, d)
        sae._dead = (tsf, tsf._version, d, dead)


def linear_warmup(progress: float, warmup: float) -> float:
    return 1.0 if warmup <= 0 else min(1.0, progress / warmup)


def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of ``x``."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-6)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y
