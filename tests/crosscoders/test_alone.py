"""Checkpoint m alone: the crosscoder's view of one checkpoint takes nothing token-specific from another.

The case with a known answer (issue 20, item 3): checkpoint B is a small GPT-NeoX trained here to make a verb agree
in number with the first token of its prefix; checkpoint A is B with every attention output projection zeroed (all
heads of its one layer: no head could then carry the subject's number to the last position, whichever head did, so
A provably cannot do the task: its last position is a function of its last token, the same in a pair's clean and
patch prefix). A crosscoder over [A, B] at resid.0 must then show no agreement circuit at A. The joint view (the
other checkpoints' encoder terms computed on the clean tokens and held fixed, the code before this change, kept as
an opt-in) fails the same checks: B's number reaches A's latents at the last position, and A gets a circuit."""

from __future__ import annotations

import copy

import pytest
import torch

from sfcd.circuits.data import PairBatch
from sfcd.circuits.effects import node_effects
from sfcd.circuits.evaluate import Faithfulness
from sfcd.crosscoders.io import checkpoint_sae, load_crosscoder, save_crosscoder
from sfcd.crosscoders.reading import Accumulator
from sfcd.crosscoders.view import JointView
from sfcd.models.sites import hooks, parse_site, run_with_cache
from tests.crosscoders.quick import fit

SG, PL, FILL, V_SG, V_PL = [1, 2, 3], [4, 5, 6], list(range(7, 13)), 13, 14
SITE = parse_site("resid.0")


def _sequences(n: int, g: torch.Generator) -> torch.Tensor:
    """[noun, filler x 3, verb]: the verb is V_SG after a singular noun, V_PL after a plural one."""
    plural = torch.randint(2, (n,), generator=g).bool()
    noun = torch.where(
        plural,
        torch.tensor(PL)[torch.randint(3, (n,), generator=g)],
        torch.tensor(SG)[torch.randint(3, (n,), generator=g)],
    )
    fill = torch.tensor(FILL)[torch.randint(len(FILL), (n, 3), generator=g)]
    return torch.cat([noun[:, None], fill, torch.where(plural, V_PL, V_SG)[:, None]], 1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    B = GPTNeoXForCausalLM(cfg)
    opt = torch.optim.Adam(B.parameters(), lr=3e-3)
    for _ in range(150):
        s = _sequences(128, g)
        loss = torch.nn.functional.cross_entropy(B(s[:, :-1]).logits[:, -1], s[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    B.eval().requires_grad_(False)
    A = copy.deepcopy(B)
    for layer in A.gpt_neox.layers:
        layer.attention.dense.weight.data.zero_()
        layer.attention.dense.bias.data.zero_()
    prefixes = _sequences(2048, g)[:, :-1]
    acts = torch.cat([run_with_cache(m, prefixes, [SITE])["resid.0"].reshape(-1, 32) for m in (A, B)], 1)
    cc = fit(acts, 2, m=64, k=4, steps=200, batch=512)
    acc = Accumulator(cc, blocks=1)
    acc.add(acts)
    with torch.no_grad():
        cc.block_mean.copy_(acc.means().reshape(-1))
    folder = save_crosscoder(cc, tmp_path_factory.mktemp("cc") / "resid.0", {"steps": [1, 2], "site": "resid.0"})
    # the evaluation pairs: each prefix with a singular and with a plural noun, both ways round
    fills = torch.tensor(FILL)[torch.randint(len(FILL), (64, 3), generator=g)]
    sg = torch.cat([torch.tensor(SG)[torch.randint(3, (64,), generator=g)][:, None], fills], 1)
    pl = torch.cat([torch.tensor(PL)[torch.randint(3, (64,), generator=g)][:, None], fills], 1)
    batch = PairBatch(
        clean=torch.cat([sg, pl]),
        patch=torch.cat([pl, sg]),
        clean_answer=torch.tensor([V_SG] * 64 + [V_PL] * 64),
        patch_answer=torch.tensor([V_PL] * 64 + [V_SG] * 64),
    )
    return A, B, folder, batch


def _numbers(model, view, batch: PairBatch) -> dict:
    """What a circuit on ``view`` at ``model`` sees: the latents' largest change at the last position between
    clean and patch prefixes, the node effects (attribution, summed over positions, mean over pairs: the circuit
    stage's aggregation), the latents above the 0.1 node threshold, and F(C) - F(empty) with C every latent (no
    error node)."""
    fs = []
    with torch.no_grad():
        for ids in (batch.clean, batch.patch):
            seen = {}

            def grab(a, seen=seen):
                seen["f"] = view.encode(a)

            with hooks(model, {SITE: grab}):
                model(ids)
            fs.append(seen["f"][:, -1])
    eff = node_effects(model, {SITE: view}, batch, method="attrib")[SITE].ie_f.sum(1).mean(0)
    F = Faithfulness(model, {SITE: view}, [batch], "mean")
    r = F({SITE: (torch.ones(view.d_sae, dtype=torch.bool), False)})
    return {
        "last_position_change": float((fs[0] - fs[1]).abs().max()),
        "total_effect": float(eff.abs().sum()),
        "nodes": int((eff.abs() > 0.1).sum()),
        "F_C_minus_empty": r["F_C"] - r["F_empty"],
        "F_M_minus_empty": r["F_M"] - r["F_empty"],
        "resolvable": r.get("resolvable", True),
    }


def test_checkpoint_without_number_heads_has_no_agreement_circuit_alone(pair):
    """Bug caught: any token-specific term from another checkpoint in checkpoint m's latents (the joint view's
    clean-token encoder terms, the code before this change). Measured (seed 0): B's total node effect 5.03, five
    latents over the threshold, F(M) - F(empty) 6.20; A alone: 0, no latent, F(C) - F(empty) 0 and unresolvable;
    A through the joint view: latents that change by 3.7 at the last position (whose activation is identical in
    the pair), total node effect 1.33 (26% of B's), five latents over the threshold, F(C) - F(empty) -0.008."""
    from sfcd.circuits.dictionaries import _crosscoder_view

    A, B, folder, batch = pair
    cc = load_crosscoder(folder)
    b = _numbers(B, checkpoint_sae(cc, 1), batch)
    assert b["F_M_minus_empty"] > 3 and b["nodes"] >= 1  # B does the task, through the crosscoder's latents
    view_a = _crosscoder_view(A, SITE, folder, 1, {})  # the circuit stage's dictionary of A (step 1, block 0)
    a = _numbers(A, view_a, batch)
    assert _no_circuit(a, b), a
    # the same checks on the joint view (the code before this change) fail, by a wide margin: B's number reaches A
    jv = JointView(cc, 0, SITE, {1: B})
    handle = jv.attach(A)
    try:
        old = _numbers(A, jv, batch)
    finally:
        handle.remove()
    assert not _no_circuit(old, b)
    assert old["last_position_change"] > 0.5 and old["total_effect"] > 0.03 * b["total_effect"], old


def _no_circuit(a: dict, b: dict) -> bool:
    """No agreement circuit at A: its latents do not change where its activation does not, no node effect, no
    latent over the node threshold, and neither F(C) nor F(M) moves away from F(empty) (relative to B's F(M))."""
    scale = b["F_M_minus_empty"]
    return (
        a["last_position_change"] < 1e-5
        and a["total_effect"] < 1e-3 * b["total_effect"]
        and a["nodes"] == 0
        and abs(a["F_C_minus_empty"]) < 0.01 * scale
        and abs(a["F_M_minus_empty"]) < 0.01 * scale
    )
