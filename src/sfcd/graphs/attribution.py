"""Direct effects between the nodes of a prompt's attribution graph (circuit-tracer's ``attribute``).

Nodes: the active transcoder features (layer, position, latent, activation; none at position 0, which holds the
BOS token, as circuit-tracer zeroes it), one error node per (layer, position) (error = MLP output −
reconstruction; zero at position 0), one token node per position (its embedding) and the target logits (the
most probable next tokens, at most ``max_logits`` until their probabilities sum to ``logit_probability``; each
target is its logit minus the mean logit, read through the frozen final LayerNorm).

An edge from source ``s`` to target ``t`` is the direct effect in the local replacement model
(:mod:`sfcd.graphs.replacement`): the gradient of ``t`` (a feature's pre-activation ``W_enc,t · x`` at its MLP's
input, or a logit target's vector at the final LayerNorm's output) with respect to the residual stream where ``s``
writes, dotted with what ``s`` writes (a feature: ``a_s W_dec,s`` in raw units at its MLP's output; an error
node: its error vector; a token: its embedding). One backward pass gives a whole row (every source at once); the
prompt is repeated ``batch_size`` times in one forward pass and each copy carries one target, so one backward
pass gives ``batch_size`` rows.

The adjacency matrix has rows targets and columns sources, nodes ordered features, errors (layer by layer,
position by position), tokens, logits; only feature and logit rows are nonzero.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch

from sfcd.errors import InputError
from sfcd.graphs.prune import Layout, partial_influences
from sfcd.graphs.replacement import decoder_vectors, encoder_vectors, raw_skip, replacement
from sfcd.models.sites import n_layers
from sfcd.sae.transcoder import Transcoder

log = logging.getLogger(__name__)

#: positions whose features and errors are zeroed (circuit-tracer: the BOS token's, position 0)
ZERO_POSITIONS = slice(0, 1)


@dataclass
class Graph:
    """An unpruned attribution graph (what circuit-tracer's ``Graph`` holds)."""

    token_ids: torch.Tensor  # [T]
    features: torch.Tensor  # [F, 3] (layer, position, latent) of the attributed features, in that order
    activations: torch.Tensor  # [F]
    logit_ids: torch.Tensor  # [K] the target tokens, most probable first
    probabilities: torch.Tensor  # [K]
    adjacency: torch.Tensor  # [N, N] rows targets, columns sources
    layout: Layout
    n_active: int  # active features before max_feature_nodes
    timing: dict[str, float] = field(default_factory=dict)


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    """``prompt``'s token ids with a special token in front (circuit-tracer's ``ensure_tokenized``: the first
    position is ignored, so a BOS-like token takes it): the tokenizer's BOS, else PAD, EOS or any special id."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"graph.prompt={prompt!r} has no tokens; give a non-empty prompt")
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    if ids[0] in special:
        return torch.tensor(ids)
    candidates = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, *special]
    bos = next((c for c in candidates if c is not None), None)
    if bos is None:
        log.warning("the tokenizer has no special token to put first; the prompt's first token is ignored")
        return torch.tensor(ids)
    return torch.tensor([bos, *ids])


def compute_dtype(model) -> torch.dtype:
    """float64 for float64 models (tests), float32 otherwise: attribution is never done in half precision."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def logit_targets(
    logits: torch.Tensor, unembed: torch.Tensor, max_logits: int, probability: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, probabilities, demeaned unembedding rows [K, d]) of the most probable next tokens, at most
    ``max_logits`` until their cumulative probability reaches ``probability`` (circuit-tracer's salient logits)."""
    probs = torch.softmax(logits, dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_logits, probs.shape[-1]))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), probability)) + 1
    idx = top_idx[:cutoff]
    return idx, probs[idx], unembed[idx] - unembed.mean(0, keepdim=True)


@dataclass
class _Setup:
    """The prompt's features, errors and tokens, computed once (no gradients)."""

    logits: torch.Tensor  # [V] at the last position
    features: torch.Tensor  # [A, 3] (layer, position, latent)
    activations: torch.Tensor  # [A]
    encoders: torch.Tensor  # [A, d] raw-unit encoder directions
    decoders: torch.Tensor  # [A, d] a_s W_dec,s
    errors: torch.Tensor  # [L, T, d]
    embeddings: torch.Tensor  # [T, d]


@torch.no_grad()
def _setup(model, transcoders: list[Transcoder], ids: torch.Tensor) -> _Setup:
    with replacement(model, transcoders) as trace:
        logits = model(ids[None]).logits[0, -1]
    feats, acts, encs, decs, errs = [], [], [], [], []
    for layer, tc in enumerate(transcoders):
        x, y = trace.mlp_in[layer][0], trace.mlp_out[layer][0]
        f = tc.encode(x)
        f[ZERO_POSITIONS] = 0
        skip = raw_skip(tc, x)
        recon = tc.decode(f) + (0 if skip is None else skip)
        err = y - recon
        err[ZERO_POSITIONS] = 0
        errs.append(err)
        pos, lat = f.nonzero(as_tuple=True)  # row-major: by position, then latent
        a = f[pos, lat]
        feats.append(torch.stack([torch.full_like(pos, layer), pos, lat], dim=1))
        acts.append(a)
        encs.append(encoder_vectors(tc, lat))
        decs.append(decoder_vectors(tc, lat) * a[:, None])
    return _Setup(
        logits=logits,
        features=torch.cat(feats),
        activations=torch.cat(acts),
        encoders=torch.cat(encs),
        decoders=torch.cat(decs),
        errors=torch.stack(errs),
        embeddings=trace.embed[0].detach(),
    )


class _Rows:
    """Backward passes over one forward pass of the prompt repeated ``batch`` times: each call turns up to
    ``batch`` targets into their rows of direct effects on every source (features, errors, tokens)."""

    def __init__(self, model, transcoders: list[Transcoder], ids: torch.Tensor, setup: _Setup, batch: int):
        self.setup = setup
        self.n_layers = len(transcoders)
        self.n_pos = ids.shape[0]
        self.batch = batch
        self._ctx = replacement(model, transcoders)
        self.trace = self._ctx.__enter__()
        try:
            with torch.enable_grad():
                self.final = model.base_model(input_ids=ids[None].expand(batch, -1), use_cache=False)[0]
        except BaseException:
            self.close()
            raise
        # sources grouped by where they write: (layer, position) -> their columns
        self.groups = []
        f = setup.features
        for layer in range(self.n_layers):
            for pos in range(self.n_pos):
                cols = ((f[:, 0] == layer) & (f[:, 1] == pos)).nonzero(as_tuple=True)[0]
                if len(cols):
                    self.groups.append((layer, pos, cols))
        self.n_cols = len(f) + (self.n_layers + 1) * self.n_pos

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)
        self.trace = self.final = None

    def __call__(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Rows [k, n_cols] for targets at ``layers`` (``n_layers``: the final LayerNorm's output, else the
        MLP input of that layer), ``positions``, read along ``vectors`` [k, d]."""
        k = len(layers)
        assert k <= self.batch
        rows_idx = torch.arange(k, device=vectors.device)
        with torch.enable_grad():
            total = vectors.new_zeros(())
            for layer in layers.unique().tolist():
                m = layers == layer
                t = self.final if layer == self.n_layers else self.trace.mlp_in[layer]
                total = total + (t[rows_idx[m], positions[m]] * vectors[m]).sum()
            grads = torch.autograd.grad(
                total,
                [*self.trace.mlp_out, self.trace.embed],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        s = self.setup
        out = vectors.new_zeros(k, self.n_cols)
        for layer, pos, cols in self.groups:
            out[:, cols] = grads[layer][:k, pos] @ s.decoders[cols].t()
        e0 = len(s.features)
        for layer in range(self.n_layers):
            start = e0 + layer * self.n_pos
            out[:, start : start + self.n_pos] = (grads[layer][:k] * s.errors[layer]).sum(-1)
        t0 = e0 + self.n_layers * self.n_pos
        out[:, t0:] = (grads[-1][:k] * s.embeddings).sum(-1)
        return out


def attribute(
    model,
    transcoders: list[Transcoder],
    token_ids: torch.Tensor,
    *,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    batch_size: int = 256,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
) -> Graph:
    """The unpruned attribution graph of the prompt ``token_ids`` [T] (its first position the BOS token, see
    :func:`tokenize`) for ``model`` with one transcoder per MLP, in layer order.

    Attribution runs in float32 (float64 for a float64 model): a bfloat16/float16 model is copied to float32
    first, and the transcoders are moved to the model's device and that dtype. ``max_feature_nodes`` caps the
    features attributed (as circuit-tracer: the most influential first, ranked every ``update_interval``
    batches from the rows so far); ``batch_size`` targets share one backward pass."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    dtype = compute_dtype(model)
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    transcoders = [tc.to(device=device, dtype=dtype) for tc in transcoders]
    n_l = n_layers(model)
    ids = token_ids.to(device).reshape(-1)
    n_pos = len(ids)

    setup = _setup(model, transcoders, ids)
    unembed = model.get_output_embeddings().weight.to(dtype)
    logit_ids, probs, logit_vecs = logit_targets(setup.logits, unembed, max_logits, logit_probability)
    n_active, n_logits = len(setup.features), len(logit_ids)
    n_feat = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    t_setup = time.perf_counter()

    batch = max(1, min(batch_size, max(n_logits, n_feat)))
    rows = _Rows(model, transcoders, ids, setup, batch)
    n_cols = rows.n_cols
    edges = torch.zeros(n_feat + n_logits, n_cols + n_logits, dtype=dtype, device=device)
    row_nodes = torch.zeros(n_feat + n_logits, dtype=torch.long, device=device)
    try:
        for i in range(0, n_logits, batch):
            j = min(i + batch, n_logits)
            k = j - i
            edges[i:j, :n_cols] = rows(
                torch.full((k,), n_l, device=device), torch.full((k,), n_pos - 1, device=device), logit_vecs[i:j]
            )
            row_nodes[i:j] = torch.arange(i, j, device=device) + n_cols
        t_logits = time.perf_counter()
        st = n_logits
        visited = torch.zeros(n_active, dtype=torch.bool, device=device)
        n_visited = 0
        while n_visited < n_feat:
            if n_feat == n_active:
                pending = torch.arange(n_active, device=device)
            else:
                influence = partial_influences(edges[:st], probs, row_nodes[:st])
                rank = torch.argsort(influence[:n_active], descending=True)
                pending = rank[~visited[rank]][: min(update_interval * batch, n_feat - n_visited)]
            for chunk in pending.split(batch):
                f = setup.features[chunk]
                edges[st : st + len(chunk), :n_cols] = rows(f[:, 0], f[:, 1], setup.encoders[chunk])
                row_nodes[st : st + len(chunk)] = chunk
                visited[chunk] = True
                st += len(chunk)
                n_visited += len(chunk)
    finally:
        rows.close()
    t_features = time.perf_counter()

    selected = visited.nonzero(as_tuple=True)[0]
    layout = Layout(n_features=n_feat, n_layers=n_l, n_pos=n_pos, n_logits=n_logits)
    cols = torch.cat([selected, torch.arange(n_active, n_cols + n_logits, device=device)])
    edges = edges[:, cols][row_nodes.argsort()]  # features in order (row node ids), then the logits
    adjacency = torch.zeros(layout.n_nodes, layout.n_nodes, dtype=dtype, device=device)
    adjacency[:n_feat] = edges[:n_feat]
    adjacency[layout.logit_start :] = edges[n_feat:]
    return Graph(
        token_ids=ids,
        features=setup.features[selected],
        activations=setup.activations[selected],
        logit_ids=logit_ids,
        probabilities=probs,
        adjacency=adjacency,
        layout=layout,
        n_active=n_active,
        timing={
            "setup_s": t_setup - t_start,
            "logits_s": t_logits - t_setup,
            "features_s": t_features - t_logits,
            "total_s": time.perf_counter() - t_start,
        },
    )
