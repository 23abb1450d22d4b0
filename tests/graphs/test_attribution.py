"""The replacement model's hooks and the direct effects, against an independently written replacement forward."""

from __future__ import annotations

import pytest
import torch

from sfcd.graphs.attribution import attribute, logit_targets
from sfcd.graphs.replacement import decoder_vectors, encoder_vectors, replacement
from tests.graphs.hand import hand_forward, record, writes
from tests.graphs.helpers import tiny, transcoders

IDS = torch.tensor([0, 5, 7, 9, 11, 3, 21])


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_hooks_keep_the_forward_and_leave_the_model_unchanged(kind):
    # catches: a hook that changes a value (e.g. the frozen LayerNorm returned without its bias, or the MLP's
    # output replaced by the reconstruction without its error), or hooks / requires_grad flags left behind
    model = tiny(kind)
    tcs = transcoders(model)
    flags = [p.requires_grad for p in model.parameters()]
    n_hooks = _hooks(model)
    with torch.no_grad():
        before = model(IDS[None]).logits
    with replacement(model, tcs):
        inside = model(IDS[None]).logits
    with torch.no_grad():
        after = model(IDS[None]).logits
    assert torch.equal(inside.detach(), before)
    assert torch.equal(after, before)
    assert _hooks(model) == n_hooks
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_replacement_forward_with_every_error_node_is_the_model(kind):
    # the independent forward (recorded patterns and LayerNorm scales, transcoder reconstruction + error per MLP)
    # gives the model's logits: it checks the hand forward itself, and that reconstruction + error is the MLP
    # catches (in the hand forward's inputs): errors computed without the skip path or without b_dec
    model = tiny(kind)
    tcs = transcoders(model)
    rec = record(model, IDS)
    feats, acts, errs, rems = writes(tcs, rec, zero_first=False)
    assert rems.abs().max() < 1e-12
    ones = torch.ones
    _, final = hand_forward(
        model, tcs, IDS, rec, feats, (acts, errs, rems), ones(len(feats)), ones(errs.shape[:2]), ones(len(IDS))
    )
    logits = final @ model.get_output_embeddings().weight.t()
    torch.testing.assert_close(logits, rec.logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["neox", "gpt2"])
@pytest.mark.parametrize("skip", [True, False])
def test_direct_effects_equal_the_jacobian_of_an_independent_forward(kind, skip):
    # catches: LayerNorm scales or q/k left live, the skip path detached, decoder vectors without out_scale or
    # encoder vectors without scale, logit vectors not demeaned, errors at position 0 not zeroed, rows or columns
    # out of order, targets read at the wrong position
    model = tiny(kind)
    tcs = transcoders(model, skip=skip)
    graph = attribute(model, tcs, IDS, batch_size=7, max_logits=5, logit_probability=0.99)
    rec = record(model, IDS)
    feats, acts, errs, rems = writes(tcs, rec)
    assert torch.equal(graph.features, feats)
    torch.testing.assert_close(graph.activations, acts, rtol=0, atol=1e-12)
    L, T = errs.shape[:2]
    unembed = model.get_output_embeddings().weight
    ids, probs, vecs = logit_targets(rec.logits[-1], unembed, 5, 0.99)
    assert torch.equal(graph.logit_ids, ids)
    torch.testing.assert_close(vecs, unembed[ids] - unembed.mean(0))
    torch.testing.assert_close(probs.sum(), torch.softmax(rec.logits[-1], -1)[ids].sum())

    A = len(feats)

    def targets(m):
        pre, final = hand_forward(
            model, tcs, IDS, rec, feats, (acts, errs, rems), m[:A], m[A : A + L * T].view(L, T), m[A + L * T :]
        )
        return torch.cat([pre, final[-1] @ vecs.t()])

    ones = torch.ones(A + L * T + T, dtype=torch.float64)
    jac = torch.func.jacfwd(targets)(ones)  # [A + K, sources]
    lay = graph.layout
    got = torch.cat([graph.adjacency[: lay.n_features], graph.adjacency[lay.logit_start :]])[:, : lay.logit_start]
    torch.testing.assert_close(got, jac, rtol=1e-9, atol=1e-10)
    assert graph.adjacency[lay.n_features : lay.logit_start].abs().sum() == 0  # error/token rows are empty
    assert graph.adjacency[:, lay.logit_start :].abs().sum() == 0  # nothing reads from a logit
    assert jac[:, A : A + L * T].view(-1, L, T)[:, :, 0].abs().sum() == 0  # the BOS errors are zero


def test_raw_unit_vectors_match_the_export():
    # catches: encoder directions without the input scale, decoder rows without the output scale
    tc = transcoders(tiny())[0]
    t = tc.export()[1]
    lat = torch.tensor([3, 0, 7])
    torch.testing.assert_close(encoder_vectors(tc, lat), t["W_enc"][:, lat].t())
    torch.testing.assert_close(decoder_vectors(tc, lat), t["W_dec"][lat])


def test_max_feature_nodes_keeps_rows_of_the_full_graph():
    # catches: rows of a capped graph written to the wrong feature, or columns not restricted to the kept features
    model = tiny()
    tcs = transcoders(model)
    full = attribute(model, tcs, IDS, batch_size=4)
    capped = attribute(model, tcs, IDS, batch_size=4, max_feature_nodes=9, update_interval=1)
    assert capped.layout.n_features == 9 and capped.n_active == full.n_active
    keep = torch.tensor([int(((full.features == f).all(1)).nonzero()) for f in capped.features])
    cols = torch.cat([keep, torch.arange(full.layout.n_features, full.layout.n_nodes)])
    rows = torch.cat([keep, torch.arange(full.layout.logit_start, full.layout.n_nodes)])
    sub = full.adjacency[rows][:, cols]
    lay = capped.layout
    mine = torch.cat([capped.adjacency[: lay.n_features], capped.adjacency[lay.logit_start :]])
    torch.testing.assert_close(mine, sub, rtol=1e-9, atol=1e-12)
    # the features kept are the most influential by the logit rows' direct effects (the first ranking)
    assert capped.features[:, 1].min() >= 1


def test_half_precision_model_is_attributed_in_float32():
    # catches: attribution run in bfloat16 (or a float32 copy that does not match the bfloat16 weights)
    model = tiny(dtype=torch.bfloat16)
    tcs = transcoders(model)
    graph = attribute(model, tcs, IDS, batch_size=8)
    assert graph.adjacency.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16  # the caller's model is not changed
    ref = attribute(model.float(), [tc.float() for tc in tcs], IDS, batch_size=8)
    torch.testing.assert_close(graph.adjacency, ref.adjacency)
