"""Bringing dictionaries to the circuit stage: the paper's release layout (bare ae.pt), sparsify and SAELens
folders, a mapping; and the errors a researcher meets."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sfcd.circuits.data import batches
from sfcd.circuits.dictionaries import folders_in
from sfcd.circuits.effects import node_effects
from sfcd.config import compose
from sfcd.data.tasks import load_task
from sfcd.errors import InputError, MissingArtifactError
from sfcd.models.loading import load_model, load_tokenizer
from sfcd.models.sites import parse_site
from sfcd.paths import RunDir
from sfcd.sae.io import load_sae

D, F = 32, 64  # the micro model's width; the dictionaries' size


def autoencoder_state(seed: int, d: int = D) -> dict:
    """A dictionary_learning AutoEncoder state dict (the paper's ae.pt): encoder.weight [F, d], decoder [d, F]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(F, d, generator=g) / d**0.5,
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "decoder.weight": torch.randn(d, F, generator=g) / F**0.5,
        "bias": torch.randn(d, generator=g) * 0.1,
    }


class PaperAE(torch.nn.Module):
    """dictionary_learning's AutoEncoder formula, written out: f = relu(W_e (x - b) + b_e), x_hat = W_d f + b."""

    def __init__(self, s: dict):
        super().__init__()
        self.s, self.d_in, self.d_sae = s, s["bias"].shape[0], s["encoder.bias"].shape[0]

    def encode(self, x):
        return torch.relu((x - self.s["bias"]) @ self.s["encoder.weight"].T + self.s["encoder.bias"])

    def decode(self, f):
        return f @ self.s["decoder.weight"].T + self.s["bias"]


@pytest.fixture
def paper_dir(tmp_path):
    root = tmp_path / "dictionaries" / "pythia-like"
    for name, seed in (("resid_out_layer0", 0), ("mlp_out_layer1", 1), ("attn_out_layer0", 2)):
        (root / name / "10_64").mkdir(parents=True)
        torch.save(autoencoder_state(seed), root / name / "10_64" / "ae.pt")
    (root / "annotations").mkdir()  # not a site: ignored
    return root


def test_paper_layout_is_read_and_computes_the_papers_formula(own_run, test_saes, paper_dir):
    # catches: ae.pt refused without config.json, the paper's site names not mapped (resid_out_layer0 is
    # resid.0), the set folder not entered, the AutoEncoder's bias not subtracted before encoding, node effects
    # computed with another dictionary than the one given
    from sfcd.circuits.stage import find_circuit

    found = folders_in(paper_dir)
    assert {k: v.parent.name for k, v in found.items()} == {
        "resid.0": "resid_out_layer0",
        "mlp.1": "mlp_out_layer1",
        "attn.0": "attn_out_layer0",
    }
    x = torch.randn(5, D)
    sae, ref = load_sae(found["resid.0"]), PaperAE(autoencoder_state(0))
    torch.testing.assert_close(sae.encode(x), ref.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(ref.encode(x)), ref.decode(ref.encode(x)), atol=1e-5, rtol=1e-5)

    cfg = compose(
        [
            "experiment=test",
            f"run_dir={own_run.run_dir}",
            "circuit.sites=[resid.0,mlp.1]",
            f"circuit.dictionaries={paper_dir}",
            "circuit.n_examples=8",
            "circuit.baselines=false",
            "circuit.sweep_points=3",
        ]
    )
    out = find_circuit(cfg)
    meta = json.loads((out / "circuit.json").read_text())["metadata"]
    assert meta["dictionaries"] == {"resid.0": str(found["resid.0"]), "mlp.1": str(found["mlp.1"])}
    got = load_file(str(out / "node_effects.safetensors"))
    run = RunDir(own_run.run_dir)
    model, tok = load_model(run.root), load_tokenizer(run.root)
    for p in model.parameters():
        p.requires_grad_(False)
    dicts = {parse_site("resid.0"): PaperAE(autoencoder_state(0)), parse_site("mlp.1"): PaperAE(autoencoder_state(1))}
    task = load_task(run.task_file("nounpp", "train"), tok)
    rows = set(meta["pairs"]["discovery"]["rows"])  # the pairs the stage says it found the circuit on
    bs = batches(task, 8, cfg.circuit.batch_size, pairs=[p for p in task.pairs if p.index in rows])
    effs = [node_effects(model, dicts, b, cfg.circuit.method, cfg.circuit.steps) for b in bs]
    for s in dicts:
        expected = sum(e[s].ie_f.sum((0, 1)) for e in effs) / 8
        torch.testing.assert_close(got[f"{s.name}.features"], expected, atol=1e-5, rtol=1e-4)
        assert expected.abs().max() > 5e-5  # several times the tolerance: the comparison is not vacuous


def test_sparsify_and_saelens_folders_are_found_by_their_names(tmp_path, test_saes):
    # sparsify names a folder by the module it reads; a SAELens folder's cfg.json names a TransformerLens hook
    sp = tmp_path / "sparsify" / "gpt_neox.layers.0"
    sp.mkdir(parents=True)
    (sp / "cfg.json").write_text(json.dumps({"k": 4, "activation": "topk"}))
    save_file(
        {
            "encoder.weight": torch.randn(F, D),
            "encoder.bias": torch.zeros(F),
            "W_dec": torch.randn(F, D),
            "b_dec": torch.zeros(D),
        },
        str(sp / "sae.safetensors"),
    )
    lens = tmp_path / "sparsify" / "my_l1_mlp_sae"
    lens.mkdir()
    for f in ("sae_weights.safetensors", "sparsity.safetensors"):
        (lens / f).write_bytes((test_saes[1] / f).read_bytes())
    cfg = json.loads((test_saes[1] / "cfg.json").read_text())
    cfg.pop("metadata", None)
    cfg.pop("sfcd_site", None)
    (lens / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.1.hook_mlp_out"}))
    found = folders_in(tmp_path / "sparsify")
    assert found == {"resid.0": sp, "mlp.1": lens}
    assert load_sae(found["resid.0"]).d_sae == F


def test_bad_dictionaries_fail_in_one_line(test_run, test_saes, paper_dir, tmp_path):
    from sfcd.circuits.stage import find_circuit

    base = ["experiment=test", f"run_dir={test_run.run_dir}", "circuit.baselines=false", "circuit.sweep_points=2"]
    wide = tmp_path / "wide" / "resid_out_layer0" / "set"
    wide.mkdir(parents=True)
    torch.save(autoencoder_state(0, d=16), wide / "ae.pt")
    width = r"wide/resid_out_layer0/set: the SAE reads 16-dimensional.*resid.0 of this model is 32-dimensional"
    with pytest.raises(InputError, match=width):
        find_circuit(compose([*base, "circuit.sites=[resid.0]", f"circuit.dictionaries={tmp_path / 'wide'}"]))
    with pytest.raises(MissingArtifactError, match=r"no dictionary for sites \['mlp.0'\].*has \['attn.0', 'mlp.1'"):
        find_circuit(compose([*base, "circuit.sites=[resid.0,mlp.0]", f"circuit.dictionaries={paper_dir}"]))
    mapping = f"{{resid.0:{paper_dir / 'resid_out_layer0' / '10_64'}}}"
    with pytest.raises(MissingArtifactError, match=r"no dictionary for sites \['mlp.1'\] in the circuit.dictionaries"):
        find_circuit(compose([*base, "circuit.sites=[resid.0,mlp.1]", f"circuit.dictionaries={mapping}"]))
    junk = tmp_path / "junk" / "stuff"
    junk.mkdir(parents=True)
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no dictionary layout recognised"):
        find_circuit(compose([*base, "circuit.sites=[resid.0]", f"circuit.dictionaries={tmp_path / 'junk'}"]))
    odd = tmp_path / "odd" / "resid_out_layer0" / "set"
    odd.mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, odd / "ae.pt")
    with pytest.raises(InputError, match=r"no config.json, and its keys \['weights'\]"):
        find_circuit(compose([*base, "circuit.sites=[resid.0]", f"circuit.dictionaries={tmp_path / 'odd'}"]))


def test_faithfulness_curve_of_a_circuit_empty_at_every_threshold_is_drawn(tmp_path):
    """Catches: a log x axis over no positive node count (matplotlib raises), which stopped a study whose
    circuit at an early checkpoint had no node at any threshold."""
    from sfcd.circuits.picture import draw_curve

    paths = draw_curve({"features": [{"n_nodes": 0, "faithfulness": 0.0}] * 3}, tmp_path / "curve", "empty")
    assert [p.suffix for p in paths] == [".svg", ".png"] and all(p.stat().st_size > 0 for p in paths)
