import pytest

from sfcd.errors import MissingArtifactError, OfflineError
from sfcd.models.loading import load_model, load_tokenizer, resolve
from sfcd.paths import RunDir


def test_resolve_run_dir_folder_and_hub_id(test_run):
    run = RunDir(test_run.run_dir)
    assert resolve(run.root).path == str(run.model_step(24))  # the last step by default
    assert resolve(run.root, 4).path == str(run.model_step(4))
    assert resolve(run.model_step(8)).path == str(run.model_step(8))
    hub = resolve("EleutherAI/pythia-70m-deduped", 3000)
    assert (hub.path, hub.revision, hub.is_local) == ("EleutherAI/pythia-70m-deduped", "step3000", False)


def test_missing_step_lists_the_existing_ones(test_run):
    with pytest.raises(MissingArtifactError, match=r"no checkpoint step 3 .* \[0, 1, 2, 4, 8, 16, 24\]"):
        load_model(test_run.run_dir, step=3)


def test_hub_id_offline_says_it_needs_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="needs the network"):
        load_model("EleutherAI/pythia-70m-deduped", step=3000)
    with pytest.raises(OfflineError, match="revision step3000"):
        load_tokenizer("EleutherAI/pythia-70m-deduped", step=3000)


def test_folder_without_a_model(tmp_path):
    with pytest.raises(MissingArtifactError, match="neither config.json"):
        load_model(tmp_path)
    with pytest.raises(MissingArtifactError, match="does not exist"):
        load_model(tmp_path / "nope" / "deeper")


def test_save_pretrained_folder_round_trip(tmp_path):
    """The hub path is the same from_pretrained call: a Pythia-shaped model saved locally loads back."""
    import torch
    from omegaconf import OmegaConf

    from sfcd.models.presets import neox_config

    cfg = OmegaConf.create(
        dict(
            n_layers=1,
            d_model=16,
            n_heads=2,
            d_mlp=32,
            rotary_pct=0.25,
            max_position=32,
            seq_len=16,
            attn_implementation="eager",
        )
    )
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    m = GPTNeoXForCausalLM(neox_config(cfg, 50)).eval()
    m.save_pretrained(tmp_path / "pythia-like")
    loaded = load_model(tmp_path / "pythia-like")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, m(x).logits)
    assert loaded.config.use_parallel_residual and not loaded.config.tie_word_embeddings
