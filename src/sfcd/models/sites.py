"""Sites: friendly names for places in a model whose activations sfcd reads or replaces.

``embed``, ``attn.<l>`` (attention output), ``mlp_in.<l>`` (what the MLP reads: the residual stream after its
layer norm, weight and bias included; circuit-tracer's ``mlp.hook_in``; a transcoder's input), ``mlp.<l>`` (MLP output),
``resid.<l>`` (the block's output, the residual stream after layer l) and ``mlp_act.<l>`` (the MLP's hidden
activations). They map to modules of plain ``transformers`` models (GPT-NeoX/Pythia, GPT-2); reading and
replacing go through forward hooks (``mlp_in``: a pre-hook on the MLP, whose first argument it is), and one
forward pass feeds every requested site and stops after the last layer it needs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sfcd.errors import ConfigError

KINDS = ("embed", "attn", "mlp", "resid", "mlp_act", "mlp_in")
#: kinds read at their module's input (a forward pre-hook), not its output
INPUT_KINDS = ("mlp_in",)

# module path templates per architecture ({l} is the layer)
_PATHS = {
    "gpt_neox": {
        "embed": "gpt_neox.embed_in",
        "attn": "gpt_neox.layers.{l}.attention",
        "mlp": "gpt_neox.layers.{l}.mlp",
        "resid": "gpt_neox.layers.{l}",
        "mlp_act": "gpt_neox.layers.{l}.mlp.act",
        "mlp_in": "gpt_neox.layers.{l}.mlp",
    },
    "gpt2": {
        "embed": "transformer.drop",
        "attn": "transformer.h.{l}.attn",
        "mlp": "transformer.h.{l}.mlp",
        "resid": "transformer.h.{l}",
        "mlp_act": "transformer.h.{l}.mlp.act",
        "mlp_in": "transformer.h.{l}.mlp",
    },
}
_NAME = re.compile(r"^(embed)$|^(attn|mlp|resid|mlp_act|mlp_in)\.(\d+)$")


@dataclass(frozen=True)
class Site:
    name: str
    kind: str
    layer: int  # -1 for embed

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass (layer, then attn/mlp_in/mlp_act/mlp before the block output)."""
        return (self.layer, {"embed": 0, "attn": 1, "mlp_in": 2, "mlp_act": 3, "mlp": 4, "resid": 5}[self.kind])


def architecture(model) -> str:
    kind = getattr(model.config, "model_type", "")
    if kind not in _PATHS:
        raise ConfigError(f"sfcd knows the sites of {sorted(_PATHS)} models, not {kind!r}")
    return kind


def site_of_module(path: str) -> str | None:
    """The site whose output is the module at ``path`` (``gpt_neox.layers.3.mlp`` -> ``mlp.3``), for any known
    architecture; None when no site is."""
    for paths in _PATHS.values():
        for kind, template in paths.items():
            if kind in INPUT_KINDS:  # the module's output is another site (mlp_in's module is the MLP)
                continue
            m = re.match("^" + re.escape(template).replace(r"\{l\}", r"(\d+)") + "$", path)
            if m:
                return kind if kind == "embed" else f"{kind}.{m.group(1)}"
    return None


def parallel_blocks(model) -> bool:
    """Whether attention and MLP of a layer read the same residual stream (GPT-NeoX's ``use_parallel_residual``,
    Pythia's default) rather than the MLP reading the stream after attention (GPT-2, GPT-NeoX without it)."""
    return architecture(model) == "gpt_neox" and bool(getattr(model.config, "use_parallel_residual", True))


def reaches(up: Site, down: Site, parallel: bool) -> bool:
    """Whether ``up``'s output is an input of ``down`` (through the residual stream or the MLP's inside)."""
    if up.order >= down.order:
        return False
    if down.layer > up.layer or up.kind in ("embed", "resid"):
        return True
    # the same layer: attn -> mlp_in/mlp_act/mlp only in sequential blocks; mlp_in -> mlp_act -> mlp; anything ->
    # resid
    if down.kind == "resid":
        return True
    if up.kind == "attn":
        return not parallel
    return up.kind in ("mlp_in", "mlp_act")


def n_layers(model) -> int:
    return model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer


def valid_sites(model) -> list[str]:
    n = n_layers(model)
    return ["embed"] + [f"{k}.{l}" for l in range(n) for k in ("attn", "mlp", "resid", "mlp_act", "mlp_in")]


def parse_site(name: str, model=None) -> Site:
    """A :class:`Site` from its name; an unknown name (or layer beyond the model) lists the valid ones."""
    m = _NAME.match(name.strip())
    n = n_layers(model) if model is not None else None
    if not m or (n is not None and m.group(3) is not None and int(m.group(3)) >= n):
        kinds = "embed, attn.<l>, mlp.<l>, resid.<l>, mlp_act.<l>, mlp_in.<l>"
        valid = ", ".join(valid_sites(model)) if model is not None else kinds
        raise ConfigError(f"unknown site {name!r}; valid sites: {valid}")
    if m.group(1):
        return Site("embed", "embed", -1)
    return Site(name.strip(), m.group(2), int(m.group(3)))


#: the kinds ``all`` stands for (with ``embed``)
DEFAULT_KINDS = ("attn", "mlp", "resid")


def expand_sites(names: list[str], model) -> list[Site]:
    """Site names, with ``all`` meaning ``embed`` and every layer's ``attn``, ``mlp`` and ``resid``, and a kind
    alone (``resid``, ``attn``, ``mlp``, ``mlp_act``, ``mlp_in``) meaning that kind at every layer."""
    out: list[str] = []
    kinds = {"attn", "mlp", "resid", "mlp_act", "mlp_in"}
    for n in names:
        if n == "all":
            out += [s for s in valid_sites(model) if s == "embed" or s.split(".")[0] in DEFAULT_KINDS]
        elif n in kinds:
            out += [f"{n}.{layer}" for layer in range(n_layers(model))]
        else:
            out.append(n)
    if not out:
        raise ConfigError("the list of sites is empty; name sites (e.g. sites=[resid.0,mlp.1]) or use [all]")
    return [parse_site(n, model) for n in dict.fromkeys(out)]


def site_module(model, site: Site) -> torch.nn.Module:
    path = _PATHS[architecture(model)][site.kind].format(l=site.layer)
    return model.get_submodule(path)


def mlp_input_site(site: Site) -> Site:
    """The site a transcoder of MLP output ``site`` (``mlp.<l>``) reads: ``mlp_in.<l>``."""
    if site.kind != "mlp":
        raise ConfigError(f"a transcoder replaces an MLP: its site is mlp.<l>, not {site.name!r}")
    return Site(f"mlp_in.{site.layer}", "mlp_in", site.layer)


#: the layer norm before each architecture's MLP ({l}: the layer): what ``mlp_in.<l>`` is the output of
_MLP_NORMS = {"gpt_neox": "gpt_neox.layers.{l}.post_attention_layernorm", "gpt2": "transformer.h.{l}.ln_2"}


def mlp_norm(model, layer: int) -> torch.nn.Module:
    """The layer norm whose output the MLP of ``layer`` reads (``mlp_in.<layer>``)."""
    return model.get_submodule(_MLP_NORMS[architecture(model)].format(l=layer))


def site_dim(model, site: Site) -> int:
    c = model.config
    if site.kind == "mlp_act":
        return getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
    return c.hidden_size


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


class StopForward(Exception):
    """Raised by a hook after the last needed site, to skip the rest of the forward pass."""


@contextlib.contextmanager
def hooks(model, fns: dict[Site, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Forward hooks at each site: ``fn(activation)`` may return a replacement for the site's activation (its
    module's output; for ``mlp_in``, the MLP's input), which is cast to the activation's dtype (a float32
    dictionary spliced into a bfloat16/float16 model). At one module an input site's hook runs before the
    output site's (a transcoder's splice reads ``mlp_in.<l>`` and replaces ``mlp.<l>``)."""
    handles = []

    def make(fn):
        def hook(module, inputs, output):
            old = _first(output)
            new = fn(old)
            return None if new is None else _with_first(output, new.to(old.dtype))

        return hook

    def make_pre(fn):
        def pre_hook(module, args):
            if not args:
                raise RuntimeError(
                    f"{type(module).__name__} was called without a positional input; sfcd reads and replaces an "
                    "MLP's input as its first positional argument (as GPT-NeoX and GPT-2 call it)"
                )
            old = args[0]
            new = fn(old)
            return None if new is None else (new.to(old.dtype), *args[1:])

        return pre_hook

    try:
        for site, fn in fns.items():
            module = site_module(model, site)
            if site.kind in INPUT_KINDS:
                handles.append(module.register_forward_pre_hook(make_pre(fn)))
            else:
                handles.append(module.register_forward_hook(make(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_cache(
    model, input_ids: torch.Tensor, sites: list[Site], stop_early: bool = True
) -> dict[str, torch.Tensor]:
    """Activations at ``sites`` from one forward pass, stopping after the last site when ``stop_early``."""
    cache: dict[str, torch.Tensor] = {}
    last = max(sites, key=lambda s: s.order)

    def grab(site: Site):
        def fn(act: torch.Tensor):
            cache[site.name] = act.detach()
            if stop_early and site == last and len(cache) == len(sites):
                raise StopForward
            return None

        return fn

    with hooks(model, {s: grab(s) for s in sites}), contextlib.suppress(StopForward):
        model(input_ids)
    return cache
