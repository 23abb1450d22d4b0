"""Host synchronisations of a training step, counted on the CPU: every op that would make the host wait for a GPU
(a scalar read: ``item``/``tolist``/``int``/``bool`` of a tensor; ``nonzero``; boolean-mask indexing or writes;
``masked_select``; ``bincount``; ``unique``; ``repeat_interleave`` without a size) is caught under a
``TorchDispatchMode`` (``tolist``, which reads CPU memory without an op, by wrapping it), with the function that
asked. A GPU step is only as fast as its host reads allow; this is their count without one."""

import traceback

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sfcd.config import compose
from sfcd.sae.train import SAEModule, make_specs, train_module

aten = torch.ops.aten
#: aten ops that read a GPU tensor back to the host (or size their output from its values)
SYNCING = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


def asker() -> str:
    """The innermost sfcd function on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/sfcd/" in frame.filename:
            return frame.name
    return "?"


class Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indexing = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)
        masked = indexing and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in SYNCING or masked:
            self.found.append((func.__name__, asker()))
        return func(*args, **(kwargs or {}))


class CountReads(L.Callback):
    """The host reads of every training step (``per_step``), from batch start to batch end."""

    def __init__(self, monkeypatch):
        self.per_step: list[list[tuple[str, str]]] = []
        self.monkeypatch = monkeypatch

    def on_train_batch_start(self, *args):
        self.mode = Reads()
        self.mode.__enter__()
        tolist, found = torch.Tensor.tolist, self.mode.found

        def counted(t):
            found.append(("tolist", asker()))
            return tolist(t)

        self.monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def on_train_batch_end(self, *args):
        self.monkeypatch.undo()
        self.mode.__exit__(None, None, None)
        self.per_step.append(self.mode.found)


class Dead(L.Callback):
    """The first latents of every SAE counted dead at every step (AuxK runs)."""

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, *args):
        for sae in module.saes:
            sae.tokens_since_fired[:16] = 10**12


def steps_reads(arch: str, monkeypatch, dead: bool = False) -> list[list[tuple[str, str]]]:
    cfg = compose(
        [f"sae.architecture={arch}", "sae.batch_size=256", "sae.d_sae=256", "sae.k=8", "sae.checkpoint_every=0"]
    )
    acts = np.random.default_rng(0).standard_normal((2048, 32), dtype=np.float32)
    module = SAEModule(make_specs(cfg.sae, {"a": 32, "b": 32}), cfg.sae, 12)
    reads = CountReads(monkeypatch)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        train_module(module, cfg.trainer, Path(tmp), {"a": acts, "b": acts}, [*([Dead()] if dead else []), reads])
    return reads.per_step


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_a_step_reads_the_device_only_at_the_logging_interval(arch, monkeypatch):
    # catches: a host read per SAE in the step (AuxK's dead set read at every step, a check read per SAE, an
    # isfinite inside an if, mask indexing, a bincount), or the NaN/inf checks read at every step, any of which on
    # a GPU stalls the step, so the host can no longer queue the next step's work while the GPU runs this one
    per_step = steps_reads(arch, monkeypatch)
    assert len(per_step) == 12
    for step, found in enumerate(per_step):
        expected = []
        if step in (9, 11):  # log_every_n_steps = 10, and the run's last step: the checks' flags with every
            expected = [("tolist", "check_finite")]  # SAE's MSE and L0, one read
        if step == 0 and "topk" in arch:  # AuxK's first look at the silence counts, per SAE (none has looked
            # before, so none is read ahead): the count of dead latents and the longest silence in one read (none
            # dead: no other look is needed for a while)
            expected = [("tolist", "read_dead_sets")] * 2 + expected
        assert sorted(found) == sorted(expected), (step, found)


def test_the_count_sees_auxks_reads_while_latents_are_dead(monkeypatch):
    # the positive control: with dead latents AuxK's dead sets are read at every step, and on the CPU the most
    # positive dead latents a row has (AuxK's slots, per SAE; not read elsewhere), so a counter that saw nothing
    # would fail here. Catches also a read per SAE (the sets not read ahead, together, by the step) and a second
    # read of a set's size (nonzero) while latents are dead
    per_step = steps_reads("topk", monkeypatch, dead=True)
    for found in per_step[1:]:
        found = [f for f in found if f != ("tolist", "check_finite")]  # at the logging interval, as without AuxK
        assert sorted(found) == sorted(
            [("tolist", "read_dead_sets")] + [("_local_scalar_dense.default", "aux_loss")] * 2
        )


class Silences(L.Callback):
    """At every step's start, new silence counts for every SAE (written in place, as ``record_firing`` does): half
    of the latents dead at most steps, none at every third; the dead sets they make, by a plain ``nonzero``."""

    def __init__(self):
        self.expected: list[list[torch.Tensor]] = []
        self.gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, *args):
        sets = []
        for sae in module.saes:
            d = sae.hparams["dead_tokens"]
            top = d if len(self.expected) % 3 == 2 else 2 * d
            counts = torch.randint(0, top + 1, (sae.d_sae,), generator=self.gen)
            sae.tokens_since_fired.copy_(counts)
            sets.append((counts > d).nonzero().squeeze(1))
        self.expected.append(sets)


def test_the_dead_sets_read_ahead_are_those_of_the_steps_own_counts(monkeypatch, tmp_path):
    # catches: a dead set read ahead (read_dead_sets) and used at a later step, after the counts changed (the
    # counts' version not checked), or one SAE's set given to another
    from sfcd.sae.base import SAE

    seen: list[tuple[int, torch.Tensor]] = []
    look = SAE.dead_latents

    def spy(self, dead_tokens):
        out = look(self, dead_tokens)
        seen.append((id(self), out.clone()))
        return out

    monkeypatch.setattr(SAE, "dead_latents", spy)
    over = ["sae.architecture=topk", "sae.batch_size=128", "sae.d_sae=128", "sae.k=4", "sae.dead_tokens=1000"]
    cfg = compose([*over, "sae.checkpoint_every=0"])
    acts = np.random.default_rng(0).standard_normal((1024, 16), dtype=np.float32)
    module = SAEModule(make_specs(cfg.sae, {"a": 16, "b": 16, "c": 16}), cfg.sae, 9)
    silences = Silences()
    train_module(module, cfg.trainer, tmp_path, {n: acts for n in "abc"}, [silences])
    assert len(seen) == 9 * 3 and len(silences.expected) == 9
    for step, sets in enumerate(silences.expected):
        for i, (sae, want) in enumerate(zip(module.saes, sets, strict=True)):
            who, got = seen[3 * step + i]
            assert who == id(sae) and torch.equal(got, want), (step, i)
    assert sum(len(s) == 0 for sets in silences.expected for s in sets) == 9  # every third step: none dead


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_dead_sets_of_several_saes_take_one_sync():
    # catches (on a GPU): a sync per SAE (a nonzero, not nonzero_static at the count read), or a second read for
    # the longest silence, each of which CUDA's sync debug mode reports
    import warnings

    from sfcd.sae.base import read_dead_sets
    from sfcd.sae.registry import sae_class

    saes = [sae_class("topk")(32, 256, seed=i, k=8).cuda() for i in range(3)]
    for sae in saes:
        sae.dead_latents(100)  # the first looks, each its own read
    gen = torch.Generator().manual_seed(0)
    counts = [torch.randint(0, 200, (256,), generator=gen) for _ in saes]
    counts[1].clamp_(max=100)  # none dead at the second: its longest silence is read too
    for sae, c in zip(saes, counts, strict=True):
        sae.tokens_since_fired.copy_(c)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            read_dead_sets(saes)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    for sae, c in zip(saes, counts, strict=True):
        assert torch.equal(sae.dead_latents(100).cpu(), (c > 100).nonzero().squeeze(1))
    assert saes[1]._quiet is not None and saes[1]._quiet[2] == 100 - int(counts[1].max())


class DeviceElsewhere(L.Callback):
    """From the first step on, the module reports a device whose tensors cannot be read back: ``meta``. A tensor
    Lightning makes on the module's device (``self.log`` of a number does) then stands for one on a GPU, whose
    every read is a host sync: here it raises instead of syncing."""

    def on_train_start(self, trainer, module):
        module._device = torch.device("meta")


def test_the_progress_bar_never_reads_a_device_tensor(tmp_path):
    # catches: the progress bar's values logged as numbers or device tensors: Lightning keeps the last logged value
    # and its bar reads it (.item()) at every step after the first logging step, a host sync per step on a GPU
    cfg = compose(["sae.architecture=relu", "sae.batch_size=256", "sae.d_sae=64", "sae.checkpoint_every=0"])
    acts = np.random.default_rng(0).standard_normal((1024, 16), dtype=np.float32)
    module = SAEModule(make_specs(cfg.sae, {"a": 16}), cfg.sae, 13)
    trainer = train_module(module, cfg.trainer, tmp_path, {"a": acts}, [DeviceElsewhere()]).trainer
    bar = trainer.progress_bar_metrics  # what the bar showed: the values of the last logging step (step 10)
    assert bar["a/mse"] > 0 and bar["a/l0"] > 0 and trainer.global_step == 13
