"""The TopK and BatchTopK training losses, on both paths (the fast sparse one: only active latents in the decoder
and the backward; the dense one), against the loss written out here from the papers (Gao et al. 2024, Bussmann
et al. 2024), differentiated by autograd."""

import pytest
import torch

from sfcd.sae.registry import sae_class

K, D_IN, D_SAE, B = 4, 16, 64, 96


def written_out(arch: str, p: dict, x: torch.Tensor, dead: torch.Tensor, aux_coeff: float = 1 / 32):
    """loss = ||x - x_hat||^2 (summed over dims, mean over the batch) + aux_coeff x AuxK, with
    x_hat = f W_dec + b_dec, f = relu(pre) on the kept latents, pre = (x - b_dec) W_enc + b_enc; TopK keeps each
    row's k largest pre-activations (those > 0 fire), BatchTopK the batch's k x B largest positive ones. AuxK:
    each row's top k_aux = d_in / 2 dead latents reconstruct the residual (detached), scaled by
    min(n_dead / k_aux, 1)."""
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if arch == "topk":
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(K, dim=1).indices, True)
    else:
        kth = pre.flatten().topk(K * len(x)).values[-1]
        keep = (pre >= kth) & (pre > 0)
    f = torch.relu(pre) * keep
    x_hat = f @ p["W_dec"] + p["b_dec"]
    mse = (x_hat - x).pow(2).sum(1).mean()
    k_aux = D_IN // 2
    masked = pre.detach().masked_fill(~dead, float("-inf"))
    aux_keep = torch.zeros_like(keep).scatter(1, masked.topk(k_aux, dim=1).indices, True)
    e_hat = (torch.relu(pre) * aux_keep) @ p["W_dec"]
    aux = min(int(dead.sum()) / k_aux, 1.0) * (e_hat - (x - x_hat).detach()).pow(2).sum(1).mean()
    fired = f > 0
    return {
        "loss": mse + aux_coeff * aux,
        "mse": mse,
        "aux": aux,
        "l0": fired.sum() / len(x),
        "keep": keep,
        "fired": fired,
    }


@pytest.mark.parametrize("aux_slots_read", [None, False])
@pytest.mark.parametrize("aux_over_dead_columns", [False, True])
@pytest.mark.parametrize("dead_bias", [0.0, -3.0])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_and_dense_paths_equal_the_written_out_loss(
    arch, dead_bias, aux_over_dead_columns, aux_slots_read, monkeypatch
):
    """Loss, MSE, AuxK, L0, the latents that fired, every gradient, and (BatchTopK) the inference threshold set
    to the smallest kept activation. Bugs caught: BatchTopK keeping k per batch instead of k x B, or a per-row
    top-k; b_dec not subtracted before the encoder; AuxK over live latents or unscaled; a wrong sparse backward.
    Both paths share the selection, so comparing them with each other cannot see the first three. With the dead
    latents' bias at -3 most rows hold fewer positive dead latents than k_aux (AuxK then keeps fewer slots, as
    many as the row with the most): a slot count below some row's positives would drop its terms. AuxK both ways
    on the sparse path: its own sparse kernels, or dense over the dead latents' columns (a kept-slot mask
    misplaced, or the dead columns of W_enc and W_dec taken in different orders, would show). AuxK's slots cut
    to the rows' positives as read from the device (the CPU's default), or not read (elsewhere: k_aux slots, the
    spare ones relu'd to 0; more slots than k_aux, or fewer than a row's positives, would show)."""
    from sfcd.sae.topk import TopKSAE

    monkeypatch.setattr(TopKSAE, "dense_aux_ratio", 10**6 if aux_over_dead_columns else 0)
    monkeypatch.setattr(TopKSAE, "aux_slots_read", aux_slots_read)
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(0)) * 2
    g = torch.Generator().manual_seed(1)
    for sparse in (True, False):
        sae = sae_class(arch)(D_IN, D_SAE, seed=3, k=K, sparse=sparse, dead_tokens=10)
        with torch.no_grad():  # a b_dec and b_enc away from 0, so that their place in the formula shows
            sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.5)
            sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
            sae.b_enc[:20] += dead_bias
        sae.tokens_since_fired[:20] = 1000  # some dead latents: the AuxK path runs too
        p = {k: getattr(sae, k).detach().clone().requires_grad_(True) for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
        want = written_out(arch, p, x, sae.tokens_since_fired > 10)
        want["loss"].backward()
        out = sae.training_loss(x, 0.5)
        out["loss"].backward()
        assert want["aux"].item() > 0 and want["mse"].item() > 0
        for key in ("loss", "mse", "aux", "l0"):
            torch.testing.assert_close(out[key].detach(), want[key].detach(), atol=1e-5, rtol=1e-5, msg=key)
        assert torch.equal(out["fired"], want["fired"].any(0)), sparse
        for name, q in p.items():
            torch.testing.assert_close(sae.grad_of(name), q.grad, atol=1e-5, rtol=1e-4, msg=name)
        if arch == "batchtopk":
            pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
            assert float(sae.threshold) == pytest.approx(float(pre[want["keep"]].min()), rel=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_the_fused_adam_step_copies_no_weight_matrix(arch):
    """Each weight matrix and its gradient reach the fused Adam contiguous and in the same layout, so its step
    updates them in place, and no weight-sized copy is made in the backward either. Bugs caught: the encoder
    stored transposed as a strided parameter (the fused kernel then copies it, its gradient and both moments to
    contiguous memory and back on every step: 11 ms of a ~450 ms step at d_sae 8,192); a gradient produced in
    another layout than its parameter (autograd copies it into the parameter's: the dense encoder as ``x @
    W_enc``, whose gradient is [d_in, d_sae]). ``W_enc`` still reads in SAELens's orientation and writes through
    to the parameter."""
    torch.manual_seed(0)
    sae = sae_class(arch)(D_IN, D_SAE, seed=0, k=K, dead_tokens=10, l1_coeff=1e-3, l0_coeff=1e-3)
    assert sae.W_enc.shape == (D_IN, D_SAE)
    with torch.no_grad():
        sae.W_enc[2, 5] = 7.0
    assert sae.W_enc_T[5, 2] == 7.0
    sae.tokens_since_fired[:20] = 1000  # AuxK too
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    for _ in range(2):  # the second step has the moments in place
        opt.zero_grad()
        with torch.profiler.profile(record_shapes=True) as prof:
            sae.training_loss(torch.randn(B, D_IN), 0.5)["loss"].backward()
            for p in sae.parameters():
                assert p.grad is not None and p.grad.stride() == p.stride() and p.is_contiguous(), (arch, p.shape)
            opt.step()
    big = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert not [e for e in big if any(list(s) in ([D_IN, D_SAE], [D_SAE, D_IN]) for s in e.input_shapes)], arch


def test_the_decoder_projection_holds_under_bf16_autocast():
    """The gradient along each decoder row is removed to float32 precision inside a bf16-mixed step (Lightning
    runs the whole training step, ``before_step`` included, under autocast). Bug caught: the row dot products
    computed by an op autocast runs in bf16 (``linalg.vecdot``), which leaves ~1% of the parallel part."""
    sae = sae_class("topk")(64, 256, seed=0, k=K)
    g = torch.Generator().manual_seed(0)
    sae.W_dec.grad = torch.randn(256, 64, generator=g) * 8
    want = sae.W_dec.grad - (sae.W_dec.grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec  # unit rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sae.before_step()
    assert sae.W_dec.grad.dtype == torch.float32
    torch.testing.assert_close(sae.W_dec.grad, want, atol=1e-4, rtol=1e-4)


def test_dead_latents_are_read_from_the_device_only_when_one_may_have_died():
    # catches: a "none can be dead" answer kept after a latent died (the silence left not shrinking with the tokens
    # counted, or set from dead_tokens instead of the longest silence), or kept after another write to the counts
    # (the bench's, a resample's, a resumed state's); and a read at every step where none is needed
    sae = sae_class("topk")(D_IN, D_SAE, k=K, dead_tokens=100)
    found, steps = [], 90
    for step in range(steps):
        if step == 70:  # written from outside (as a resample or a resumed state does)
            sae.tokens_since_fired[50] = 10**6
        got = sae.dead_latents(100)
        exact = (sae.tokens_since_fired > 100).nonzero().squeeze(1)
        assert torch.equal(got, exact), step
        found.append(len(got))
        fired = torch.zeros(D_SAE, dtype=torch.bool)
        fired[step % 2 :: 2] = True  # every latent fires every other step: silent for 10 tokens at most
        if 20 <= step < 45:
            fired[5] = False  # silent from step 20: dead after 100 tokens (steps 31 to 45), fires again at 45
        if step == 84:  # written between a read and the step's count (the last read: step 81)
            sae.tokens_since_fired[61] = 10**6  # (61 does not fire at an even step)
        sae.record_firing(fired, 10)
    assert found[31] == 1 and found[30] == 0 and found[70] == 1 and found[85] == 1 and found[83] == 0
    # the quiet stretches need one read per 9 steps (the longest silence is 10 tokens of 100); a step with a dead
    # latent reads every time
    dead_steps = sum(1 for n in found if n)
    assert dead_steps + 3 <= sae.dead_reads < dead_steps + 0.2 * (steps - dead_steps), (sae.dead_reads, dead_steps)


def test_a_copy_reads_its_own_dead_latents():
    # catches: a copy (deepcopy, or a pickle as ddp_spawn makes) keeping the last read's dead set, keyed by the
    # counts' version, which the copied tensor starts again from 0: as many writes to the copy's counts as the
    # original had make the version match, and the stale set would be returned
    import copy

    sae = sae_class("topk")(D_IN, D_SAE, k=K, dead_tokens=100)
    for _ in range(3):
        sae.tokens_since_fired += 40  # three writes: 120 tokens, all dead
    assert len(sae.dead_latents(100)) == D_SAE
    twin = copy.deepcopy(sae)
    with torch.no_grad():
        twin.tokens_since_fired.zero_()
        for _ in range(3 - twin.tokens_since_fired._version):
            twin.tokens_since_fired.add_(0)
    assert twin.tokens_since_fired._version == sae.tokens_since_fired._version  # what a stale read would match
    assert len(twin.dead_latents(100)) == 0 and len(sae.dead_latents(100)) == D_SAE
