"""Language models: save/load round trip, safe loading of Hugging Face checkpoints."""

import json

import pytest
import torch

from helpers import make_config
from stagediff.errors import DataError
from stagediff.models.generation import greedy_complete
from stagediff.models.lm import load_model, save_model


def test_save_load_round_trip(tmp_path, model, tokenizer):
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m", tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 16))
    assert torch.equal(model(x), loaded(x))


def test_vocab_mismatch_is_refused(tmp_path, model, tokenizer):
    save_model(model, tmp_path / "m")
    spec = json.loads((tmp_path / "m/model.json").read_text())
    spec["d_vocab"] = 300
    (tmp_path / "m/model.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"vocabulary \(300\) is smaller than the tokenizer's"):
        load_model(tmp_path / "m", tokenizer)


def test_missing_model_dir(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no model here"):
        load_model(tmp_path, tokenizer)


# --- a local Hugging Face checkpoint, opened offline through TransformerBridge -------------

def test_hf_checkpoint_loads_and_matches_hugging_face(hf_checkpoint, tokenizer):
    from transformers import AutoModelForCausalLM

    bridge = load_model(hf_checkpoint, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_checkpoint))
    x = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        assert torch.allclose(bridge(x), hf(x).logits, atol=1e-4)
    _, cache = bridge.run_with_cache(x)
    assert cache["blocks.1.hook_resid_pre"].shape == (2, 12, 32)
    out = greedy_complete(bridge, tokenizer, ["Human: Hi\n\nAssistant:"], max_new_tokens=3, batch_size=1)
    assert isinstance(out[0], str)


def test_hf_fine_tune_saves_safetensors(tmp_path, hf_checkpoint, tokenizer):
    bridge = load_model(hf_checkpoint, tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 12))
    before = bridge(x).detach()
    opt = torch.optim.AdamW([p for p in bridge.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        bridge(x, return_type="loss").backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(bridge(x), before, atol=1e-3)  # the fine-tune changed the model
    save_model(bridge, tmp_path / "ft")
    assert list((tmp_path / "ft").glob("*.safetensors")) and not list((tmp_path / "ft").glob("*.bin"))
    again = load_model(tmp_path / "ft", tokenizer)
    with torch.no_grad():
        assert torch.allclose(again(x), bridge(x), atol=1e-5)


def test_fine_tune_of_tied_embeddings_saves_the_checkpoints_key_set(tmp_path, tokenizer):
    """A model whose output head is its input embedding (SmolLM2) is saved without a separate
    head, like the checkpoint it came from, and reloads with the head still tied."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    bridge = load_model(tmp_path / "base", tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 12))
    opt = torch.optim.AdamW([p for p in bridge.parameters() if p.requires_grad], lr=1e-2)
    bridge(x, return_type="loss").backward()
    opt.step()
    save_model(bridge, tmp_path / "ft")
    base_keys = load_file(str(tmp_path / "base" / "model.safetensors")).keys()
    saved = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert saved.keys() == base_keys and "lm_head.weight" not in saved
    again = load_model(tmp_path / "ft", tokenizer)
    with torch.no_grad():
        assert torch.allclose(again(x), bridge(x), atol=1e-5)


def test_pickle_checkpoint_is_refused(tmp_path, hf_checkpoint, tokenizer):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_checkpoint, bad)
    for p in bad.glob("*.safetensors"):
        p.rename(p.with_suffix(".bin"))
    with pytest.raises(DataError, match=r"expected \*\.safetensors weights"):
        load_model(bad, tokenizer)


def test_train_only_blocks_freezes_everything_else(tokenizer, hf_checkpoint):
    """finetune.layers: only the chosen blocks' own weights train, in a HookedTransformer and
    a TransformerBridge alike (embeddings, other blocks and final norm are frozen)."""
    from stagediff.models.lm import build_model, load_model, train_only_blocks

    for model in (build_model(make_config(), tokenizer), load_model(hf_checkpoint, tokenizer)):
        everything = train_only_blocks(model, None)
        assert everything == sum(p.numel() for p in model.parameters() if p.requires_grad)
        block = sum(p.numel() for p in model.blocks[1].parameters())
        assert train_only_blocks(model, [1, 1]) == block < everything
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(".1." in n for n in trained), sorted(trained)[:5]
