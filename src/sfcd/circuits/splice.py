"""Running a model with dictionaries spliced in at sites, error nodes included, through forward hooks.

At a spliced site the output x becomes ``decode(f) + err`` with ``f = encode(x)`` and ``err = x - decode(f)``,
which leaves the model's output unchanged. For gradients, ``f`` and ``err`` are made independent leaves
(otherwise the gradient with respect to ``f`` cancels through ``err``). A site can also be given fixed
values of ``f``/``err`` (patching, interpolation, ablation) or have its output detached (a stop-gradient).

A transcoder (``is_transcoder``) at ``mlp.<l>`` reads the MLP's input of the same forward pass (``mlp_in.<l>``, a
pre-hook that stores it): ``f = encode(x_in)``, ``err = x - reconstruct(x_in, f)`` and the output
``decode(f) + skip(x_in) + err``. Its nodes are ``f`` and ``err`` as for an SAE; the skip path is part of the
replacement, a linear route from upstream like the residual stream: it stays a function of ``x_in`` (gradients flow
through it to upstream nodes) even where the site's nodes are leaves or fixed or the site is a stop-gradient, and
it is recomputed from ``x_in`` when upstream nodes are ablated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sfcd.models.sites import Site, hooks, mlp_input_site


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
    x_in: torch.Tensor | None = None  # a transcoder's input (the MLP's, this forward pass)


def is_transcoder(d) -> bool:
    """Whether dictionary ``d`` maps an MLP's input to its output (a transcoder) rather than encoding one site."""
    return bool(getattr(d, "is_transcoder", False))


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
        tc = is_transcoder(d)

        def fn(x: torch.Tensor) -> torch.Tensor | None:
            st = self.states.setdefault(site, SiteState())
            if d is None:
                return x.detach() if site in self.stop else None
            x_in = st.x_in if tc else x  # what the dictionary encodes
            if tc and x_in is None:
                raise RuntimeError(f"transcoder at {site.name}: the MLP's input was not seen in this forward pass")
            x, x_in = _as_dictionary(x, d), _as_dictionary(x_in, d)  # the dictionary's math in its own dtype
            with contextlib.nullcontext() if site in self.graph else torch.no_grad():
                f = d.encode(x_in)
                err = x - (d.reconstruct(x_in, f) if tc else d.decode(f))
            v = self.values.get(site)
            if v is not None:
                f, err = v(f, err) if callable(v) else v
            if site in self.leaves:
                f, err = f.detach().clone().requires_grad_(True), err.detach().clone().requires_grad_(True)
            st.f, st.err = f, err
            out = d.decode(f) + err
            if site in self.stop:
                out = out.detach()
            if tc:  # the skip path: a function of x_in, except at a leaf, whose pass-through below carries it
                out = out + (d.skip(x_in).detach() if site in self.leaves else d.skip(x_in))
            if site in self.leaves and site not in self.stop:
                # the value is decode(f) (+ skip) + err; the gradient also flows on to the site's input unchanged
                # (a transcoder: through the MLP itself, whose output x is), as the model's own derivative
                out = out + (x - x.detach())
            return out

        return fn

    def _recorder(self, site: Site, before: Callable | None):
        """A pre-hook at ``mlp_in.<l>`` storing the MLP's input for the transcoder at ``site`` (after ``before``,
        a dictionary's own hook at ``mlp_in.<l>``, has replaced it)."""

        def fn(x: torch.Tensor) -> torch.Tensor | None:
            new = before(x) if before is not None else None
            self.states.setdefault(site, SiteState()).x_in = x if new is None else new
            return new

        return fn

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[Splice]:
        sites = set(self.dictionaries) | self.stop
        self.states = {}
        fns = {s: self._hook(s) for s in sites}
        for s, d in self.dictionaries.items():
            if is_transcoder(d):
                inp = mlp_input_site(s)
                fns[inp] = self._recorder(s, fns.get(inp))
        with hooks(model, fns):
            yield self


def _as_dictionary(x: torch.Tensor, d: nn.Module) -> torch.Tensor:
    """``x`` in the dictionary's dtype (float32 dictionaries in a bfloat16/float16 model; the hooks cast the
    replacement back to the model's dtype)."""
    w = getattr(d, "W_dec", None)
    return x if w is None or w.dtype == x.dtype else x.to(w.dtype)


def last_logits(model, x: torch.Tensor, splice: Splice | None = None) -> torch.Tensor:
    """Logits at the last position, [batch, vocab], with ``splice`` applied."""
    if splice is None:
        return model(x).logits[:, -1]
    with splice.applied(model):
        return model(x).logits[:, -1]
