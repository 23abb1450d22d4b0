"""One checkpoint's dictionary from a crosscoder, with the crosscoder's own latents: the circuit stage's (and the
spliced CE loss's) view.

The default is checkpoint m **alone** (:func:`alone_view`, the same SAE as :func:`sfcd.crosscoders.io.
checkpoint_sae`): ``encode(a^m) = act(a^m s_m W_enc^m + sum_{m' != m} E[a^{m'}] s_{m'} W_enc^{m'} + b_enc)``, the
other checkpoints at their mean activation over the crosscoder's data. It is a function of checkpoint m's
activation alone, so a circuit found at m, or a later circuit's latent ids scored at m, measure checkpoint m: no
token-specific information from another checkpoint reaches m's graph while m's nodes are ablated. It needs no
other model at circuit time (at pythia-70m's scale that is K - 1 fewer models on the device and no K - 1 extra
forward passes per batch).

:class:`JointView` (opt-in, ``load_dictionaries(..., crosscoder_view="joint")``) is the crosscoder's latent
itself: attached to checkpoint m's model, it sees the token ids of each forward pass (a forward pre-hook) and runs
the other checkpoints' models on the same ids (once per distinct batch, cached), adding
``sum_{m' != m} a^{m'} s_{m'} W_enc^{m'}`` computed on those tokens and held fixed while m's nodes are ablated.
Those terms carry the other checkpoints' information about the tokens into m's latents (Bayazit et al.'s
single-site relative indirect effects do this; for a multi-site circuit it mixes checkpoints): a latent kept in
m's circuit still receives a later checkpoint's share of its clean pre-activation. Use it to reproduce the joint
encoding, not to date a circuit.

Both decode with checkpoint m's decoder, ``(f W_dec^m + b_dec^m) / s_m``; a circuit's error node at the site is
what checkpoint m's reconstruction misses. Same latent id, same feature, at every checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from sfcd.crosscoders.model import Crosscoder
from sfcd.errors import SfcdError
from sfcd.models.sites import Site, run_with_cache

VIEWS = ("alone", "joint")


def alone_view(cc: Crosscoder, m: int) -> nn.Module:
    """Checkpoint ``m`` alone: an SAE on m's raw activations (the other checkpoints at their mean activation)."""
    from sfcd.crosscoders.io import checkpoint_sae

    return checkpoint_sae(cc, m).to(cc.W_enc.device)


class JointView(nn.Module):
    def __init__(self, cc: Crosscoder, m: int, site: Site, others: dict[int, nn.Module], cache_size: int = 8):
        super().__init__()
        self.cc, self.m, self.site, self.others = cc, m, site, others
        self.d_in, self.d_sae = cc.d, cc.d_sae
        self._tokens: torch.Tensor | None = None
        self._context: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def _blk(self, m: int) -> slice:
        return slice(m * self.cc.d, (m + 1) * self.cc.d)

    def attach(self, model: nn.Module):
        """Record the token ids of each forward pass of ``model`` (checkpoint m's); returns the hook's handle."""

        def grab(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                self._tokens = ids

        return model.register_forward_pre_hook(grab, with_kwargs=True)

    @torch.no_grad()
    def context(self, shape: torch.Size) -> torch.Tensor:
        """``sum_{m' != m} a^{m'} s_{m'} W_enc^{m'} + b_enc`` [*shape[:-1], d_sae] for the current tokens."""
        cc = self.cc
        if not self.others:
            return cc.b_enc
        ids = self._tokens
        if ids is None or tuple(ids.shape) != tuple(shape[:-1]):
            raise SfcdError(
                f"the crosscoder view of {self.site.name} got activations of shape {tuple(shape)} but the last "
                f"forward pass of its model had token ids of shape {None if ids is None else tuple(ids.shape)}; "
                "it only encodes activations of its own model's forward passes"
            )
        key = (tuple(ids.shape), hash(ids.detach().cpu().numpy().tobytes()))
        if key in self._context:
            self._context.move_to_end(key)
            return self._context[key]
        s = cc.block_scales()
        out = cc.b_enc.expand(*ids.shape, cc.d_sae).clone()
        for j, model in self.others.items():
            a = run_with_cache(model, ids, [self.site])[self.site.name].float()
            out += (a * s[j]) @ cc.W_enc[self._blk(j)]
        self._context[key] = out
        if len(self._context) > self._cache_size:
            self._context.popitem(last=False)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        cc = self.cc
        pre = (x * cc.block_scales()[self.m]) @ cc.W_enc[self._blk(self.m)] + self.context(x.shape)
        return cc.activation(pre)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        cc, b = self.cc, self._blk(self.m)
        return (f @ cc.W_dec[:, b] + cc.b_dec[b]) / cc.block_scales()[self.m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
