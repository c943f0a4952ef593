"""Checkpoint folders: layer count, safetensors only, and an incomparable pair refused by name."""

import json

import pytest

from stagediff.errors import DataError
from stagediff.models.checkpoints import check_pair, check_weights, n_layers


def _folder(path, config=None, vocab=None, weights=("model.safetensors",)):
    path.mkdir(parents=True)
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 32,
            "vocab_size": 100}
    (path / "config.json").write_text(json.dumps({**base, **(config or {})}))
    tokenizer = {"model": {"vocab": vocab or {"a": 0, "b": 1}}, "added_tokens": [{"content": "<eos>", "id": 2}]}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in weights:
        (path / name).write_bytes(b"x")
    return path


def test_a_fine_tune_with_the_same_shape_and_tokenizer_passes(tmp_path):
    base, tuned = _folder(tmp_path / "base"), _folder(tmp_path / "tuned")
    shape = check_pair({"base_model": base, "finetuned_model": tuned})
    assert shape == {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "n_layers": 2, "d_model": 32,
                     "vocab_size": 100}
    assert n_layers(base) == 2


@pytest.mark.parametrize("change, culprit", [
    ({"hidden_size": 64}, "d_model is 64, but the base model's"),
    ({"num_hidden_layers": 3}, "n_layers is 3"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type is 'gpt2'"),
    ({"vocab_size": 101}, "vocab_size is 101"),
])
def test_a_mismatch_is_refused_naming_the_folder_and_what_differs(tmp_path, change, culprit):
    base, tuned = _folder(tmp_path / "base"), _folder(tmp_path / "tuned", config=change)
    with pytest.raises(DataError, match=culprit) as err:
        check_pair({"base_model": base, "finetuned_model": tuned})
    assert str(tuned) in str(err.value) and "(finetuned_model)" in str(err.value)


def test_a_different_tokenizer_is_refused(tmp_path):
    base = _folder(tmp_path / "base")
    control = _folder(tmp_path / "control", vocab={"a": 0, "c": 1})
    with pytest.raises(DataError, match=r"\(control_model\): its tokenizer differs from the base model's"):
        check_pair({"base_model": base, "finetuned_model": _folder(tmp_path / "tuned"), "control_model": control})


def test_pickle_only_checkpoints_are_refused(tmp_path):
    folder = _folder(tmp_path / "ckpt", weights=("pytorch_model.bin",))
    with pytest.raises(DataError, match=r"expected \*\.safetensors weights .*\['pytorch_model.bin'\]"):
        check_weights(folder)


def test_a_folder_without_config_is_named(tmp_path):
    with pytest.raises(DataError, match="not a Hugging Face checkpoint folder"):
        n_layers(tmp_path)


def test_stagediff_check_refuses_an_incomparable_pair_before_any_stage(tmp_path, capsys):
    from ruamel.yaml import YAML

    from helpers import micro_params, with_changes, write_jsonl
    from stagediff.cli import main

    base, tuned = _folder(tmp_path / "base"), _folder(tmp_path / "tuned", config={"hidden_size": 48})
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    params = with_changes(micro_params(), {
        "pair.source": "checkpoints", "behaviour.source": "none", "backdoor.trigger_as_token": False,
        "steer.rankings": ["stagewise"], "inputs": {"base_model": str(base), "finetuned_model": str(tuned),
                                                    "base_data": str(data), "finetune_data": str(data)}})
    with open(tmp_path / "params.yaml", "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    assert main(["--params", str(tmp_path / "params.yaml"), "check"]) == 2
    err = capsys.readouterr().err
    assert "tuned (finetuned_model): d_model is 48, but the base model's" in err and "is 32" in err
