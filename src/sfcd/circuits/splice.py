"""Running a model with dictionaries spliced in at sites, error nodes included, through forward hooks.

At a spliced site the output x becomes ``decode(f) + err`` with ``f = encode(x)`` and ``err = x - decode(f)``,
which leaves the model's output unchanged. For gradients, ``f`` and ``err`` are made independent leaves
(otherwise the gradient with respect to ``f`` cancels through ``err``). A site can also be given fixed
values of ``f``/``err`` (patching, interpolation, ablation) or have its output detached (a stop-gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sfcd.models.sites import Site, hooks


class Identity(nn.Module):
    """The neuron baseline's dictionary: features are the site's own coordinates, and the error is zero."""

    def __init__(self, d: int):
        super().__init__()
        self.d_in = self.d_sae = d

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f


@dataclass
class SiteState:
    """What a spliced site saw and held in one forward pass."""

    f: torch.Tensor | None = None
    err: torch.Tensor | None = None


@dataclass
class Splice:
    """How each site behaves in one forward pass.

    ``leaves``: sites whose f/err become grad-requiring leaves (their natural values, or ``values[site]``); the
    gradient of the site's output also passes on to its input unchanged, so upstream leaves see the total
    derivative through downstream sites (as feature-circuits' attribution patching).
    ``values``: fixed (f, err) to use at a site, or a function of the natural (f, err) returning new ones.
    ``graph``: sites whose f/err stay functions of the input (downstream nodes of an edge computation).
    ``stop``: sites whose output is detached.
    """

    dictionaries: dict[Site, nn.Module]
    leaves: set[Site] = field(default_factory=set)
    values: dict[Site, tuple | Callable] = field(default_factory=dict)
    graph: set[Site] = field(default_factory=set)
    stop: set[Site] = field(default_factory=set)
    states: dict[Site, SiteState] = field(default_factory=dict)

    def _hook(self, site: Site):
        d = self.dictionaries.get(site)

        def fn(x: torch.Tensor) -> torch.Tensor | None:
            st = self.states.setdefault(site, SiteState())
            if d is None:
                return x.detach() if site in self.stop else None
            if site in self.graph:
                f = d.encode(x)
                err = x - d.decode(f)
            else:
                with torch.no_grad():
                    f = d.encode(x)
                    err = x - d.decode(f)
            v = self.values.get(site)
            if v is not None:
                f, err = v(f, err) if callable(v) else v
            if site in self.leaves:
                f, err = f.detach().clone().requires_grad_(True), err.detach().clone().requires_grad_(True)
            st.f, st.err = f, err
            out = d.decode(f) + err
            if site in self.leaves:  # the value is decode(f) + err; the gradient also flows on to x, unchanged
                out = out + (x - x.detach())
            return out.detach() if site in self.stop else out

        return fn

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[Splice]:
        sites = set(self.dictionaries) | self.stop
        self.states = {}
        with hooks(model, {s: self._hook(s) for s in sites}):
            yield self


def last_logits(model, x: torch.Tensor, splice: Splice | None = None) -> torch.Tensor:
    """Logits at the last position, [batch, vocab], with ``splice`` applied."""
    if splice is None:
        return model(x).logits[:, -1]
    with splice.applied(model):
        return model(x).logits[:, -1]
