"""Node effects (indirect effects of features and error nodes on the metric) and edge effects between sites.

Per batch, for every site: the clean and patch values of (f, err), the gradient of the metric at them (at the
clean input for ``attrib``, averaged over the interpolation path for ``ig``), and the effects
``grad . (patch - clean)``; ``exact`` patches one node at a time and reruns. Edges follow the reference's
rules for parallel-attention blocks, with stop-gradients at the intermediate sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sfcd.circuits.data import PairBatch, metric
from sfcd.circuits.splice import Splice, is_transcoder, last_logits
from sfcd.errors import ConfigError
from sfcd.models.sites import Site, mlp_norm, reaches

METHODS = ("attrib", "ig", "exact")


@dataclass
class SiteEffects:
    """One site, one batch: values, deltas, gradients and effects, each [B, T, F] (errors: [B, T, d])."""

    f_clean: torch.Tensor
    err_clean: torch.Tensor
    delta_f: torch.Tensor
    delta_err: torch.Tensor
    grad_f: torch.Tensor | None
    grad_err: torch.Tensor | None
    ie_f: torch.Tensor  # [B, T, F]
    ie_err: torch.Tensor  # [B, T]


def site_values(model, dicts: dict[Site, nn.Module], x: torch.Tensor) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
    """(f, err) at every site on input ``x`` (no gradients)."""
    sp = Splice(dicts)
    with torch.no_grad(), sp.applied(model):
        model(x)
    return {s: (st.f, st.err) for s, st in sp.states.items()}


def _grads_at(model, dicts, batch: PairBatch, sites: list[Site], values: dict, reps: int = 1) -> dict:
    """Gradients of the summed metric with respect to (f, err) at ``sites``, set to ``values``, as leaves."""
    sp = Splice(dicts, leaves=set(sites), values=values)
    x = batch.clean.repeat(reps, 1)
    rep = PairBatch(
        x,
        None if batch.nopair else batch.patch.repeat(reps, 1),
        batch.clean_answer.repeat(reps),
        None if batch.nopair else batch.patch_answer.repeat(reps),
    )
    with sp.applied(model):
        m = metric(last_logits(model, x), rep).sum()
        leaves = [t for s in sites for t in (sp.states[s].f, sp.states[s].err)]
        grads = torch.autograd.grad(m, leaves)
    return {s: (grads[2 * i], grads[2 * i + 1]) for i, s in enumerate(sites)}


def node_effects(
    model,
    dicts: dict[Site, nn.Module],
    batch: PairBatch,
    method: str = "ig",
    steps: int = 10,
    edge_grads: bool = False,
    ig_batch: int | None = None,
) -> dict[Site, SiteEffects]:
    """Indirect effects of every feature and error node at every site, for one batch. ``edge_grads`` with
    ``method="exact"``: also IG's gradients (the edges' downstream gradients; exact patching has none)."""
    if method not in METHODS:
        raise ConfigError(f"unknown circuit method {method!r}; expected one of {list(METHODS)}")
    sites = list(dicts)
    clean = site_values(model, dicts, batch.clean)
    if batch.nopair:  # zero ablation is the patch
        patch = {s: (torch.zeros_like(f), torch.zeros_like(e)) for s, (f, e) in clean.items()}
    else:
        patch = site_values(model, dicts, batch.patch)
    out: dict[Site, SiteEffects] = {}
    deltas = {s: (patch[s][0] - clean[s][0], patch[s][1] - clean[s][1]) for s in sites}
    if method == "attrib":
        grads = _grads_at(model, dicts, batch, sites, {s: clean[s] for s in sites})
    elif method == "ig" or edge_grads:  # exact effects have no gradients: edges use IG's, as the paper does
        grads = {}
        B = len(batch)
        alphas = torch.arange(steps, dtype=clean[sites[0]][0].dtype, device=batch.clean.device) / steps  # 0, .1, .., .9
        per = max(1, (ig_batch or steps * B) // B)  # interpolation points per forward pass (bounds memory)
        for s in sites:  # each site separately: the others run as in the clean forward
            gf, ge = torch.zeros_like(clean[s][0]), torch.zeros_like(clean[s][1])
            for a0 in range(0, steps, per):
                k = min(per, steps - a0)
                a = alphas[a0 : a0 + k].repeat_interleave(B).view(-1, 1, 1)
                fc, ec = clean[s][0].repeat(k, 1, 1), clean[s][1].repeat(k, 1, 1)
                df, de = deltas[s][0].repeat(k, 1, 1), deltas[s][1].repeat(k, 1, 1)
                g = _grads_at(model, {s: dicts[s]}, batch, [s], {s: (fc + a * df, ec + a * de)}, reps=k)[s]
                gf += g[0].view(k, B, *g[0].shape[1:]).sum(0)
                ge += g[1].view(k, B, *g[1].shape[1:]).sum(0)
            grads[s] = (gf / steps, ge / steps)
    else:
        grads = {s: (None, None) for s in sites}
    for s in sites:
        df, de = deltas[s]
        if method == "exact":
            ie_f, ie_err = _exact(model, dicts, batch, s, clean[s], patch[s])
        else:
            ie_f, ie_err = grads[s][0] * df, (grads[s][1] * de).sum(-1)
        out[s] = SiteEffects(clean[s][0], clean[s][1], df, de, grads[s][0], grads[s][1], ie_f, ie_err)
    return out


@torch.no_grad()
def _exact(model, dicts, batch: PairBatch, s: Site, clean: tuple, patch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch one node (feature j at position t, or the error at t) from clean to patch value and rerun."""
    fc, ec = clean
    fp, ep = patch
    m0 = metric(last_logits(model, batch.clean, Splice({s: dicts[s]}, values={s: clean})), batch)
    ie_f = torch.zeros_like(fc)
    ie_err = torch.zeros(fc.shape[:2], dtype=fc.dtype, device=fc.device)
    T = fc.shape[1]
    for t in range(T):
        for j in ((fp[:, t] != fc[:, t]).any(0)).nonzero().flatten().tolist():
            f = fc.clone()
            f[:, t, j] = fp[:, t, j]
            ie_f[:, t, j] = (
                metric(last_logits(model, batch.clean, Splice({s: dicts[s]}, values={s: (f, ec)})), batch) - m0
            )
        e = ec.clone()
        e[:, t] = ep[:, t]
        ie_err[:, t] = metric(last_logits(model, batch.clean, Splice({s: dicts[s]}, values={s: (fc, e)})), batch) - m0
    return ie_f, ie_err


def compact(eff: dict[Site, SiteEffects]) -> dict[Site, SiteEffects]:
    """What edges need of one batch's effects, sparse: activations, deltas and node effects as sparse tensors
    (a dictionary's codes are sparse; deltas and effects vanish where neither input activates a feature), the
    features' gradients kept only where the feature is active on the clean input (elsewhere a downstream
    feature's value does not move, so its edges do not read the gradient). Errors stay dense ([B, T, d])."""
    out = {}
    for s, e in eff.items():
        active = e.f_clean != 0
        grad = None if e.grad_f is None else torch.where(active, e.grad_f, torch.zeros_like(e.grad_f)).to_sparse()
        out[s] = SiteEffects(
            e.f_clean.to_sparse(),
            e.err_clean,
            e.delta_f.to_sparse(),
            e.delta_err,
            grad,
            e.grad_err,
            e.ie_f.to_sparse(),
            e.ie_err,
        )
    return out


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_dense() if t is not None and t.is_sparse else t


# ------------------------------------------------------------------------------------------------------- edges
def _carries_all(up: Site, mid: Site, down: Site) -> bool:
    """Whether every path from ``up`` to ``down`` (``down`` None: the logits) passes through ``mid``: a
    ``resid`` site (the whole stream), ``mlp_act.l`` on the way into ``mlp.l``, ``mlp.l`` on the way out of
    ``mlp_act.l``."""
    if mid.kind == "resid":
        return True
    if mid.kind == "mlp_act":
        return down is not None and down.kind == "mlp" and down.layer == mid.layer
    return mid.kind == "mlp" and up.kind == "mlp_act" and up.layer == mid.layer


def edge_pairs(sites: list[Site], parallel: bool = True) -> list[tuple[Site, Site, set[Site]]]:
    """(upstream, downstream, stop) for the chosen ``sites`` of a residual network. An edge joins U to D when
    U's output is an input of D (:func:`reaches`; ``parallel`` blocks have no attn -> mlp path in a layer) and no
    chosen site between them carries every such path; the gradient is stopped at the chosen sites between them
    that lie on a path, whose own edges carry those paths. With the paper's sites in parallel blocks this gives
    its rules (resid_{l-1} -> attn_l, mlp_l, resid_l; attn_l, mlp_l -> resid_l; ``embed`` is resid_{-1});
    sequential blocks add attn_l -> mlp_l; a partial list joins each site to the next chosen ones it reaches."""
    order = sorted(sites, key=lambda s: s.order)
    pairs = []
    for i, up in enumerate(order):
        for down in order[i + 1 :]:
            if not reaches(up, down, parallel):
                continue
            on_path = {s for s in order if reaches(up, s, parallel) and reaches(s, down, parallel)}
            if not any(_carries_all(up, s, down) for s in on_path):
                pairs.append((up, down, on_path))
    return pairs


def y_pairs(sites: list[Site], parallel: bool = True) -> list[tuple[Site, set[Site]]]:
    """(site, stop) for the chosen sites whose output reaches the logits past every chosen site after it: each
    gets an edge to the metric y, with the gradient stopped at the chosen sites after it that it reaches (an
    empty stop: the edge is the site's node effect, as the paper's last resid -> y)."""
    order = sorted(sites, key=lambda s: s.order)
    out = []
    for i, up in enumerate(order):
        after = {s for s in order[i + 1 :] if reaches(up, s, parallel)}
        if not any(_carries_all(up, s, None) for s in after):
            out.append((up, after))
    return out


def edge_effects(
    model,
    dicts: dict[Site, nn.Module],
    batch: PairBatch,
    up: Site,
    down: Site,
    stop: set[Site],
    eff: dict[Site, SiteEffects],
    down_nodes: list,
    reference: bool = False,
    per_position: bool = False,
    item_threshold: float | None = None,
) -> torch.Tensor:
    """Edge weights from ``up``'s nodes (last column: its error node) to each of ``down_nodes``, summed over
    this batch's examples: [len(down_nodes), F_up + 1] summed over positions too, or with ``per_position``
    [len(down_nodes), T, F_up + 1] per upstream position. ``down_nodes`` are feature indices of ``down`` (-1:
    its error node), or (index, position) pairs for one downstream position each.

    Fast mode: one backward per downstream node of the summed scalar g_D . D_k (the sum over examples and
    positions is linear). Reference mode: one backward per (example, position, downstream node).
    ``item_threshold`` (the paper's rule): only the downstream node's (example, position) items whose own node
    effect exceeds it in size take part; otherwise all of them.
    """
    e_up = _dense_up(eff[up])
    sp = Splice(
        {up: dicts[up], down: dicts[down], **_skips(dicts, stop)},
        leaves={up},
        values={up: (e_up.f_clean, e_up.err_clean)},
        graph={down},
        stop=stop,
    )
    with sp.applied(model):
        model(batch.clean)
        fu, eu = sp.states[up].f, sp.states[up].err
        fd, ed = sp.states[down].f, sp.states[down].err
        gd_f, gd_e = dense(eff[down].grad_f), eff[down].grad_err
        ie_down = dense(eff[down].ie_f) if item_threshold is not None else None
        rows = []
        for node in down_nodes:
            k, t = node if isinstance(node, tuple) else (node, None)
            val = (gd_e * ed).sum(-1) if k < 0 else gd_f[..., k] * fd[..., k]  # [B, T]
            if item_threshold is not None:
                ie = eff[down].ie_err if k < 0 else ie_down[..., k]
                val = torch.where(ie.abs() > item_threshold, val, torch.zeros_like(val))
            if t is not None:
                val = val[:, t : t + 1]
            if reference:
                w = sum(_upstream_weights(v, fu, eu, e_up, per_position) for v in val.flatten())
            else:
                w = _upstream_weights(val.sum(), fu, eu, e_up, per_position)
            rows.append(w)
    shape = (fu.shape[1],) if per_position else ()
    return torch.stack(rows) if rows else torch.zeros(0, *shape, fu.shape[-1] + 1, device=fu.device)


def y_edge_effects(
    model,
    dicts: dict[Site, nn.Module],
    batch: PairBatch,
    up: Site,
    stop: set[Site],
    eff: dict[Site, SiteEffects],
    per_position: bool = False,
) -> torch.Tensor:
    """Edge weights [F_up + 1] (``per_position``: [T, F_up + 1]) from ``up``'s nodes to the metric y, summed
    over this batch's examples (and positions): the metric's gradient at the clean input with the gradient
    stopped at ``stop`` (the chosen sites after ``up`` that carry the other paths), times ``up``'s delta."""
    e_up = _dense_up(eff[up])
    sp = Splice(
        {up: dicts[up], **_skips(dicts, stop)}, leaves={up}, values={up: (e_up.f_clean, e_up.err_clean)}, stop=stop
    )
    with sp.applied(model):
        m = metric(last_logits(model, batch.clean), batch).sum()
        return _upstream_weights(m, sp.states[up].f, sp.states[up].err, e_up, per_position)


def _skips(dicts: dict[Site, nn.Module], stop: set[Site]) -> dict[Site, nn.Module]:
    """The transcoders among the stop sites: spliced in, so that their skip paths (no node's: a linear route
    like the residual stream) carry the gradient past the stop, which cuts their features' and error's."""
    return {s: dicts[s] for s in stop if is_transcoder(dicts.get(s))}


def _dense_up(e: SiteEffects) -> SiteEffects:
    """The upstream side of an edge computation, dense (its activations and deltas)."""
    return SiteEffects(dense(e.f_clean), e.err_clean, dense(e.delta_f), e.delta_err, None, None, e.ie_f, e.ie_err)


def _upstream_weights(
    scalar: torch.Tensor, fu: torch.Tensor, eu: torch.Tensor, up: SiteEffects, per_position: bool = False
) -> torch.Tensor:
    """grad(scalar) . delta for every upstream feature and the error node, summed over examples (and positions
    unless ``per_position``): [F + 1] or [T, F + 1]."""
    shape = (fu.shape[1], fu.shape[-1] + 1) if per_position else (fu.shape[-1] + 1,)
    if not scalar.requires_grad:
        return torch.zeros(shape, device=fu.device)
    gf, ge = torch.autograd.grad(scalar, [fu, eu], retain_graph=True, allow_unused=True)
    gf = torch.zeros_like(fu) if gf is None else gf
    ge = torch.zeros_like(eu) if ge is None else ge
    dims = 0 if per_position else (0, 1)
    w_f = (gf * up.delta_f).sum(dims)
    w_e = (ge * up.delta_err).sum(-1).sum(dims)
    return torch.cat([w_f, w_e.unsqueeze(-1)], -1).detach()


# ----------------------------------------------------------------------- transcoder -> transcoder edges, split
@torch.no_grad()
def norm_scales(model, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """1/sigma of the MLP's layer norm at each token of ``x`` ([B, T], float32) for each of ``layers``: the
    scale ``LN(r) = gamma (r - mean r) / sigma + beta`` applies on this input, read from the norm's own input
    in the model's forward pass."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for l in layers:
        norm = mlp_norm(model, l)

        def grab(module, args, output, l=l, eps=norm.eps):
            r = args[0].to(_wide(args[0].dtype))
            seen[l] = torch.rsqrt(r.var(-1, unbiased=False) + eps)

        handles.append(norm.register_forward_hook(grab))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def virtual_weights(model, dicts: dict[Site, nn.Module], up: Site, down: Site, down_feats, up_feats) -> torch.Tensor:
    """Dunefsky et al.'s input-invariant part of the edges from transcoder features ``up_feats`` of ``up``
    (``mlp.<l'>``) to ``down_feats`` of ``down`` (``mlp.<l>``, l > l'), [len(down_feats), len(up_feats)]: the
    upstream decoder row (raw units, what the feature writes to the residual stream per unit) through the
    downstream layer norm with its scale 1/sigma held (its centring and weight gamma; 1/sigma varies by token and
    sits in the activation part) into the downstream encoder column (raw units):
    ``V[i, i'] = (W_dec[i'] - mean W_dec[i']) . (gamma * W_enc[:, i])``. Only the chosen rows and columns are
    read (nothing of size d_sae^2), in float32 (at least)."""
    tu, td = dicts[up], dicts[down]
    dev, dt = tu.W_dec.device, _wide(tu.W_dec.dtype)
    dec = tu.W_dec[torch.as_tensor(up_feats, dtype=torch.long, device=dev)].to(dt) / tu.out_scale.to(dt)
    dec = dec - dec.mean(-1, keepdim=True)  # the layer norm's centring
    enc = td.W_enc[:, torch.as_tensor(down_feats, dtype=torch.long, device=dev)].to(dt) * td.scale.to(dt)
    norm = mlp_norm(model, down.layer)
    if norm.weight is not None:
        enc = enc * norm.weight.to(dt)[:, None]
    return (dec @ enc).t()


@torch.no_grad()
def direct_activations(
    inv_sigma: torch.Tensor,
    up: Site,
    down: Site,
    eff: dict[Site, SiteEffects],
    down_nodes: list,
    up_feats: list[int],
    per_position: bool = False,
    item_threshold: float | None = None,
) -> torch.Tensor:
    """The activation part of the direct (residual-stream) edges from transcoder features ``up_feats`` of ``up`` to
    ``down_nodes`` of ``down`` (as :func:`edge_effects` takes them; an error node's row is zero: it reads no
    encoder), summed over this batch's examples: [len(down_nodes), len(up_feats)], or per upstream position
    [len(down_nodes), T, len(up_feats)].

    A token's direct edge is g_D,i . 1[i active] . (1/sigma) . V[i, i'] . delta f_i' at that token (the path
    through the residual stream alone, one position, the layer norm's scale held at its value there); summing it,
    the activation part is the upstream feature's clean -> patch change weighted at each token by the downstream
    feature's gradient (zero where it is inactive: TopK passes no gradient) and the layer norm's scale, so that
    ``direct = virtual weight x activation``. ``inv_sigma`` [B, T]: :func:`norm_scales` of ``down``'s layer.
    ``item_threshold``: only the downstream items whose own effect exceeds it, as in :func:`edge_effects`."""
    g, f = dense(eff[down].grad_f), dense(eff[down].f_clean)
    ie = dense(eff[down].ie_f) if item_threshold is not None else None
    dt = _wide(g.dtype)
    delta = dense(eff[up].delta_f)[..., torch.as_tensor(up_feats, dtype=torch.long, device=g.device)].to(dt)
    inv_sigma = inv_sigma.to(dt)
    B, T = g.shape[:2]
    rows = []
    for node in down_nodes:
        k, t = node if isinstance(node, tuple) else (node, None)
        if k < 0:
            a = torch.zeros(B, T, dtype=dt, device=g.device)
        else:
            a = torch.where(f[..., k] != 0, g[..., k].to(dt) * inv_sigma, torch.zeros_like(inv_sigma))
            if item_threshold is not None:
                a = torch.where(ie[..., k].abs() > item_threshold, a, torch.zeros_like(a))
        if t is not None:  # one downstream position: the direct path reaches it from that position only
            a = torch.where(torch.arange(T, device=a.device) == t, a, torch.zeros_like(a))
        if per_position:
            rows.append(torch.einsum("bt,btu->tu", a, delta))
        else:
            rows.append(torch.einsum("bt,btu->u", a, delta))
    shape = (T, len(up_feats)) if per_position else (len(up_feats),)
    return torch.stack(rows) if rows else torch.zeros(0, *shape, dtype=dt, device=g.device)


def _wide(dt: torch.dtype) -> torch.dtype:
    """float32 at least (a bfloat16/float16 model's activations), float64 kept."""
    return torch.promote_types(dt, torch.float32)
